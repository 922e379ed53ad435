//! Making a sandbox: choosing its root by origin (template, snapshot, fork,
//! wake), cgroups and limits, the egress link, and starting `jail-init`.

use super::*;

/// Where a new sandbox's root filesystem and REPL come from.
pub(crate) enum Origin {
    /// A fresh snapshot of the spec's template (or of its named snapshot).
    Template,
    /// The filesystem is already there: a hibernated sandbox woken up.
    Existing,
    /// A fork child: its root stands on the layers given (the parent's, frozen, on
    /// top); its namespaces nest in the parent's (whose agent has this host pid) and
    /// it waits for a REPL copy.
    Fork {
        parent_pid: i32,
        token: String,
        /// The layers under the child's root, topmost first.
        lowers: Vec<Lower>,
        /// The parent's host uid range (the family's).
        slot: Arc<slots::Slot>,
        /// The agent image for the child's second jail-init stage, owned by the
        /// family's root (see `AgentImage::nested_for`).
        nested: Arc<OwnedFd>,
        /// The family's helper mount namespace (`Inner::helper_ns`).
        helper: Arc<OwnedFd>,
    },
}

impl Inner {
    /// Makes one running sandbox; everything made is undone if a step fails.
    pub(crate) async fn start(
        self: &Arc<Self>,
        spec: &CreateSpec,
        origin: Origin,
    ) -> Result<Arc<JailInstance>, RuntimeError> {
        let mut res = Resources {
            id: spec.id.clone(),
            ..Default::default()
        };
        match self.create_in(spec, &mut res, origin).await {
            Ok(i) => Ok(i),
            Err(e) => {
                if let Err(cleanup) = res.release().await {
                    tracing::error!(sandbox = %spec.id, error = %cleanup, "cleanup after failed create");
                }
                Err(e)
            }
        }
    }

    /// Links a sandbox with an allowlist to its egress proxy; `None` without one.
    pub(crate) async fn attach_egress(
        &self,
        spec: &CreateSpec,
        pid: i32,
    ) -> Result<Option<forkbox_net::Attachment>, RuntimeError> {
        let Some(list) = &spec.egress else {
            return Ok(None);
        };
        // Checked strictly at create; a list stored by an earlier version (an adopted
        // sandbox) keeps what still parses: dropping a pattern only narrows access.
        let (allow, dropped) = forkbox_types::egress::Allowlist::parse_lenient(list);
        for why in dropped {
            tracing::warn!(sandbox = %spec.id, %why, "egress allowlist pattern dropped");
        }
        let egress = self
            .egress
            .get_or_try_init(|| forkbox_net::Egress::open(self.egress_cfg.clone()))
            .await
            .map_err(|e| RuntimeError::host("open the egress namespace", &spec.id, e))?;
        egress
            // Only a template build's sandbox gets the server's trusted names.
            .attach(
                &spec.id,
                pid,
                allow,
                crate::build::is_build_sandbox(&spec.id),
            )
            .await
            .map(Some)
            .map_err(|e| RuntimeError::host("link the sandbox to its egress proxy", &spec.id, e))
    }

