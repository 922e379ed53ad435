//! A running VM: connecting to its agent, the `Instance` calls, pause/resume
//! over QMP, restore and destroy.

use super::*;

pub struct VmInstance {
    pub(crate) id: String,
    pub(crate) pid: i32,
    pub(crate) vm: Vm,
    pub(crate) ram: PathBuf,
    /// Guest RAM in MiB and vCPUs.
    pub(crate) memory_mb: u64,
    pub(crate) smp: u64,
    /// The volumes attached to it.
    pub(crate) volumes: Vec<forkbox_core::model::VolumeMount>,
    /// The host's side of its egress (`egress.rs`), while it has one.
    pub(crate) egress: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    pub(crate) client: tokio::sync::OnceCell<AgentClient>,
    pub(crate) qmp: tokio::sync::Mutex<Option<qmp::Qmp>>,
    /// The thread reading its console into its log (`console.rs`), until it stops.
    pub(crate) console: std::sync::Mutex<Option<console::Pump>>,
    pub(crate) alive: Arc<AtomicBool>,
    pub(crate) exited: tokio::sync::watch::Receiver<bool>,
    pub(crate) rt: Arc<Inner>,
    /// OOM kills of the guest's kernel as its agent reported them at the end of each
    /// command and cell (counted before the `exit` event goes on).
    pub(crate) oom_kills: Arc<std::sync::atomic::AtomicU64>,
}

/// Kills a QEMU whose boot was abandoned (see `boot`).
pub(crate) struct BootGuard {
    pub(crate) pid: i32,
    pub(crate) alive: Arc<AtomicBool>,
}

impl Drop for BootGuard {
    fn drop(&mut self) {
        if self.pid > 0 && self.alive.load(Ordering::SeqCst) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// How long a guest that ran before gets to answer on one host session.
pub(crate) const REATTACH_ATTEMPT: Duration = Duration::from_secs(6);

impl VmInstance {
    /// Adds the guest's OOM kills an `exit` event reports to [`Self::oom_kills`]
    /// before passing the event on (the manager compares the count around a call).
    fn count_oom(&self, events: AgentEvents) -> AgentEvents {
        use futures_util::StreamExt as _;
        let kills = self.oom_kills.clone();
        events
            .inspect(move |ev| {
                // The guest says so: a few per call at most, never wrapping.
                if let Ok(forkbox_types::agent::AgentEvent::Exit {
                    oom_kills: Some(n @ 1..),
                    ..
                }) = ev
                {
                    let n = (*n).min(64);
                    let _ = kills.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| {
                        Some(k.saturating_add(n))
                    });
                }
            })
            .boxed()
    }

    /// Its agent, for the calls every runtime makes alike (`forkbox_agent_calls`).
    pub(crate) fn agent(&self) -> Result<forkbox_agent_calls::Agent<'_>, RuntimeError> {
        Ok(forkbox_agent_calls::Agent::new(&self.id, self.client()?))
    }
}

