//! Work inside a running sandbox: exec and run_code with numbered events, background
//! commands, terminals, preview-port connections, logs, file operations.

use super::*;

impl Manager {
    /// A command's `timeout` in seconds (more than 0, at most the server's longest
    /// timeout) as milliseconds.
    fn exec_timeout_ms(&self, t: f64) -> Result<u64, CoreError> {
        let max = self.config.max_timeout_s;
        if t.is_finite() && t > 0.0 && t <= max as f64 {
            Ok((t * 1000.0) as u64)
        } else {
            Err(CoreError::Invalid(format!(
                "timeout must be more than 0 and at most {max} seconds"
            )))
        }
    }

    /// Runs a command and streams its numbered events; the last one is always `exit`.
    pub async fn exec(
        &self,
        id: &SandboxRef,
        cmd: ExecCommand,
    ) -> Result<BoxStream<'static, ExecEvent>, CoreError> {
        let id = id.id();
        let timeout_ms = match cmd.timeout {
            None => None,
            Some(t) => Some(self.exec_timeout_ms(t)?),
        };
        let text = match &cmd.work {
            Work::Command(c) => c,
            Work::Code { code, .. } => code,
        };
        if text.is_empty() {
            return Err(CoreError::Invalid("cmd/code must not be empty".into()));
        }
        if text.contains('\0') {
            return Err(CoreError::Invalid("cmd/code must not contain NUL".into()));
        }
        let live = self.running_now(id).await?;
        self.span_of(id, "exec").in_scope(|| {
            tracing::info!(
                kind = match &cmd.work {
                    Work::Command(_) => "command",
                    Work::Code { .. } => "code",
                },
                "exec started"
            )
        });
        let oom_before = live.instance.oom_kills();
        self.metrics
            .execs
            .get_or_create(&KindLabel {
                kind: match &cmd.work {
                    Work::Command(_) => "command",
                    Work::Code { .. } => "code",
                }
                .to_owned(),
            })
            .inc();
        let started = std::time::Instant::now();
        let events = match cmd.work {
            Work::Command(c) => {
                let cwd = match cmd.cwd {
                    Some(c) => Some(c),
                    None => self.template_workdir(&live.spec.template).await,
                };
                live.instance
                    .exec(ExecRequest {
                        cmd: c,
                        cwd,
                        env: cmd.env,
                        timeout_ms,
                    })
                    .await?
            }
            Work::Code { language, code } => {
                if cmd.cwd.is_some() || !cmd.env.is_empty() {
                    return Err(CoreError::Invalid(
                        "cwd and env apply to commands; a REPL keeps its own".into(),
                    ));
                }
                live.instance
                    .run_code(RunCodeRequest {
                        language,
                        code,
                        timeout_ms,
                    })
                    .await?
            }
        };
        self.metrics
            .exec_start_seconds
            .observe(started.elapsed().as_secs_f64());
        // In flight (not idle) until the caller has the last event or gives up.
        let busy = live.activity.busy();
        Ok(number_events(
            events,
            Numbering {
                instance: live.instance.clone(),
                oom_before,
                memory_mb: live.record().memory_mb,
                timeout_s: cmd.timeout.unwrap_or(0.0),
                log: self.events.clone(),
                metrics: self.metrics.clone(),
                sandbox: id.to_owned(),
                expect_exit: true,
            },
        )
        .map(move |e| {
            let _ = &busy;
            e
        })
        .boxed())
    }

    /// Starts a command without waiting for it (`"background": true`).
    pub async fn exec_background(
        &self,
        id: &SandboxRef,
        cmd: ExecCommand,
    ) -> Result<BgInfo, CoreError> {
        let id = id.id();
        let Work::Command(c) = cmd.work else {
            return Err(CoreError::Invalid(
                "background applies to commands (`cmd`), not REPL cells".into(),
            ));
        };
        if c.is_empty() || c.contains('\0') {
            return Err(CoreError::Invalid(
                "cmd must be non-empty and contain no NUL".into(),
            ));
        }
        let timeout_ms = match cmd.timeout {
            None => None,
            Some(t) => Some(self.exec_timeout_ms(t)?),
        };
        let live = self.running_now(id).await?;
        let cwd = match cmd.cwd {
            Some(c) => Some(c),
            None => self.template_workdir(&live.spec.template).await,
        };
        Ok(live
            .instance
            .bg_start(ExecRequest {
                cmd: c,
                cwd,
                env: cmd.env,
                timeout_ms,
            })
            .await?)
    }

    /// An interactive terminal in a running sandbox (frames both ways, see
    /// `forkbox_types::pty`).
    pub async fn pty(
        &self,
        id: &SandboxRef,
        req: PtyRequest,
        input: UploadStream,
    ) -> Result<ByteStream, CoreError> {
        let id = id.id();
        if req
            .cmd
            .as_deref()
            .is_some_and(|c| c.is_empty() || c.contains('\0'))
        {
            return Err(CoreError::Invalid(
                "cmd must be non-empty and contain no NUL".into(),
            ));
        }
        if req
            .cwd
            .as_deref()
            .is_some_and(|c| !c.starts_with('/') || c.contains('\0'))
        {
            return Err(CoreError::Invalid(
                "cwd must be an absolute path without NUL".into(),
            ));
        }
        check_env(&req.env)?;
        let live = self.running_now(id).await?;
        let mut req = req;
        if req.cwd.is_none() {
            req.cwd = self.template_workdir(&live.spec.template).await;
        }
        let out = live.instance.pty(req, input).await?;
        // An open terminal is in use (not idle) until it ends.
        Ok(self.busy_while(id, out))
    }

    /// Starts the language server for `lang` (a name or alias of the languages file's
    /// `[lsp.*]`) in running sandbox `id`, on pipes, in `cwd` (default `/root`): its
    /// stdin is `input`, its stdout the answer, both [`forkbox_types::pty`] frames of
    /// LSP's base framing; its stderr goes to `/tmp/lsp-<name>.log` in the sandbox. It
    /// ends when the input ends or the answer is dropped. Refused, before anything
    /// starts, for an unknown language and for a sandbox whose template lacks the
    /// server's program (the error names the template that has it).
    pub async fn language_server(
        &self,
        id: &SandboxRef,
        lang: &str,
        cwd: Option<String>,
        input: UploadStream,
    ) -> Result<ByteStream, CoreError> {
        let languages = self.config.languages.clone();
        let Some(server) = languages.language_server(lang) else {
            let known: Vec<&str> = languages
                .language_servers()
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            return Err(CoreError::Invalid(format!(
                "no language server for {lang:?}; this server has: {}",
                known.join(", ")
            )));
        };
        let dir = cwd.as_deref().unwrap_or("/root");
        if !dir.starts_with('/') || dir.contains('\0') {
            return Err(CoreError::Invalid(
                "cwd must be an absolute path without NUL".into(),
            ));
        }
        let check = self
            .exec(
                id,
                ExecCommand {
                    work: Work::Command(format!(
                        "test -d {} || exit 3; command -v {} >/dev/null || exit 4",
                        forkbox_types::shell::quote(dir),
                        forkbox_types::shell::quote(server.program())
                    )),
                    cwd: None,
                    env: BTreeMap::new(),
                    timeout: Some(30.0),
                },
            )
            .await?;
        match crate::runner::collect(check).await.exit_code {
            0 => {}
            3 => {
                return Err(CoreError::Invalid(format!(
                    "cwd {dir} is not a directory in the sandbox"
                )))
            }
            4 => {
                return Err(CoreError::Invalid(format!(
                    "the {} language server ({}) is not installed in sandbox {}{}",
                    server.name,
                    server.program(),
                    id.id(),
                    match &server.template {
                        Some(t) =>
                            format!("; create the sandbox from template {t:?}, which has it"),
                        None => "; install it in the sandbox's template".to_owned(),
                    }
                )))
            }
            code => {
                return Err(CoreError::Conflict(format!(
                    "sandbox {} could not look for its language server (exit {code})",
                    id.id()
                )))
            }
        }
        // Bounded: each session may hold a message of up to 8 MiB in server memory.
        let live = self
            .live(id.id())
            .ok_or_else(|| CoreError::NotFound(id.id().into()))?;
        let permits = (
            live.lsp.clone().try_acquire_owned(),
            self.lsp.clone().try_acquire_owned(),
        );
        let (Ok(mine), Ok(all)) = permits else {
            return Err(CoreError::Quota(format!(
                "at most {LSP_PER_SANDBOX} LSP sessions per sandbox and {LSP_PER_SERVER} per \
                 server may be open at once; close one first"
            )));
        };
        let req = PtyRequest {
            cmd: Some(format!(
                "exec {} 2>>/tmp/lsp-{}.log",
                server.command, server.name
            )),
            cwd: Some(dir.to_owned()),
            pipe: true,
            rows: 1,
            cols: 1,
            env: BTreeMap::new(),
        };
        let out = self.pty(id, req, input).await?;
        // The session's permits go when its stream does.
        Ok(out
            .map(move |b| {
                let _ = (&mine, &all);
                b
            })
            .boxed())
    }

    /// `out`, holding sandbox `id` busy (not idle) until it ends or is dropped.
    fn busy_while(&self, id: &str, out: ByteStream) -> ByteStream {
        let Some(busy) = self.live(id).map(|l| l.activity.busy()) else {
            return out;
        };
        out.map(move |b| {
            let _ = &busy;
            b
        })
        .boxed()
    }

    /// A connection to TCP `port` inside a running sandbox (preview ports): `input` is
    /// sent to it, the answer is what it sends back. The sandbox is in use (not idle)
    /// while the connection is open.
    pub async fn tcp(
        &self,
        id: &SandboxRef,
        port: u16,
        input: UploadStream,
    ) -> Result<ByteStream, CoreError> {
        let id = id.id();
        if port == 0 {
            return Err(CoreError::Invalid("port must be 1-65535".into()));
        }
        let out = self.running_instance(id).await?.tcp(port, input).await?;
        Ok(self.busy_while(id, out))
    }

    /// The TCP ports something listens on in a running sandbox.
    pub async fn ports(
        &self,
        id: &SandboxRef,
    ) -> Result<Vec<forkbox_types::agent::ListeningPort>, CoreError> {
        Ok(self.running_instance(id.id()).await?.ports().await?)
    }

    /// A live sandbox's log lines (see [`Instance::logs`]).
    pub async fn logs(
        &self,
        id: &SandboxRef,
        follow: bool,
    ) -> Result<BoxStream<'static, String>, CoreError> {
        let id = id.id();
        Ok(self.running(id).await?.instance.logs(follow).await?)
    }

    /// Changes under a directory of a running sandbox, as they happen.
    pub async fn watch(
        &self,
        id: &SandboxRef,
        path: &str,
        recursive: bool,
    ) -> Result<crate::runtime::WatchEvents, CoreError> {
        let id = id.id();
        Ok(self
            .running_instance(id)
            .await?
            .watch(path, recursive)
            .await?)
    }

    /// Background commands of a sandbox.
    pub async fn commands(&self, id: &SandboxRef) -> Result<Vec<BgInfo>, CoreError> {
        let id = id.id();
        // A paused sandbox's agent is frozen: answer 409 rather than hang.
        Ok(self.running_instance(id).await?.bg_list().await?)
    }

    pub async fn command_stdin(
        &self,
        id: &SandboxRef,
        pid: i32,
        data: Bytes,
        close: bool,
    ) -> Result<(), CoreError> {
        let id = id.id();
        Ok(self
            .running_instance(id)
            .await?
            .bg_stdin(pid, data, close)
            .await?)
    }

    pub async fn command_signal(
        &self,
        id: &SandboxRef,
        pid: i32,
        signal: i32,
    ) -> Result<(), CoreError> {
        let id = id.id();
        Ok(self
            .running_instance(id)
            .await?
            .bg_signal(pid, signal)
            .await?)
    }

    /// Waits for a background command to exit; its exit code.
    pub async fn command_wait(&self, id: &SandboxRef, pid: i32) -> Result<i32, CoreError> {
        let id = id.id();
        Ok(self.running_instance(id).await?.bg_wait(pid).await?)
    }

    /// A background command's kept output, then (with `follow`) its live output; the
    /// same numbered events as exec.
    pub async fn command_output(
        &self,
        id: &SandboxRef,
        pid: i32,
        follow: bool,
    ) -> Result<BoxStream<'static, ExecEvent>, CoreError> {
        let id = id.id();
        let live = self.running_now(id).await?;
        let events = live.instance.bg_output(pid, follow).await?;
        Ok(number_events(
            events,
            Numbering {
                instance: live.instance.clone(),
                oom_before: u64::MAX,
                memory_mb: live.record().memory_mb,
                timeout_s: 0.0,
                log: self.events.clone(),
                metrics: self.metrics.clone(),
                sandbox: id.to_owned(),
                expect_exit: follow,
            },
        ))
    }

    /// A metadata operation on a sandbox's files.
    pub async fn file_op(&self, id: &SandboxRef, op: FileOp) -> Result<FileOpReply, CoreError> {
        let id = id.id();
        let instance = self.running_instance(id).await?;
        instance.file_op(op).await.map_err(|e| self.failed(id, e))
    }

    /// Reads a file of a sandbox, streamed.
    pub async fn read_file(
        &self,
        id: &SandboxRef,
        path: &str,
    ) -> Result<(Option<u64>, ByteStream), CoreError> {
        let id = id.id();
        let instance = self.running_instance(id).await?;
        instance
            .read_file(path)
            .await
            .map_err(|e| self.failed(id, e))
    }

    /// Writes a file of a sandbox from a stream, atomically.
    pub async fn write_file(
        &self,
        id: &SandboxRef,
        path: &str,
        data: UploadStream,
    ) -> Result<WriteReply, CoreError> {
        let id = id.id();
        let instance = self.running_instance(id).await?;
        instance
            .write_file(path, data)
            .await
            .map_err(|e| self.failed(id, e))
    }
}

