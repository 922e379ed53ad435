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
            // Only a template build's sandbox (its id minted by the builder) gets the
            // server's trusted names.
            .attach(
                &spec.id,
                pid,
                allow,
                forkbox_core::ids::is_valid("bld", &spec.id),
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
                .map_err(|e| RuntimeError::host("mount volume", &v.id, e))?;
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
        use std::os::unix::process::CommandExt as _;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let agent = self.agent.as_ref().ok_or_else(|| {
            RuntimeError::host(
                "start jail-init",
                id,
                std::io::Error::other("this runtime was opened for clean-up only"),
            )
        })?;
        let mut cmd = tokio::process::Command::new(agent.exec_path());
        cmd.as_std_mut().arg0("forkbox-agent");
        cmd.arg("jail-init")
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::from(log));
        // A fork child's jail-init also gets the nested agent image as fd 4 and its
        // family's helper mount namespace as fd 63.
        let nested_fd = nested.map(|f| f.as_raw_fd());
        let helper_fd = helper.map(|f| f.as_raw_fd());
        // SAFETY: the hook is `place_fds`: async-signal-safe, no allocation.
        unsafe {
            cmd.pre_exec(move || place_fds(listen_fd, nested_fd, helper_fd));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::host("start jail-init", id, e))?;
        let input =
            serde_json::to_vec(init).map_err(|e| RuntimeError::host("encode jail-init", id, e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&input)
                .await
                .map_err(|e| RuntimeError::host("write jail-init config", id, e))?;
        }
        let mut out = Vec::new();
        if let Some(mut stdout) = child.stdout.take() {
            stdout
                .read_to_end(&mut out)
                .await
                .map_err(|e| RuntimeError::host("read jail-init reply", id, e))?;
        }
        let _ = child.wait().await;
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

/// The `pre_exec` hook of `jail-init`: puts the agent's listening socket on fd 3, a
/// fork child's nested agent image on fd 4 and its family's helper mount namespace on
/// fd 63. It runs between fork and exec in a
/// multi-threaded server, so it is async-signal-safe: `fcntl` and `dup2` only, on fds
/// that stay open in the parent, and no allocation (another thread may have held the
/// allocator's lock at the fork).
pub(crate) fn place_fds(
    listen_fd: i32,
    nested_fd: Option<i32>,
    helper_fd: Option<i32>,
) -> std::io::Result<()> {
    // Move them all out of the way first: any may already sit on a target number.
    let mut moved = [(-1, -1); 3];
    let mut n = 0;
    for (from, to) in [(Some(listen_fd), 3), (nested_fd, 4), (helper_fd, 63)] {
        let Some(from) = from else { continue };
        // Above every target: a copy landing on its own target would keep its
        // close-on-exec (dup2 onto itself changes nothing) and vanish at exec.
        // SAFETY: fcntl on an fd number; no memory is touched.
        let high = unsafe { libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 64) };
        if high < 0 {
            return Err(std::io::Error::last_os_error());
        }
        moved[n] = (high, to);
        n += 1;
    }
    for &(high, to) in &moved[..n] {
        // dup2 leaves the new fd without close-on-exec.
        // SAFETY: dup2 on fd numbers; no memory is touched.
        if unsafe { libc::dup2(high, to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts allocations, to prove the `pre_exec` hook makes none.
    struct Counting;
    static ALLOCS: AtomicUsize = AtomicUsize::new(0);

    // SAFETY: forwards to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
            // SAFETY: the caller's contract is passed on.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller's contract is passed on.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    fn inode(fd: i32) -> u64 {
        // SAFETY: fstat writes into a zeroed stat on our stack.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } < 0 {
            return 0;
        }
        st.st_ino
    }

    #[test]
    fn placing_jail_inits_fds_after_fork_allocates_nothing() {
        let (r1, _w1) = nix::unistd::pipe().unwrap();
        let (r2, _w2) = nix::unistd::pipe().unwrap();
        let (r3, _w3) = nix::unistd::pipe().unwrap();
        let (a, b, c) = (r1.as_raw_fd(), r2.as_raw_fd(), r3.as_raw_fd());
        let (ia, ib, ic) = (inode(a), inode(b), inode(c));
        // SAFETY: the child only calls dup2, place_fds, fstat, fcntl and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // A busy server: every number below 63 taken but two (for the copies of the
            // first two fds), so a copy of the helper fd could land on 63 itself.
            for fd in 5..63 {
                if ![a, b, c, 20, 21].contains(&fd) {
                    // SAFETY: dup2 on fd numbers of this child.
                    unsafe { libc::dup2(a, fd) };
                }
            }
            let before = ALLOCS.load(Ordering::SeqCst);
            let placed = place_fds(a, Some(b), Some(c)).is_ok();
            let allocs = ALLOCS.load(Ordering::SeqCst) - before;
            // SAFETY: fcntl(F_GETFD) on an fd number.
            let cloexec = unsafe { libc::fcntl(63, libc::F_GETFD) } & libc::FD_CLOEXEC != 0;
            let code = if !placed {
                2
            } else if allocs > 0 {
                3
            } else if inode(3) != ia || inode(4) != ib || inode(63) != ic {
                4
            } else if cloexec {
                5
            } else {
                0
            };
            // SAFETY: ends the child without running anything of the parent's.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "2: failed, 3: allocated, 4: wrong fds, 5: one would close at exec"
        );
    }
}