impl VmInstance {
    pub(crate) fn agent_err(
        &self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> RuntimeError {
        RuntimeError::Agent {
            id: self.id.clone(),
            source: source.into(),
        }
    }

    /// Waits for QEMU's sockets, connects QMP and the agent, and waits for the agent's
    /// health answer.
    pub(crate) async fn connect(
        &self,
        started: Instant,
        deadline: Duration,
        source: Source<'_>,
    ) -> Result<(), RuntimeError> {
        let left = || deadline.saturating_sub(started.elapsed());
        // QEMU makes its sockets before the guest runs (bound a moment before listening).
        let (q, stream) = loop {
            if !self.alive.load(Ordering::SeqCst) {
                return Err(self.agent_err(format!(
                    "QEMU exited at start: {}",
                    std::fs::read_to_string(&self.vm.qemu_log)
                        .unwrap_or_default()
                        .trim()
                )));
            }
            if let Ok(q) = qmp::Qmp::connect(&self.vm.qmp_sock).await {
                match tokio::net::UnixStream::connect(&self.vm.agent_sock).await {
                    Ok(s) => break (q, s),
                    Err(e) if left().is_zero() => return Err(self.agent_err(e)),
                    Err(_) => {}
                }
            }
            if left().is_zero() {
                return Err(self.agent_err("QEMU's sockets did not open in time"));
            }
            // (QEMU's start takes tens of milliseconds: asked often.)
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        *self.qmp.lock().await = Some(q);
        match source {
            Source::Boot | Source::Adopt { .. } => {}
            Source::Restore(state) => self.restore(state, false, left()).await?,
            Source::Fork { state, .. } => self.restore(state, true, left()).await?,
        }
        // The preface waits in the socket until the guest's agent opens its port.
        let client = AgentClient::handshake(stream)
            .await
            .map_err(|e| self.agent_err(e))?;
        if matches!(source, Source::Adopt { paused: true }) {
            // Stopped vCPUs cannot answer; the request waits for `resume`.
            let _ = self.client.set(client);
            return Ok(());
        }
        // A guest that ran before (adopted, restored, forked) had a host session on
        // its port; should the end of that session and the start of ours ever run into
        // each other on the byte stream, our session would wait forever. So such a
        // guest gets a few seconds per attempt: no answer, and we hang up (which the
        // guest sees as the end of every session) and start a fresh one.
        let attempt = if matches!(source, Source::Boot) {
            deadline
        } else {
            REATTACH_ATTEMPT
        };
        let mut client = client;
        let mut tries = 1u32;
        loop {
            let mut exited = self.exited.clone();
            let patience = left().min(attempt);
            tokio::select! {
                r = tokio::time::timeout(patience, client.health()) => match r {
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) if left().is_zero() || matches!(source, Source::Boot) => {
                        return Err(self.agent_err(e))
                    }
                    Ok(Err(_)) | Err(_) if !left().is_zero() => {}
                    Ok(Err(e)) => return Err(self.agent_err(e)),
                    Err(_) => return Err(self.agent_err(format!(
                        "the guest's agent did not answer within {deadline:?} ({tries} sessions)"
                    ))),
                },
                _ = exited.wait_for(|e| *e) => {
                    return Err(self.agent_err("the VM stopped while booting"));
                }
            }
            tracing::warn!(sandbox = %self.id, tries, "the guest's agent did not answer; starting a new session");
            drop(client);
            // Let the guest see the hang-up before the next session begins.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let stream = tokio::net::UnixStream::connect(&self.vm.agent_sock)
                .await
                .map_err(|e| self.agent_err(e))?;
            client = AgentClient::handshake(stream)
                .await
                .map_err(|e| self.agent_err(e))?;
            tries += 1;
        }
        let _ = self.client.set(client);
        Ok(())
    }

    pub(crate) fn client(&self) -> Result<&AgentClient, RuntimeError> {
        self.client
            .get()
            .ok_or_else(|| self.agent_err("not connected"))
    }

    /// `e` and, when it says the agent does not answer, the last lines the guest
    /// printed on its console (read as `/logs` reads them: the last 64 KiB, across
    /// `console.log.1`).
    pub(crate) async fn with_console(&self, e: RuntimeError) -> RuntimeError {
        use futures_util::StreamExt as _;
        let RuntimeError::Agent { id, source } = e else {
            return e;
        };
        let lines: Vec<String> =
            match forkbox_core::runtime::tail_lines(&self.vm.console, false, self.alive.clone()) {
                Ok(lines) => lines.collect().await,
                Err(_) => Vec::new(),
            };
        let last = lines[lines.len().saturating_sub(8)..].join(" | ");
        RuntimeError::Agent {
            id,
            source: format!("{source}; guest console: {last}").into(),
        }
    }

    /// Runs `stop` (`pause`) or `cont` on the VM.
    pub(crate) async fn run_state(&self, pause: bool) -> Result<(), RuntimeError> {
        let op = if pause { "pause" } else { "resume" };
        let mut g = self.qmp.lock().await;
        let q = g
            .as_mut()
            .ok_or_else(|| RuntimeError::host(op, &self.id, std::io::Error::other("no QMP")))?;
        let r = if pause {
            q.stop().await
        } else {
            q.cont().await
        };
        r.map_err(|e| RuntimeError::host(op, &self.id, e))
    }

    /// Gives a guest restored from someone's memory (a copy, a woken sandbox) its own
    /// host name, the host's clock, fresh randomness and, if `env` is given, that
    /// environment.
    pub(crate) async fn refresh_identity(
        &self,
        hostname: &str,
        env: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<(), RuntimeError> {
        let mut seed = [0u8; 64];
        // SAFETY: getrandom fills the buffer it is given, at most its length.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        if n != seed.len() as isize {
            return Err(RuntimeError::host(
                "seed the guest",
                &self.id,
                std::io::Error::last_os_error(),
            ));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .ok();
        let req = forkbox_types::agent::HostnameRequest {
            hostname: hostname.to_owned(),
            env: env.cloned(),
            entropy_hex: Some(seed.iter().map(|b| format!("{b:02x}")).collect()),
            now_unix_ns: now,
        };
        self.client()?
            .set_hostname(&req)
            .await
            .map_err(|e| self.agent_err(e))
    }

    /// Loads the saved VM into this QEMU (started with `-incoming defer`) and runs it.
    /// `ignore_shared`: the stream has device state only (a fork child's).
    pub(crate) async fn restore(
        &self,
        state: &Path,
        ignore_shared: bool,
        patience: Duration,
    ) -> Result<(), RuntimeError> {
        let host = |e: qmp::QmpError| RuntimeError::host("restore vm", &self.id, e);
        let file = std::fs::File::open(state)
            .map_err(|e| RuntimeError::host("open saved vm", &self.id, e))?;
        let mut g = self.qmp.lock().await;
        let q = g.as_mut().ok_or_else(|| {
            RuntimeError::host("restore vm", &self.id, std::io::Error::other("no QMP"))
        })?;
        q.set_ignore_shared(ignore_shared).await.map_err(host)?;
        q.getfd("state", std::os::fd::AsFd::as_fd(&file))
            .await
            .map_err(host)?;
        q.load_from_fd("state", patience).await.map_err(host)?;
        if ignore_shared {
            q.set_ignore_shared(false).await.map_err(host)?;
        }
        // A restored VM comes up paused.
        if !q.status().await.map_err(host)?.running {
            q.cont().await.map_err(host)?;
        }
        Ok(())
    }

    /// Grows its root disk to `size` bytes and has the guest grow its file system.
    pub(crate) async fn grow_disk(&self, size: u64) -> Result<(), RuntimeError> {
        {
            let mut g = self.qmp.lock().await;
            let q = g.as_mut().ok_or_else(|| {
                RuntimeError::host("grow disk", &self.id, std::io::Error::other("no QMP"))
            })?;
            q.block_resize("d0", size)
                .await
                .map_err(|e| RuntimeError::host("grow disk", &self.id, e))?;
        }
        self.client()?
            .grow_disk(size)
            .await
            .map_err(|e| self.agent_err(e))
    }

    /// Has the guest end its processes and unmount its writable volumes, so their
    /// file systems are clean for whoever mounts them next (it is about to be
    /// killed). Best effort, a few seconds at most: what reached the image stays, and
    /// a journal replays the rest at the next writable mount.
    pub(crate) async fn release_volumes(&self) {
        if self.volumes.iter().all(|v| v.read_only) || !self.is_alive() {
            return;
        }
        if let Ok(c) = self.client() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.release_volumes()).await;
        }
    }

