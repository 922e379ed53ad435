//! A running jail sandbox: the `Instance` calls (through its agent), pause and
//! resume (cgroup freezer), hibernate, snapshots, logs and destroy.

use super::*;

pub struct JailInstance {
    pub(crate) id: String,
    pub(crate) pid: i32,
    pub(crate) rootfs: PathBuf,
    pub(crate) cgroup: Cgroup,
    pub(crate) client: AgentClient,
    pub(crate) alive: Arc<AtomicBool>,
    pub(crate) resources: tokio::sync::Mutex<Resources>,
    pub(crate) rt: Arc<Inner>,
}

#[async_trait]
impl Instance for JailInstance {
    fn host_pid(&self) -> Option<i32> {
        Some(self.pid)
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn oom_kills(&self) -> u64 {
        self.cgroup.oom_kills().unwrap_or(0)
    }

    async fn exec(&self, req: ExecRequest) -> Result<AgentEvents, RuntimeError> {
        self.agent().exec(&req).await
    }

    async fn run_code(&self, req: RunCodeRequest) -> Result<AgentEvents, RuntimeError> {
        self.agent().run_code(&req).await
    }

    async fn pause(&self) -> Result<(), RuntimeError> {
        self.freeze(true).await
    }

    async fn resume(&self) -> Result<(), RuntimeError> {
        self.freeze(false).await
    }

    async fn fork(&self, children: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        match self.fork_children(children).await {
            // The parent died under the fork (its agent was killed): that is the
            // parent's failure, not the host's.
            Err(e) if !self.is_alive() || !pid_alive(self.pid) => Err(RuntimeError::Agent {
                id: self.id.clone(),
                source: format!("the sandbox's agent exited during the fork: {e}").into(),
            }),
            other => other,
        }
    }

    async fn hibernate(&self) -> Result<(), RuntimeError> {
        if self.rt.lineage().has_live_descendant(&self.id) {
            return Err(RuntimeError::Conflict(format!(
                "{} has live fork descendants, whose namespaces hang off its processes; delete or merge them first",
                self.id
            )));
        }
        self.alive.store(false, Ordering::SeqCst);
        let mut res = self.resources.lock().await;
        // Everything goes but the filesystem.
        let rootfs = res.rootfs.take();
        let released = res.release().await;
        res.rootfs = rootfs;
        let freed = self.rt.lineage().remove_and_collect(&self.id);
        for mut r in freed {
            let _ = r.release().await;
        }
        released
    }

    async fn snapshot(&self, snapshot: &str, freeze: bool) -> Result<(), RuntimeError> {
        let dst = self.rt.pool.snapshot(snapshot);
        // A layered sandbox's snapshot is its subvolume (its own writes) with the chain
        // of layers under it beside it (see `layers.rs`), written first.
        let chain_file = self.rt.pool.snapshot_chain(snapshot);
        let below = layers::read_chain(&self.rt.pool.sandbox_chain(&self.id))
            .map_err(|e| RuntimeError::host("read the sandbox's layers", &self.id, e))?;
        if let Some(below) = &below {
            layers::write_chain(&chain_file, below)
                .map_err(|e| RuntimeError::host("snapshot", &self.id, e))?;
        }
        if freeze {
            self.freeze(true).await?;
        }
        let src = self.rootfs.clone();
        let made =
            tokio::task::spawn_blocking(move || forkbox_sys::btrfs::snapshot(&src, &dst, true))
                .await;
        if freeze {
            self.freeze(false).await?;
        }
        let made = match made {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RuntimeError::host("snapshot", &self.id, e)),
            Err(e) => Err(RuntimeError::host("snapshot", &self.id, e)),
        };
        if made.is_err() && below.is_some() {
            let _ = std::fs::remove_file(&chain_file);
        }
        made
    }