    pub(crate) async fn create_in(
        self: &Arc<Self>,
        spec: &CreateSpec,
        res: &mut Resources,
        origin: Origin,
    ) -> Result<Arc<JailInstance>, RuntimeError> {
        let id = spec.id.as_str();
        let t0 = std::time::Instant::now();
        // Each phase a span (exported over OTLP when configured; its duration is the
        // phase's): `create.rootfs_and_cgroup`, `create.jail_init`, `create.agent_ready`.
        let phase = tracing::info_span!("create.rootfs_and_cgroup", sandbox = id);
        // 0. Its run dir first: a create cut short (a server killed mid-way) is then
        //    found and undone by the next server's garbage collection or `forkbox
        //    down`, which start from the run dirs, rather than leaving a root
        //    filesystem and cgroups nobody knows of.
        let run = self.run_dir.join(id);
        std::fs::create_dir_all(&run).map_err(|e| RuntimeError::host("create run dir", id, e))?;
        res.run_dir = Some(run.clone());
        // 1. Root filesystem: a subvolume with the sandbox's own writes (`upper`) for an
        //    overlay over read-only layers (see `layers.rs`); a woken sandbox's is there.
        let rootfs = self.pool.sandbox(id);
        let chain_file = self.pool.sandbox_chain(id);
        let layer_err =
            |e: layers::LayerError| RuntimeError::host("prepare root filesystem", id, e);
        let lowers: Vec<Lower> = match &origin {
            Origin::Existing => {
                if !rootfs.exists() {
                    return Err(RuntimeError::Conflict(format!(
                        "the filesystem of {id} is gone; it cannot be woken"
                    )));
                }
                res.rootfs = Some(rootfs.clone());
                layers::read_chain(&chain_file)
                    .map_err(layer_err)?
                    .unwrap_or_default()
            }
            Origin::Fork { lowers, .. } => lowers.clone(),
            Origin::Template => match &spec.snapshot {
                Some(snap) => {
                    let below =
                        layers::read_chain(&self.pool.snapshot_chain(snap)).map_err(layer_err)?;
                    let mut l = vec![Lower::Snapshot {
                        id: snap.clone(),
                        upper: below.is_some(),
                    }];
                    l.extend(below.unwrap_or_default());
                    l
                }
                None => {
                    if !self.pool.template_meta(&spec.template).exists() {
                        if self.recipes.contains_key(&spec.template) {
                            self.prepare_template(&spec.template).await?;
                        } else {
                            return Err(RuntimeError::UnknownTemplate(spec.template.clone()));
                        }
                    }
                    let built = layers::template_built(&self.pool, &spec.template)
                        .ok_or_else(|| RuntimeError::UnknownTemplate(spec.template.clone()))?;
                    vec![Lower::Template {
                        name: spec.template.clone(),
                        built,
                    }]
                }
            },
        };
        // No layer is deleted or moved from here until the overlay holds them.
        let layers_lock = if lowers.is_empty() {
            None
        } else {
            let pool = self.pool.clone();
            Some(
                tokio::task::spawn_blocking(move || layers::PoolLock::shared(&pool))
                    .await
                    .map_err(|e| RuntimeError::host("lock the pool's layers", id, e))?
                    .map_err(layer_err)?,
            )
        };
        let lower_paths = lowers
            .iter()
            .map(|l| l.path(&self.pool))
            .collect::<Result<Vec<_>, _>>()
            .map_err(layer_err)?;
        if !matches!(origin, Origin::Existing) {
            // The chain first (released with the subvolume): a sweep of layers then
            // never misses what this sandbox stands on.
            res.rootfs = Some(rootfs.clone());
            layers::write_chain(&chain_file, &lowers).map_err(layer_err)?;
            if let Some(top) = lower_paths.first() {
                layers::make_upper(&rootfs, top).map_err(layer_err)?;
            }
        }
        // 1b. Disk limit of the sandbox's own writes (a woken sandbox keeps its own).
        if !matches!(origin, Origin::Existing) {
            self.pool
                .limit(&rootfs, spec.disk_bytes)
                .map_err(|e| RuntimeError::host("limit disk", id, e))?;
        }
        // 2. Cgroup.
        let cg = self
            .cgroups
            .create(
                id,
                &Limits {
                    memory_bytes: Some(spec.memory_bytes),
                    pids_max: Some(spec.pids_max),
                    cpu_millis: Some(spec.cpu_millis),
                },
            )
            .map_err(|e| RuntimeError::host("create cgroup", id, e))?;
        res.cgroup = Some(cg.clone());
        let t_fs_cg = t0.elapsed();
        drop(phase);
        let phase = tracing::info_span!("create.jail_init", sandbox = id);
        // 3. The agent's socket.
        let sock = run.join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock)
            .map_err(|e| RuntimeError::host("bind agent socket", id, e))?;
        let log = std::fs::File::create(run.join("agent.log"))
            .map_err(|e| RuntimeError::host("create agent log", id, e))?;
        // 4. jail-init.
        let (fork_of, adopt_token, nested, helper) = match origin {
            Origin::Template | Origin::Existing => {
                let slot = self
                    .slots
                    .allocate()
                    .map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
                res.slot = Some(slot);
                (None, None, None, None)
            }
            Origin::Fork {
                parent_pid,
                token,
                slot,
                nested,
                helper,
                ..
            } => {
                res.slot = Some(slot);
                res.nested = Some(nested.clone());
                (Some(parent_pid), Some(token), Some(nested), Some(helper))
            }
        };
        let host_uid = res.slot.as_ref().map(|s| s.host_uid());
        // Volume targets pass through nothing the sandbox's own filesystem could have
        // made a symlink (a snapshot or wake of a filesystem its code wrote); jail-init
        // enforces it again when it mounts (`forkbox_sys::mounts::dir_beneath`), this
        // makes it a clear refusal. A layered root is checked in each of its layers
        // (its own writes first).
        if !spec.volumes.is_empty() {
            let roots = if lowers.is_empty() {
                vec![rootfs.clone()]
            } else {
                std::iter::once(rootfs.join("upper"))
                    .chain(lower_paths.iter().cloned())
                    .collect()
            };
            for root in roots {
                let root_fd: OwnedFd = std::fs::File::open(&root)
                    .map_err(|e| RuntimeError::host("open root filesystem", id, e))?
                    .into();
                for v in &spec.volumes {
                    let target = Path::new(&v.mount);
                    forkbox_sys::mounts::dir_beneath(&root_fd, target, target, false)
                        .map_err(|e| RuntimeError::Rejected(e.to_string()))?;
                }
            }
        }
        let mut binds = Vec::with_capacity(spec.volumes.len());
        for v in &spec.volumes {
            let source = self
                .volumes
                .mounted(&v.id)
                .await
                .map_err(|e| crate::volume_error("mount volume", &v.id, e))?;
            binds.push(forkbox_types::agent::BindMount {
                source: source.to_string_lossy().into_owned(),
                target: v.mount.clone(),
                read_only: v.read_only,
            });
        }
        let init = JailInit {
            id: id.to_owned(),
            rootfs: rootfs.to_string_lossy().into_owned(),
            lowers: lower_paths
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
            pool: (!lowers.is_empty()).then(|| self.pool.root().to_string_lossy().into_owned()),
            uid_base: self.uid_base,
            host_uid,
            cgroup_procs: cg
                .procs_files()
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
            env: spec.env.clone(),
            fork_of,
            adopt_token,
            helper_ns: helper.is_some(),
            binds,
            // Half the memory limit: a full /tmp leaves room to run.
            tmp_size: Some((spec.memory_bytes / 2).max(8 << 20)),
            orphan_grace_s: self.orphan_grace.map(|g| g.as_secs().max(1)),
        };
        let pid = self
            .run_jail_init(
                id,
                &init,
                listener.as_raw_fd(),
                nested.as_deref(),
                helper.as_deref(),
                log,
            )
            .await?;
        drop(listener);
        drop(layers_lock);
        res.pid = Some(pid);
        // The agent is the last process the OOM killer may take (its children set
        // their own score back to 0): a memory bomb kills the bomb, not the sandbox.
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "-1000");
        let t_init = t0.elapsed();
        drop(phase);
        let phase = tracing::info_span!("create.agent_ready", sandbox = id);
        // 5. Watch and connect.
        let pidfd = Arc::new(
            forkbox_sys::pidfd::open(pid).map_err(|e| RuntimeError::host("pidfd_open", id, e))?,
        );
        res.pidfd = Some(pidfd.clone());
        let client = AgentClient::connect_unix(&sock)
            .await
            .map_err(|e| RuntimeError::Agent {
                id: id.to_owned(),
                source: e.into(),
            })?;
        client.health().await.map_err(|e| RuntimeError::Agent {
            id: id.to_owned(),
            source: e.into(),
        })?;
        // 6. The egress link, before any user code can run.
        res.egress = self.attach_egress(spec, pid).await?;
        drop(phase);
        tracing::debug!(
            sandbox = id,
            snapshot_and_cgroup_ms = t_fs_cg.as_secs_f64() * 1e3,
            jail_init_ms = (t_init - t_fs_cg).as_secs_f64() * 1e3,
            agent_ready_ms = (t0.elapsed() - t_init).as_secs_f64() * 1e3,
            "sandbox created"
        );
        let alive = watch_liveness(&pidfd);
        let taken = std::mem::replace(
            res,
            Resources {
                id: id.to_owned(),
                ..Default::default()
            },
        );
        Ok(Arc::new(JailInstance {
            id: id.to_owned(),
            pid,
            rootfs,
            cgroup: cg,
            client,
            alive,
            resources: tokio::sync::Mutex::new(taken),
            rt: self.clone(),
        }))
    }

    /// A fork family's helper mount namespace: `forkbox-agent jail-helper` makes it and
    /// waits; the namespace is kept by an fd on its `/proc/<pid>/ns/mnt`, then the
    /// helper is let go.
    pub(crate) async fn helper_ns(&self, id: &str) -> Result<OwnedFd, RuntimeError> {
        use std::os::unix::process::CommandExt as _;
        use tokio::io::AsyncBufReadExt;
        let err = |e: std::io::Error| RuntimeError::host("make the fork helpers' namespace", id, e);
        let agent = self
            .agent
            .as_ref()
            .ok_or_else(|| err(std::io::Error::other("no agent image")))?;
        let mut cmd = tokio::process::Command::new(agent.exec_path());
        cmd.as_std_mut().arg0("forkbox-agent");
        cmd.arg("jail-helper")
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(err)?;
        let pid = child.id();
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            tokio::io::BufReader::new(out)
                .read_line(&mut line)
                .await
                .map_err(err)?;
        }
        let ns = match (line.trim(), pid) {
            ("ready", Some(pid)) => std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
                .map(OwnedFd::from)
                .map_err(err),
            (why, _) => Err(err(std::io::Error::other(why.to_owned()))),
        };
        drop(child.stdin.take());
        let _ = child.wait().await;
        ns
    }

    pub(crate) async fn run_jail_init(
        &self,
        id: &str,
        init: &JailInit,
        listen_fd: i32,
        nested: Option<&OwnedFd>,
        helper: Option<&OwnedFd>,
        log: std::fs::File,
    ) -> Result<i32, RuntimeError> {
        let agent = self.agent.as_ref().ok_or_else(|| {
            RuntimeError::host(
                "start jail-init",
                id,
                std::io::Error::other("this runtime was opened for clean-up only"),
            )
        })?;
        let input =
            serde_json::to_vec(init).map_err(|e| RuntimeError::host("encode jail-init", id, e))?;
        // Spawned without forking the server (see `spawn_placed`); the exchange is
        // blocking I/O on pipes, on a blocking thread.
        let path = agent.exec_path();
        let places = [
            (Some(listen_fd), 3),
            (nested.map(|f| f.as_raw_fd()), 4),
            (helper.map(|f| f.as_raw_fd()), 63),
        ];
        let spawned = spawn_placed(&path, &[c"forkbox-agent", c"jail-init"], places, &log)
            .map_err(|e| RuntimeError::host("start jail-init", id, e))?;
        drop(log);
        let sid = id.to_owned();
        let out = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, RuntimeError> {
            use std::io::{Read as _, Write as _};
            let (pid, mut stdin, mut stdout) = spawned;
            let written = stdin.write_all(&input);
            drop(stdin);
            let mut out = Vec::new();
            let read = stdout.read_to_end(&mut out);
            // Reaped whatever happened (jail-init's first stage exits once the
            // sandbox's init runs, or failed).
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            written.map_err(|e| RuntimeError::host("write jail-init config", &sid, e))?;
            read.map_err(|e| RuntimeError::host("read jail-init reply", &sid, e))?;
            Ok(out)
        })
        .await
        .map_err(|e| RuntimeError::host("run jail-init", id, std::io::Error::other(e)))??;
        match serde_json::from_slice::<JailInitReply>(&out) {
            Ok(JailInitReply::Ready { pid }) => Ok(pid),
            Ok(JailInitReply::Failed { error }) => Err(RuntimeError::host(
                "set up sandbox",
                id,
                std::io::Error::other(error),
            )),
            Err(e) => Err(RuntimeError::host("decode jail-init reply", id, e)),
        }
    }
}