    /// Kills QEMU, waits for it and frees its RAM; the VM's files stay.
    pub(crate) async fn stop_qemu(&self) {
        self.stop_egress();
        if self.pid > 0 && self.alive.load(Ordering::SeqCst) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Whatever else runs in its group, or as its uid: an adopted QEMU is watched
        // through its command line, which it could rewrite to look gone.
        self.rt.kill_leftovers(&self.id, &self.vm.dir).await;
        let mut exited = self.exited.clone();
        let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
        self.alive.store(false, Ordering::SeqCst);
        *self.qmp.lock().await = None;
        // Its console's reader is done before the VM's files go (it would make a new
        // log in a directory being removed).
        let pump = self.console.lock().ok().and_then(|mut p| p.take());
        if let Some(pump) = pump {
            let _ = tokio::task::spawn_blocking(move || drop(pump)).await;
        }
        let _ = std::fs::remove_file(&self.ram);
        self.rt.release_cgroup(&self.id);
    }

    pub(crate) async fn destroy_in(&self) -> Result<(), RuntimeError> {
        self.release_volumes().await;
        self.stop_qemu().await;
        let r = match std::fs::remove_dir_all(&self.vm.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::host("remove vm run dir", &self.id, e)),
        };
        collect_layers(&self.rt.cfg.run_dir.join("layers"));
        r
    }
}

