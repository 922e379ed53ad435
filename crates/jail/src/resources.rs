//! What a sandbox holds on the host (root filesystem, cgroup, run directory, uid
//! range, egress link, processes) and releasing it in order.

use super::*;

/// Host resources of one sandbox, released in reverse order by [`Resources::release`].
#[derive(Default)]
pub(crate) struct Resources {
    pub(crate) id: String,
    pub(crate) rootfs: Option<PathBuf>,
    pub(crate) cgroup: Option<Cgroup>,
    pub(crate) run_dir: Option<PathBuf>,
    pub(crate) pidfd: Option<Arc<OwnedFd>>,
    pub(crate) pid: Option<i32>,
    /// The egress link's proxy (stopped when dropped; the link dies with the netns).
    pub(crate) egress: Option<forkbox_net::Attachment>,
    /// A hollow fork ancestor's agent connection, held so its dead-man's switch
    /// (which counts server connections) never fires while the server lives.
    pub(crate) keepalive: Option<AgentClient>,
    /// Its host uid range, held until its processes are gone.
    pub(crate) slot: Option<Arc<slots::Slot>>,
    /// The agent image its family's fork children start from (made by the family's
    /// first fork, owned by the range's root; `AgentImage::nested_for`).
    pub(crate) nested: Option<Arc<OwnedFd>>,
    /// The helper mount namespace its fork children's jail-init enter (made by its
    /// first fork; `Inner::helper_ns`).
    pub(crate) helper_ns: Option<Arc<OwnedFd>>,
}

impl Resources {
    /// Kills every process, then frees the cgroup, the subvolume and the run dir.
    pub(crate) async fn release(&mut self) -> Result<(), RuntimeError> {
        let id = self.id.clone();
        if let Some(fd) = &self.pidfd {
            // The PID namespace dies with its PID 1.
            // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    0usize,
                    0u32,
                )
            };
        }
        if let Some(cg) = &self.cgroup {
            let _ = cg.kill_all();
            // Frozen processes (v1) only die once thawed.
            let _ = cg.set_frozen(false);
        }
        if let Some(fd) = self.pidfd.take() {
            wait_exit(&fd, Duration::from_secs(5)).await;
            reap(&fd);
        }
        if let Some(cg) = self.cgroup.take() {
            let cg2 = cg.clone();
            let res = tokio::task::spawn_blocking(move || {
                let _ = cg2.kill_all();
                cg2.remove(Duration::from_secs(5))
            })
            .await;
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.cgroup = Some(cg);
                    return Err(RuntimeError::host("remove cgroup", &id, e));
                }
                Err(e) => return Err(RuntimeError::host("remove cgroup", &id, e)),
            }
        }
        if let Some(root) = self.rootfs.take() {
            let r = root.clone();
            let res = tokio::task::spawn_blocking(move || delete_subvolume_patiently(&r)).await;
            match res {
                Ok(Ok(())) => layers::released(&root),
                Ok(Err(e)) => {
                    self.rootfs = Some(root);
                    return Err(RuntimeError::host("delete root filesystem", &id, e));
                }
                Err(e) => return Err(RuntimeError::host("delete root filesystem", &id, e)),
            }
        }
        if let Some(d) = self.run_dir.take() {
            let _ = std::fs::remove_dir_all(&d);
        }
        self.pid = None;
        self.egress = None;
        self.keepalive = None;
        self.slot = None;
        self.nested = None;
        self.helper_ns = None;
        Ok(())
    }
}

/// A mount namespace can outlive its last process by a moment; retry briefly on EBUSY.
pub(crate) fn delete_subvolume_patiently(p: &Path) -> Result<(), forkbox_sys::btrfs::BtrfsError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match forkbox_sys::btrfs::delete_subvolume(p) {
            Ok(()) => return Ok(()),
            Err(forkbox_sys::btrfs::BtrfsError::Open(_, e))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(())
            }
            Err(forkbox_sys::btrfs::BtrfsError::Delete(_, nix::errno::Errno::EBUSY))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether process `pid` still exists (and is not a zombie).
pub(crate) fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().chars().next()))
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Waits until the process behind `fd` has exited (the pidfd turns readable).
pub(crate) async fn wait_exit(fd: &OwnedFd, patience: Duration) {
    let Ok(dup) = fd.try_clone() else { return };
    // SAFETY: `dup` is an OwnedFd moved into the AsyncFd, open for its whole lifetime.
    let Ok(afd) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    let _ = tokio::time::timeout(patience, afd.readable()).await;
}

/// Reaps the process if it is our child (it is, once `jail-init` exited, because the
/// server is a child subreaper).
pub(crate) fn reap(fd: &OwnedFd) {
    let mut info: libc::siginfo_t = {
        // SAFETY: siginfo_t is plain data; zero is a valid value.
        unsafe { std::mem::zeroed() }
    };
    // SAFETY: waitid on a pidfd with a valid siginfo buffer; P_PIDFD = 3.
    unsafe {
        libc::waitid(
            3 as libc::idtype_t,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
}

/// A flag that turns false when the process behind `pidfd` (a sandbox's first
/// process) exits: one watcher for made and adopted sandboxes alike.
pub(crate) fn watch_liveness(pidfd: &Arc<OwnedFd>) -> Arc<AtomicBool> {
    let alive = Arc::new(AtomicBool::new(true));
    let (flag, fd) = (alive.clone(), pidfd.clone());
    tokio::spawn(async move {
        wait_exit(&fd, Duration::from_secs(u64::MAX / 4)).await;
        flag.store(false, Ordering::SeqCst);
    });
    alive
}