    async fn logs(
        &self,
        follow: bool,
    ) -> Result<futures_util::stream::BoxStream<'static, String>, RuntimeError> {
        let path = self.rt.run_dir.join(&self.id).join("agent.log");
        forkbox_core::runtime::tail_lines(&path, follow, self.alive.clone())
            .map_err(|e| RuntimeError::host("open log", &self.id, e))
    }

    async fn watch(&self, path: &str, recursive: bool) -> Result<WatchEvents, RuntimeError> {
        self.agent().watch(path, recursive).await
    }

    async fn pty(&self, req: PtyRequest, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        self.agent().pty(&req, input).await
    }

    async fn tcp(&self, port: u16, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        self.agent().tcp(port, input).await
    }

    async fn ports(&self) -> Result<Vec<ListeningPort>, RuntimeError> {
        self.agent().ports().await
    }

    async fn bg_start(&self, req: ExecRequest) -> Result<BgInfo, RuntimeError> {
        self.agent().bg_start(&req).await
    }

    async fn bg_list(&self) -> Result<Vec<BgInfo>, RuntimeError> {
        self.agent().bg_list().await
    }

    async fn bg_stdin(&self, pid: i32, data: Bytes, close: bool) -> Result<(), RuntimeError> {
        self.agent().bg_stdin(pid, data, close).await
    }

    async fn bg_signal(&self, pid: i32, signal: i32) -> Result<(), RuntimeError> {
        self.agent().bg_signal(pid, signal).await
    }

    async fn bg_wait(&self, pid: i32) -> Result<i32, RuntimeError> {
        self.agent().bg_wait(pid).await
    }

    async fn bg_output(&self, pid: i32, follow: bool) -> Result<AgentEvents, RuntimeError> {
        self.agent().bg_output(pid, follow).await
    }

    async fn file_op(&self, op: FileOp) -> Result<FileOpReply, RuntimeError> {
        self.agent().file_op(&op).await
    }

    async fn read_file(&self, path: &str) -> Result<(Option<u64>, ByteStream), RuntimeError> {
        self.agent().read_file(path).await
    }

    async fn write_file(&self, path: &str, data: UploadStream) -> Result<WriteReply, RuntimeError> {
        self.agent().write_file(path, data).await
    }

    async fn destroy(&self) -> Result<(), RuntimeError> {
        self.alive.store(false, Ordering::SeqCst);
        let mut res = self.resources.lock().await;
        let hollow = {
            let mut lin = self.rt.lineage();
            let hollow = lin.has_live_descendant(&self.id);
            if let Some(n) = lin.nodes.get_mut(&self.id) {
                n.live = false;
            }
            hollow
        };
        if hollow {
            // Descendants' PID namespaces hang off our PID 1: keep it, end the rest.
            self.kill_all_but_agent().await;
            let mut kept = std::mem::take(&mut *res);
            kept.keepalive = Some(self.client.clone());
            let unplaced = {
                let mut lin = self.rt.lineage();
                match lin.nodes.get_mut(&self.id) {
                    Some(n) => {
                        n.hollow = Some(kept);
                        None
                    }
                    None => Some(kept),
                }
            };
            if let Some(kept) = unplaced {
                *res = kept;
                return res.release().await;
            }
            tracing::info!(sandbox = %self.id, "kept hollow until its fork descendants end");
            return Ok(());
        }
        let mine = res.release().await;
        let freed = self.rt.lineage().remove_and_collect(&self.id);
        for mut r in freed {
            let id = r.id.clone();
            if let Err(e) = r.release().await {
                tracing::error!(sandbox = %id, error = %e, "releasing a hollow fork ancestor");
            } else {
                tracing::info!(sandbox = %id, "released a hollow fork ancestor");
            }
        }
        mine
    }
}

/// Inode numbers of the PID namespace of `pid` and of each of its ancestors (as far as
/// this process may see), nearest first.
pub(crate) fn pidns_chain(pid: i32) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt as _;
    const NS_GET_PARENT: libc::c_ulong = 0xb702;
    let mut out = Vec::new();
    let Ok(mut cur) = std::fs::File::open(format!("/proc/{pid}/ns/pid")) else {
        return out;
    };
    while out.len() < 40 {
        match cur.metadata() {
            Ok(m) => out.push(m.ino()),
            Err(_) => break,
        }
        // SAFETY: NS_GET_PARENT on a namespace fd we own; returns a new fd or -1.
        let fd = unsafe { libc::ioctl(cur.as_raw_fd(), NS_GET_PARENT) };
        if fd < 0 {
            break;
        }
        // SAFETY: a fresh fd we own.
        cur = unsafe { std::fs::File::from_raw_fd(fd) };
    }
    out
}

/// The `NSpid` line of `/proc/<pid>/status`: the pid in each PID namespace from the
/// host's down to the process's own.
pub(crate) fn nspid(pid: i32) -> std::io::Result<Vec<i32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .ok_or_else(|| std::io::Error::other("no NSpid line"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

pub(crate) fn pidns_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

pub(crate) fn token() -> String {
    use rand::Rng as _;
    let mut b = [0u8; 24];
    rand::thread_rng().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl JailInstance {
    /// Its agent, for the calls every runtime makes alike (`forkbox_agent_calls`).
    pub(crate) fn agent(&self) -> forkbox_agent_calls::Agent<'_> {
        forkbox_agent_calls::Agent::new(&self.id, &self.client)
    }
}

impl JailInstance {
    /// Kills every process in the sandbox but its PID 1.
    pub(crate) async fn kill_all_but_agent(&self) {
        let cg = self.cgroup.clone();
        let agent = self.pid;
        let _ = tokio::task::spawn_blocking(move || {
            for _ in 0..50 {
                let pids = cg.pids().unwrap_or_default();
                let others: Vec<i32> = pids.into_iter().filter(|p| *p != agent).collect();
                if others.is_empty() {
                    return;
                }
                for p in others {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
        .await;
    }

    pub(crate) async fn freeze(&self, frozen: bool) -> Result<(), RuntimeError> {
        let cg = self.cgroup.clone();
        let op = if frozen { "freeze" } else { "thaw" };
        tokio::task::spawn_blocking(move || cg.set_frozen(frozen))
            .await
            .map_err(|e| RuntimeError::host(op, &self.id, e))?
            .map_err(|e| RuntimeError::host(op, &self.id, e))
    }
}