/// How agent events become numbered exec events.
struct Numbering {
    instance: Arc<dyn Instance>,
    /// OOM kills counted before the call (`u64::MAX`: do not report OOM kills).
    oom_before: u64,
    memory_mb: u64,
    timeout_s: f64,
    log: Arc<EventLog>,
    metrics: Arc<Metrics>,
    sandbox: String,
    /// Whether the stream must end with an exit event (one is made up if missing).
    expect_exit: bool,
}

/// Numbers agent events, turning timeouts, OOM kills and lost agents into stderr lines
/// and exit codes; the last event is `exit` when `expect_exit`.
fn number_events(
    events: crate::runtime::AgentEvents,
    n: Numbering,
) -> BoxStream<'static, ExecEvent> {
    let Numbering {
        instance,
        oom_before,
        memory_mb,
        timeout_s,
        log,
        metrics,
        sandbox,
        expect_exit,
    } = n;
    let mut seq = 0u64;
    let mut next = move |kind: EventKind| {
        seq += 1;
        ExecEvent {
            kind,
            seq,
            ts: now_ms(),
        }
    };
    async_stream(events, move |ev, out| match ev {
        Some(Ok(AgentEvent::Stdout { data })) => out.push(next(EventKind::Stdout(data))),
        Some(Ok(AgentEvent::Stderr { data })) => out.push(next(EventKind::Stderr(data))),
        Some(Ok(AgentEvent::Error { message })) => {
            out.push(next(EventKind::Stderr(format!("forkbox: {message}\n"))))
        }
        Some(Ok(AgentEvent::Exit {
            code, timed_out, ..
        })) => {
            let code = if timed_out {
                out.push(next(EventKind::Stderr(format!(
                    "{TIMEOUT_NOTE} {timeout_s}s; process tree killed\n"
                ))));
                EXIT_TIMEOUT
            } else {
                if oom_before != u64::MAX && instance.oom_kills() > oom_before {
                    metrics.oom_kills.inc();
                    log.emit(
                        &sandbox,
                        Lifecycle::Oom,
                        serde_json::json!({ "memory_mb": memory_mb }),
                    );
                    out.push(next(EventKind::Stderr(format!(
                        "forkbox: killed by the out-of-memory killer (memory limit {memory_mb} MiB)\n"
                    ))));
                }
                code
            };
            out.push(next(EventKind::Exit(code)));
        }
        Some(Err(e)) => {
            out.push(next(EventKind::Stderr(format!("forkbox: {e}\n"))));
            out.push(next(EventKind::Exit(EXIT_UNKNOWN)));
        }
        None if expect_exit => {
            out.push(next(EventKind::Stderr(
                "forkbox: the sandbox's agent ended the stream without an exit status\n".into(),
            )));
            out.push(next(EventKind::Exit(EXIT_UNKNOWN)));
        }
        None => {}
    })
}

/// Maps each item of `input` (and its end, as `None`) to zero or more output events;
/// the output ends after the first `exit`.
fn async_stream<F>(input: crate::runtime::AgentEvents, f: F) -> BoxStream<'static, ExecEvent>
where
    F: FnMut(Option<Result<AgentEvent, crate::RuntimeError>>, &mut Vec<ExecEvent>) + Send + 'static,
{
    struct St<F> {
        input: crate::runtime::AgentEvents,
        f: F,
        queue: std::collections::VecDeque<ExecEvent>,
        finished: bool,
    }
    let st = St {
        input,
        f,
        queue: Default::default(),
        finished: false,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.queue.pop_front() {
                if matches!(ev.kind, EventKind::Exit(_)) {
                    st.finished = true;
                    st.queue.clear();
                }
                return Some((ev, st));
            }
            if st.finished {
                return None;
            }
            let item = st.input.next().await;
            let end = item.is_none();
            let mut out = Vec::new();
            (st.f)(item, &mut out);
            st.queue.extend(out);
            if end && st.queue.is_empty() {
                return None;
            }
        }
    })
    .boxed()
}