/// Starts `jail-init` (`path`, `args`) with `posix_spawn` — the C library's `vfork`-style
/// spawn, which shares the server's memory until the exec instead of copying its page
/// tables: a plain fork of a server holding thousands of sandboxes cost more than half a
/// create (docs/performance.md). Its stdin and stdout are pipes (returned), its stderr
/// `log`, and `places` are put on their numbers (the agent's listening socket on 3, a
/// fork child's nested agent image on 4, its family's helper mount namespace on 63),
/// every other descriptor being close-on-exec. Returns its pid (the caller reaps it).
pub(crate) fn spawn_placed(
    path: &std::path::Path,
    args: &[&std::ffi::CStr],
    places: [(Option<i32>, i32); 3],
    log: &std::fs::File,
) -> std::io::Result<(libc::pid_t, std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd as _;
    use std::os::unix::ffi::OsStrExt as _;
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (in_r, in_w) = nix::unistd::pipe2(cloexec)?;
    let (out_r, out_w) = nix::unistd::pipe2(cloexec)?;
    // Close-on-exec copies of every source above every target, so no action can
    // clobber a source another still needs; `dup2` onto the target clears the flag.
    let mut moves: Vec<(OwnedFd, i32)> = Vec::with_capacity(6);
    let sources = [
        (Some(in_r.as_raw_fd()), 0),
        (Some(out_w.as_raw_fd()), 1),
        (Some(log.as_raw_fd()), 2),
    ]
    .into_iter()
    .chain(places);
    for (from, to) in sources {
        let Some(from) = from else { continue };
        // SAFETY: fcntl on an fd number; the result is a new fd we own.
        let high = unsafe { libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 64) };
        if high < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `high` was just returned by F_DUPFD and is owned by nobody else.
        moves.push((unsafe { OwnedFd::from_raw_fd(high) }, to));
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let argv: Vec<*mut libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect();
    let envp = [std::ptr::null_mut::<libc::c_char>()];
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(r))
        }
    };
    let mut pid: libc::pid_t = 0;
    // SAFETY: the action and attribute objects are initialised before use and
    // destroyed after; every pointer handed to posix_spawn outlives the call.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut actions))?;
        check(libc::posix_spawnattr_init(&mut attr))?;
        let spawned = (|| {
            for (high, to) in &moves {
                check(libc::posix_spawn_file_actions_adddup2(
                    &mut actions,
                    high.as_raw_fd(),
                    *to,
                ))?;
            }
            // Default dispositions and an empty mask, as a fresh process has.
            let mut none: libc::sigset_t = std::mem::zeroed();
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigfillset(&mut all);
            check(libc::posix_spawnattr_setsigmask(&mut attr, &none))?;
            check(libc::posix_spawnattr_setsigdefault(&mut attr, &all))?;
            check(libc::posix_spawnattr_setflags(
                &mut attr,
                (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
            ))?;
            check(libc::posix_spawn(
                &mut pid,
                c_path.as_ptr(),
                &actions,
                &attr,
                argv.as_ptr(),
                envp.as_ptr(),
            ))
        })();
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        spawned?;
    }
    drop((in_r, out_w, moves));
    Ok((pid, std::fs::File::from(in_w), std::fs::File::from(out_r)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read as _, Write as _};

    fn inode(fd: i32) -> u64 {
        // SAFETY: fstat writes into a zeroed stat on our stack.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } < 0 {
            return 0;
        }
        st.st_ino
    }

    /// The spawned program gets exactly stdin, stdout, stderr and the placed fds (on
    /// 3, 4, 63), whatever numbers the server's fds have — also when a source already
    /// sits on another one's target — and nothing else of the server's.
    #[test]
    fn spawn_places_the_fds_and_passes_nothing_else() {
        let log = tempfile::tempfile().unwrap();
        // Sources on awkward numbers: one on 4 (the nested image's target), one on 3.
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (p1, _w1) = nix::unistd::pipe2(cloexec).unwrap();
        let (p2, _w2) = nix::unistd::pipe2(cloexec).unwrap();
        let (p3, _w3) = nix::unistd::pipe2(cloexec).unwrap();
        let (a, b, c) = (p1.as_raw_fd(), p2.as_raw_fd(), p3.as_raw_fd());
        let want = [inode(b), inode(a), inode(c)];
        // The test process's other fds (std opens them close-on-exec) must not pass.
        let _other = std::fs::File::open("/dev/null").unwrap();
        let script = c"for f in 3 4 63; do stat -L -c %i /proc/self/fd/$f; done; \
                       echo $(ls /proc/self/fd | sort -n); cat; echo oops >&2";
        let (pid, mut stdin, mut stdout) = spawn_placed(
            std::path::Path::new("/bin/sh"),
            &[c"sh", c"-c", script],
            [(Some(b), 3), (Some(a), 4), (Some(c), 63)],
            &log,
        )
        .unwrap();
        stdin.write_all(b"from stdin").unwrap();
        drop(stdin);
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        let got: Vec<u64> = lines[..3].iter().map(|l| l.parse().unwrap()).collect();
        assert_eq!(got, want, "{out}");
        // 0-2, the three placed, 5 (the one `ls` opens for itself), and only what this
        // test process holds without close-on-exec (the test harness's; jail-init
        // closes such strays itself): nothing of the pipes or files opened here.
        let mut expected = vec![0, 1, 2, 3, 4, 5, 63];
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let fd: i32 = e.file_name().to_str().unwrap().parse().unwrap();
            // SAFETY: fcntl(F_GETFD) on an fd number.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if fd > 5 && fd != 63 && flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                expected.push(fd);
            }
        }
        expected.sort();
        let got: Vec<i32> = lines[3].split(' ').map(|f| f.parse().unwrap()).collect();
        assert_eq!(got, expected, "{out}");
        assert_eq!(lines[4], "from stdin", "{out}");
        let mut err = String::new();
        let mut log = log;
        std::io::Seek::rewind(&mut log).unwrap();
        log.read_to_string(&mut err).unwrap();
        assert_eq!(err, "oops\n");
    }
}