#[async_trait]
impl Instance for VmInstance {
    fn host_pid(&self) -> Option<i32> {
        (self.pid > 0).then_some(self.pid)
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && self.client.get().is_some_and(|c| c.is_open())
    }

    fn oom_kills(&self) -> u64 {
        self.oom_kills.load(Ordering::SeqCst)
    }

    async fn exec(&self, req: ExecRequest) -> Result<AgentEvents, RuntimeError> {
        Ok(self.count_oom(self.agent()?.exec(&req).await?))
    }

    async fn run_code(&self, req: RunCodeRequest) -> Result<AgentEvents, RuntimeError> {
        Ok(self.count_oom(self.agent()?.run_code(&req).await?))
    }

    async fn pause(&self) -> Result<(), RuntimeError> {
        self.run_state(true).await
    }

    async fn resume(&self) -> Result<(), RuntimeError> {
        self.run_state(false).await
    }

    async fn watch(&self, path: &str, recursive: bool) -> Result<WatchEvents, RuntimeError> {
        self.agent()?.watch(path, recursive).await
    }

    async fn pty(&self, req: PtyRequest, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        self.agent()?.pty(&req, input).await
    }

    /// The guest's console (its kernel's messages, then the agent's stderr).
    async fn logs(
        &self,
        follow: bool,
    ) -> Result<futures_util::stream::BoxStream<'static, String>, RuntimeError> {
        forkbox_core::runtime::tail_lines(&self.vm.console, follow, self.alive.clone())
            .map_err(|e| RuntimeError::host("open console log", &self.id, e))
    }

    async fn tcp(&self, port: u16, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        self.agent()?.tcp(port, input).await
    }

    async fn ports(&self) -> Result<Vec<ListeningPort>, RuntimeError> {
        self.agent()?.ports().await
    }

    async fn bg_start(&self, req: ExecRequest) -> Result<BgInfo, RuntimeError> {
        self.agent()?.bg_start(&req).await
    }

    async fn bg_list(&self) -> Result<Vec<BgInfo>, RuntimeError> {
        self.agent()?.bg_list().await
    }

    async fn bg_stdin(&self, pid: i32, data: Bytes, close: bool) -> Result<(), RuntimeError> {
        self.agent()?.bg_stdin(pid, data, close).await
    }

    async fn bg_signal(&self, pid: i32, signal: i32) -> Result<(), RuntimeError> {
        self.agent()?.bg_signal(pid, signal).await
    }

    async fn bg_wait(&self, pid: i32) -> Result<i32, RuntimeError> {
        self.agent()?.bg_wait(pid).await
    }

    async fn bg_output(&self, pid: i32, follow: bool) -> Result<AgentEvents, RuntimeError> {
        self.agent()?.bg_output(pid, follow).await
    }

    async fn file_op(&self, op: FileOp) -> Result<FileOpReply, RuntimeError> {
        self.agent()?.file_op(&op).await
    }

    async fn read_file(&self, path: &str) -> Result<(Option<u64>, ByteStream), RuntimeError> {
        self.agent()?.read_file(path).await
    }

    async fn write_file(&self, path: &str, data: UploadStream) -> Result<WriteReply, RuntimeError> {
        self.agent()?.write_file(path, data).await
    }

    async fn hibernate(&self) -> Result<(), RuntimeError> {
        self.hibernate_in().await
    }

    async fn fork(&self, children: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        self.fork_in(children).await
    }

    /// The whole VM (memory and processes too), not only its files.
    async fn snapshot(&self, snapshot: &str, freeze: bool) -> Result<(), RuntimeError> {
        self.snapshot_in(snapshot, freeze).await
    }

    async fn destroy(&self) -> Result<(), RuntimeError> {
        self.destroy_in().await
    }
}
