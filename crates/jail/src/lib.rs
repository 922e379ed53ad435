//! The `jail` runtime: each sandbox is a process tree in fresh user, mount, PID,
//! network, IPC, UTS and cgroup namespaces, rooted in a btrfs snapshot of its template,
//! limited by cgroups, with seccomp and no capabilities for user code.
//!
//! Host-side order of a create (each step undone if a later one fails):
//! 1. snapshot the template's subvolume (O(1), copy-on-write);
//! 2. create the cgroup with memory, pids and CPU limits;
//! 3. bind the agent's listening socket in the sandbox's run directory;
//! 4. run `forkbox-agent jail-init` from the sealed agent image, which clones the
//!    sandbox's first process (see the agent's `jail_init` for the sandbox side);
//! 5. open a pidfd on that process and connect to its agent over HTTP/2.

pub mod agent_image;
pub mod build;
pub mod pool;
pub mod slots;
pub mod template;
pub mod volumes;

use agent_image::AgentImage;
use async_trait::async_trait;
use bytes::Bytes;
use forkbox_agent_client::AgentClient;
use forkbox_core::runtime::{
    AgentEvents, ByteStream, CreateSpec, Forked, GcReport, Instance, Runtime, RuntimeError,
    TemplateInfo, TemplateSpec, UploadStream,
};
pub use forkbox_sys::btrfs::QuotaMode;
use forkbox_sys::cgroup::{Cgroup, Driver, Limits};
use forkbox_types::agent::{
    AdoptRequest, BgInfo, ExecRequest, FileOp, FileOpReply, ForkChild, ForkRequest, JailInit,
    JailInitReply, ListeningPort, PtyRequest, RunCodeRequest, WriteReply,
};
use futures_util::StreamExt;
use pool::Pool;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How the jail runtime is set up on this host.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Where sockets and agent logs of running sandboxes live.
    pub run_dir: PathBuf,
    /// The btrfs pool (templates and sandboxes' root filesystems).
    pub pool_dir: PathBuf,
    /// Size of the sparse pool image when the pool dir is not on btrfs.
    pub pool_size_gb: u64,
    /// The static `forkbox-agent` binary.
    pub agent_bin: PathBuf,
    /// Host uid (and gid) that root inside sandboxes maps to.
    pub uid_base: u32,
    /// The cgroup filesystem's mount point.
    pub cgroup_root: PathBuf,
    /// Remount the cgroup2 hierarchy with `favordynmods` (see
    /// `forkbox_sys::cgroup::enable_favordynmods`).
    pub favordynmods: bool,
    /// Where egress sandboxes' links and proxies live (made on first use).
    pub egress: forkbox_net::EgressConfig,
    /// Debian packages of each template forkbox may build, by name.
    pub recipes: std::collections::BTreeMap<String, Vec<String>>,
    /// Where volumes' images and mount points live.
    pub volumes_dir: PathBuf,
    /// How each sandbox gets a disk limit (btrfs quota mode of the pool).
    pub disk_limits: QuotaMode,
    /// The dead-man's switch: a sandbox ends itself after this long without a
    /// server (`None`: never).
    pub orphan_grace: Option<Duration>,
    /// The server's data dir (named in the host-wide uid range registry).
    pub data_dir: PathBuf,
    /// The host-wide registry of sandbox uid ranges (`slots.rs`), shared by every
    /// server on the host.
    pub uid_registry: PathBuf,
}

/// Where servers lease sandbox uid ranges unless configured otherwise.
pub const UID_REGISTRY: &str = "/run/forkbox/uid-blocks";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Pool(#[from] pool::PoolError),
    #[error(transparent)]
    Image(#[from] agent_image::ImageError),
    #[error(transparent)]
    Cgroup(#[from] forkbox_sys::cgroup::CgroupError),
    #[error("create {0}: {1}")]
    RunDir(PathBuf, std::io::Error),
    #[error("the jail runtime needs root (run forkbox serve as root)")]
    NotRoot,
    #[error(transparent)]
    Slots(#[from] slots::SlotError),
    #[error("--uid-base {0} leaves no room for the sandboxes' uid ranges (at most {max})", max = u32::MAX - (slots::MAX_SLOTS + 1) * forkbox_sys::uidshift::RANGE)]
    UidBase(u32),
}

pub struct JailRuntime {
    inner: Arc<Inner>,
}

/// What the runtime and its instances share.
struct Inner {
    pool: Pool,
    cgroups: Driver,
    /// `None` in a runtime opened only to clean up ([`JailRuntime::for_cleanup`]).
    agent: Option<AgentImage>,
    run_dir: PathBuf,
    uid_base: u32,
    lineage: std::sync::Mutex<Lineage>,
    egress_cfg: forkbox_net::EgressConfig,
    egress: tokio::sync::OnceCell<Arc<forkbox_net::Egress>>,
    recipes: std::collections::BTreeMap<String, Vec<String>>,
    volumes: volumes::Volumes,
    orphan_grace: Option<Duration>,
    /// Host uid ranges of running sandboxes (`slots.rs`).
    slots: slots::Slots,
}

/// Fork ancestry of live sandboxes, by runtime key (the id a sandbox was made with).
///
/// A fork child's PID namespace is nested in its parent's, so the parent's PID 1 must
/// outlive every descendant: a parent destroyed while descendants live is made
/// *hollow* (every process but its agent killed, its resources kept) and released with
/// the last of them.
#[derive(Default)]
struct Lineage {
    nodes: HashMap<String, Node>,
}

struct Node {
    parent: Option<String>,
    /// Host pid of its PID 1.
    agent: Option<i32>,
    live: bool,
    /// Resources of a hollow sandbox, released once no descendant lives.
    hollow: Option<Resources>,
}

impl Lineage {
    fn has_live_descendant(&self, key: &str) -> bool {
        self.nodes.iter().any(|(k, n)| {
            n.live && k != key && {
                let mut up = n.parent.as_deref();
                let mut found = false;
                while let Some(p) = up {
                    if p == key {
                        found = true;
                        break;
                    }
                    up = self.nodes.get(p).and_then(|n| n.parent.as_deref());
                }
                found
            }
        })
    }

    /// Removes `key` and every hollow ancestor left without live descendants; returns
    /// the hollow ancestors' resources for release.
    fn remove_and_collect(&mut self, key: &str) -> Vec<Resources> {
        let mut freed = Vec::new();
        let mut up = self.nodes.remove(key).and_then(|n| n.parent);
        while let Some(p) = up {
            let done = match self.nodes.get(&p) {
                Some(n) => !n.live && !self.has_live_descendant(&p),
                None => false,
            };
            if !done {
                break;
            }
            let Some(node) = self.nodes.remove(&p) else {
                break;
            };
            freed.extend(node.hollow);
            up = node.parent;
        }
        freed
    }

    /// Depth of `key` in its fork tree (0 for a sandbox made from a template).
    fn depth(&self, key: &str) -> usize {
        let mut d = 0;
        let mut up = self.nodes.get(key).and_then(|n| n.parent.as_deref());
        while let Some(p) = up {
            d += 1;
            up = self.nodes.get(p).and_then(|n| n.parent.as_deref());
        }
        d
    }
}

/// Nesting limit of user and PID namespaces is 32 levels; a sandbox uses one and the
/// host's is level 0.
const MAX_FORK_DEPTH: usize = 30;

impl JailRuntime {
    pub fn new(cfg: &JailConfig) -> Result<JailRuntime, JailError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(JailError::NotRoot);
        }
        let pool = Pool::open(&cfg.pool_dir, cfg.pool_size_gb, cfg.disk_limits)?;
        let cgroups = Driver::detect(&cfg.cgroup_root, "forkbox")?;
        if cfg.favordynmods {
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            match forkbox_sys::cgroup::enable_favordynmods(&info) {
                Ok(Some(p)) => {
                    tracing::info!(mount = %p.display(), "enabled cgroup favordynmods (fast sandbox creation)")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not enable cgroup favordynmods; creates will be slower")
                }
            }
        }
        if cfg
            .uid_base
            .checked_add((slots::MAX_SLOTS + 1) * forkbox_sys::uidshift::RANGE)
            .is_none()
        {
            return Err(JailError::UidBase(cfg.uid_base));
        }
        let agent = Some(AgentImage::load(&cfg.agent_bin)?);
        std::fs::create_dir_all(&cfg.run_dir)
            .map_err(|e| JailError::RunDir(cfg.run_dir.clone(), e))?;
        // Orphaned sandbox processes become our children, so we can reap them.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        tracing::info!(
            pool = %pool.root().display(),
            cgroup_version = cgroups.version(),
            uid_base = cfg.uid_base,
            "jail runtime ready"
        );
        Ok(JailRuntime {
            inner: Arc::new(Inner {
                pool,
                cgroups,
                agent,
                run_dir: cfg.run_dir.clone(),
                uid_base: cfg.uid_base,
                lineage: Default::default(),
                egress_cfg: build::with_mirrors(&cfg.egress),
                egress: tokio::sync::OnceCell::new(),
                recipes: cfg.recipes.clone(),
                volumes: volumes::Volumes::new(&cfg.volumes_dir, cfg.uid_base),
                orphan_grace: cfg.orphan_grace,
                slots: slots::Slots::open(cfg.uid_base, &cfg.uid_registry, &cfg.data_dir)?,
            }),
        })
    }

    /// A runtime that only frees what sandboxes of `cfg`'s data dir left (`forkbox
    /// down`, the warden): it creates nothing, needs no agent binary, and neither
    /// makes nor mounts the pool (an unmounted pool holds no running sandbox).
    pub fn for_cleanup(cfg: &JailConfig) -> Result<JailRuntime, JailError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(JailError::NotRoot);
        }
        Ok(JailRuntime {
            inner: Arc::new(Inner {
                pool: Pool::attach(&cfg.pool_dir),
                cgroups: Driver::detect(&cfg.cgroup_root, "forkbox")?,
                agent: None,
                run_dir: cfg.run_dir.clone(),
                uid_base: cfg.uid_base,
                lineage: Default::default(),
                egress_cfg: cfg.egress.clone(),
                egress: tokio::sync::OnceCell::new(),
                recipes: cfg.recipes.clone(),
                volumes: volumes::Volumes::new(&cfg.volumes_dir, cfg.uid_base),
                orphan_grace: cfg.orphan_grace,
                slots: slots::Slots::detached(cfg.uid_base),
            }),
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Host-side leftovers of a server that destroyed its sandboxes at exit: the egress
    /// namespace and the volumes' mounts (their data stays).
    pub async fn release_host_resources(&self) -> Vec<String> {
        let mut done = Vec::new();
        if forkbox_net::remove_netns(&self.inner.egress_cfg.netns).await {
            done.push(format!(
                "removed network namespace {}",
                self.inner.egress_cfg.netns
            ));
        }
        for m in self.inner.volumes.unmount_all().await {
            done.push(format!("unmounted volume {}", m.display()));
        }
        done
    }

    pub fn cgroups(&self) -> &Driver {
        &self.inner.cgroups
    }

    /// Builds `template` if missing, reporting progress through `progress`.
    pub async fn ensure_template(
        &self,
        name: &str,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<template::TemplateMeta, template::TemplateError> {
        self.inner.ensure_template(name, progress).await
    }
}

impl Inner {
    async fn ensure_template(
        &self,
        name: &str,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<template::TemplateMeta, template::TemplateError> {
        let recipe = self.recipes.get(name).map(Vec::as_slice);
        template::ensure(&self.pool, name, recipe, self.uid_base, progress).await
    }

    /// The slot of a running sandbox found after a restart, from its agent's
    /// `uid_map`: held so no new family gets the range while it runs.
    fn claim_slot(&self, pid: i32) -> Option<Arc<slots::Slot>> {
        let host = match forkbox_sys::idmap::host_root_of(pid) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(pid, error = %e, "reading a sandbox's uid map");
                return None;
            }
        };
        match self.slots.claim(host) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(pid, error = %e, "a running sandbox outside the uid ranges");
                None
            }
        }
    }

    /// Starts tracking a live sandbox in the fork lineage.
    fn track(&self, id: &str, parent: Option<String>, agent: Option<i32>) {
        self.lineage().nodes.insert(
            id.to_owned(),
            Node {
                parent,
                agent,
                live: true,
                hollow: None,
            },
        );
    }

    fn lineage(&self) -> std::sync::MutexGuard<'_, Lineage> {
        match self.lineage.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Host resources of one sandbox, released in reverse order by [`Resources::release`].
#[derive(Default)]
struct Resources {
    id: String,
    rootfs: Option<PathBuf>,
    cgroup: Option<Cgroup>,
    run_dir: Option<PathBuf>,
    pidfd: Option<Arc<OwnedFd>>,
    pid: Option<i32>,
    /// The egress link's proxy (stopped when dropped; the link dies with the netns).
    egress: Option<forkbox_net::Attachment>,
    /// A hollow fork ancestor's agent connection, held so its dead-man's switch
    /// (which counts server connections) never fires while the server lives.
    keepalive: Option<AgentClient>,
    /// Its host uid range, held until its processes are gone.
    slot: Option<Arc<slots::Slot>>,
    /// The agent image its family's fork children start from (made by the family's
    /// first fork, owned by the range's root; `AgentImage::nested_for`).
    nested: Option<Arc<OwnedFd>>,
}

impl Resources {
    /// Kills every process, then frees the cgroup, the subvolume and the run dir.
    async fn release(&mut self) -> Result<(), RuntimeError> {
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
                Ok(Ok(())) => {}
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
        Ok(())
    }
}

/// A mount namespace can outlive its last process by a moment; retry briefly on EBUSY.
fn delete_subvolume_patiently(p: &Path) -> Result<(), forkbox_sys::btrfs::BtrfsError> {
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
fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().chars().next()))
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Waits until the process behind `fd` has exited (the pidfd turns readable).
async fn wait_exit(fd: &OwnedFd, patience: Duration) {
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
fn reap(fd: &OwnedFd) {
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

#[async_trait]
impl Runtime for JailRuntime {
    fn name(&self) -> &'static str {
        "jail"
    }

    async fn prepare_template(&self, template: &str) -> Result<(), RuntimeError> {
        self.inner.prepare_template(template).await
    }

    async fn cleanup(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.cleanup_in(id).await
    }

    async fn release_host(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.release_host_resources().await)
    }

    async fn wake(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError> {
        let inst = self.inner.start(spec, Origin::Existing).await?;
        self.inner.track(&spec.id, None, inst.host_pid());
        Ok(inst)
    }

    async fn adopt(
        &self,
        spec: &CreateSpec,
        host_pid: i32,
        paused: bool,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        let inst: Arc<dyn Instance> = self.inner.adopt(spec, host_pid, paused).await?;
        self.inner.track(&spec.id, None, inst.host_pid());
        Ok(inst)
    }

    async fn collect_garbage(
        &self,
        keep: &std::collections::HashSet<String>,
        candidates: Vec<String>,
    ) -> Result<GcReport, RuntimeError> {
        self.inner.collect_garbage(keep, candidates).await
    }

    async fn create_volume(&self, id: &str, size_mb: u64) -> Result<(), RuntimeError> {
        self.inner
            .volumes
            .create(id, size_mb)
            .await
            .map_err(|e| RuntimeError::host("create volume", id, e))
    }

    async fn delete_volume(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.volumes.delete(id).await.map_err(|e| match e {
            volumes::VolumeError::Busy(_) => RuntimeError::Conflict(e.to_string()),
            other => RuntimeError::host("delete volume", id, other),
        })
    }

    async fn volume_used(&self, id: &str) -> Option<u64> {
        self.inner.volumes.used(id)
    }

    async fn delete_snapshot(&self, snapshot: &str) -> Result<(), RuntimeError> {
        let p = self.inner.pool.snapshot(snapshot);
        tokio::task::spawn_blocking(move || delete_subvolume_patiently(&p))
            .await
            .map_err(|e| RuntimeError::host("delete snapshot", snapshot, e))?
            .map_err(|e| RuntimeError::host("delete snapshot", snapshot, e))
    }

    async fn template_info(&self, template: &str) -> Option<TemplateInfo> {
        let m = template::built(&self.inner.pool, template, self.inner.uid_base)?;
        Some(self.inner.info(m))
    }

    async fn templates(&self) -> Vec<TemplateInfo> {
        template::list(&self.inner.pool, self.inner.uid_base)
            .into_iter()
            .map(|m| self.inner.info(m))
            .collect()
    }

    async fn build_template(
        &self,
        spec: &TemplateSpec,
        progress: forkbox_core::runtime::Progress,
    ) -> Result<TemplateInfo, RuntimeError> {
        self.inner
            .build_template(spec, progress)
            .await
            .map(|m| self.inner.info(m))
            .map_err(|e| e.into_runtime(&spec.name))
    }

    async fn template_log(&self, template: &str) -> Option<String> {
        std::fs::read_to_string(self.inner.pool.template_log(template)).ok()
    }

    async fn delete_template(&self, template: &str) -> Result<(), RuntimeError> {
        self.inner
            .delete_template(template)
            .await
            .map_err(|e| e.into_runtime(template))
    }

    async fn create(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError> {
        let inst = self.inner.start(spec, Origin::Template).await?;
        self.inner.track(&spec.id, None, inst.host_pid());
        Ok(inst)
    }
}

/// Where a new sandbox's root filesystem and REPL come from.
enum Origin {
    /// A fresh snapshot of the spec's template (or of its named snapshot).
    Template,
    /// The filesystem is already there: a hibernated sandbox woken up.
    Existing,
    /// A fork child: its root filesystem is already in place; its namespaces nest in the
    /// parent's (whose agent has this host pid) and it waits for a REPL copy.
    Fork {
        parent_pid: i32,
        token: String,
        /// Snapshot of the parent to take the root filesystem from.
        from: PathBuf,
        /// The parent's host uid range (the family's).
        slot: Arc<slots::Slot>,
        /// The agent image for the child's second jail-init stage, owned by the
        /// family's root (see `AgentImage::nested_for`).
        nested: Arc<OwnedFd>,
    },
}

impl Inner {
    fn info(&self, m: template::TemplateMeta) -> TemplateInfo {
        TemplateInfo {
            path: self.pool.template(&m.name).display().to_string(),
            name: m.name,
            size_bytes: m.size_bytes,
            packages: m.packages,
            built_at: m.built_at,
            base: m.base,
            run: m.run,
            env: m.env,
            workdir: m.workdir,
            build_seconds: m.build_seconds,
        }
    }

    async fn prepare_template(&self, template: &str) -> Result<(), RuntimeError> {
        let name = template.to_owned();
        self.ensure_template(template, &move |line: &str| {
            tracing::info!(template = %name, "{line}");
        })
        .await
        .map(|_| ())
        .map_err(|e| match e {
            template::TemplateError::Unknown(n) => RuntimeError::UnknownTemplate(n),
            other => RuntimeError::host("prepare template", template, other),
        })
    }

    /// Makes one running sandbox; everything made is undone if a step fails.
    async fn start(
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

    async fn collect_garbage(
        &self,
        keep: &std::collections::HashSet<String>,
        candidates: Vec<String>,
    ) -> Result<GcReport, RuntimeError> {
        let mut report = GcReport::default();
        let mut cands: std::collections::BTreeSet<String> = candidates.into_iter().collect();
        if let Ok(rd) = std::fs::read_dir(&self.run_dir) {
            cands.extend(
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned)),
            );
        }
        // PID-namespace ancestry of every live sandbox, nearest first.
        let live: Vec<(String, Vec<u64>)> = {
            let lin = self.lineage();
            lin.nodes
                .iter()
                .filter(|(_, n)| n.live)
                .filter_map(|(id, n)| n.agent.map(|p| (id.clone(), pidns_chain(p))))
                .collect()
        };
        let mut hollow: Vec<(String, u64)> = Vec::new();
        for c in &cands {
            if keep.contains(c) || c.contains('/') || c.starts_with('.') || c.is_empty() {
                continue;
            }
            let Ok(cg) = self.cgroups.open(c) else {
                continue;
            };
            let rootfs = self.pool.sandbox(c);
            let run = self.run_dir.join(c);
            let (has_cg, has_fs, has_run) = (cg.exists(), rootfs.exists(), run.exists());
            let staged = self
                .pool
                .root()
                .join("sandboxes")
                .join(format!("{}{c}", forkbox_sys::btrfs::STAGING_PREFIX))
                .exists();
            if !(has_cg || has_fs || has_run || staged) {
                continue;
            }
            // A hollow fork ancestor whose PID 1 live sandboxes hang off: keep it.
            let pid1 = cg
                .pids()
                .unwrap_or_default()
                .into_iter()
                .find(|p| nspid(*p).ok().and_then(|v| v.last().copied()) == Some(1));
            if let Some(p1) = pid1 {
                let ino = pidns_chain(p1).first().copied();
                if let Some(ino) = ino.filter(|i| live.iter().any(|(_, ch)| ch[1..].contains(i))) {
                    let keepalive = AgentClient::connect_unix(&run.join("agent.sock"))
                        .await
                        .ok();
                    let res = Resources {
                        id: c.clone(),
                        rootfs: has_fs.then_some(rootfs),
                        cgroup: Some(cg),
                        run_dir: has_run.then_some(run),
                        pidfd: forkbox_sys::pidfd::open(p1).ok().map(Arc::new),
                        pid: Some(p1),
                        egress: None,
                        keepalive,
                        slot: self.claim_slot(p1),
                        nested: None,
                    };
                    self.lineage().nodes.insert(
                        c.clone(),
                        Node {
                            parent: None,
                            agent: Some(p1),
                            live: false,
                            hollow: Some(res),
                        },
                    );
                    hollow.push((c.clone(), ino));
                    report.kept += 1;
                    continue;
                }
            }
            match self.cleanup_in(c).await {
                Ok(()) => report.freed += 1,
                Err(e) => tracing::warn!(sandbox = %c, error = %e, "garbage collection"),
            }
        }
        // Re-link the lineage: each sandbox's parent is its nearest hollow ancestor.
        {
            let mut lin = self.lineage();
            let chains: Vec<(String, Vec<u64>)> = live
                .into_iter()
                .chain(hollow.iter().filter_map(|(h, _)| {
                    lin.nodes
                        .get(h)
                        .and_then(|n| n.agent)
                        .map(|p| (h.clone(), pidns_chain(p)))
                }))
                .collect();
            for (id, chain) in chains {
                let nearest = chain.iter().skip(1).find_map(|ino| {
                    hollow
                        .iter()
                        .find(|(_, i)| i == ino)
                        .map(|(h, _)| h.clone())
                });
                if let (Some(h), Some(n)) = (nearest, lin.nodes.get_mut(&id)) {
                    if n.parent.is_none() {
                        n.parent = Some(h);
                    }
                }
            }
        }
        // Snapshots a crash left in their private directory before renaming them into
        // place (a minute old: never one being taken now).
        for dir in ["sandboxes", "snapshots", "templates"] {
            report.staging += forkbox_sys::btrfs::remove_stale_staging(
                &self.pool.root().join(dir),
                forkbox_sys::btrfs::STALE_STAGING,
            );
        }
        // Staging snapshots of forks this server's sandboxes were making.
        if let Ok(rd) = std::fs::read_dir(self.pool.root().join("sandboxes")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(".fork-") else {
                    continue;
                };
                let owner = rest.rsplit_once('-').map(|(o, _)| o).unwrap_or("");
                if (cands.contains(owner) || keep.contains(owner))
                    && delete_subvolume_patiently(&e.path()).is_ok()
                {
                    report.staging += 1;
                }
            }
        }
        Ok(report)
    }

    /// Reconnects to a sandbox an earlier server started: its PID 1 must still be a
    /// `forkbox-agent` in the sandbox's cgroup, and answer on its socket.
    async fn adopt(
        self: &Arc<Self>,
        spec: &CreateSpec,
        pid: i32,
        paused: bool,
    ) -> Result<Arc<JailInstance>, RuntimeError> {
        let id = spec.id.as_str();
        let gone = |why: String| RuntimeError::Unavailable(why);
        let pidfd = Arc::new(
            forkbox_sys::pidfd::open(pid).map_err(|e| gone(format!("process {pid}: {e}")))?,
        );
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if comm.trim() != "forkbox-agent" || !cgroups.contains(&format!("/{id}\n")) {
            return Err(gone(format!("process {pid} is no longer its agent")));
        }
        let cgroup = self
            .cgroups
            .open(id)
            .map_err(|e| RuntimeError::host("open cgroup", id, e))?;
        let run = self.run_dir.join(id);
        let client = AgentClient::connect_unix(&run.join("agent.sock"))
            .await
            .map_err(|e| gone(format!("its agent does not answer: {e}")))?;
        if !paused {
            match tokio::time::timeout(Duration::from_secs(5), client.health()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(gone(format!("its agent does not answer: {e}"))),
                Err(_) => return Err(gone("its agent does not answer".into())),
            }
        }
        let rootfs = self.pool.sandbox(id);
        let slot = self.claim_slot(pid);
        // The link survived with the sandbox; its proxy did not: link it afresh.
        let egress = self.attach_egress(spec, pid).await?;
        let alive = Arc::new(AtomicBool::new(true));
        {
            let alive = alive.clone();
            let fd = pidfd.clone();
            tokio::spawn(async move {
                wait_exit(&fd, Duration::from_secs(u64::MAX / 4)).await;
                alive.store(false, Ordering::SeqCst);
            });
        }
        Ok(Arc::new(JailInstance {
            id: id.to_owned(),
            pid,
            rootfs: rootfs.clone(),
            cgroup: cgroup.clone(),
            client,
            alive,
            resources: tokio::sync::Mutex::new(Resources {
                id: id.to_owned(),
                rootfs: Some(rootfs),
                cgroup: Some(cgroup),
                run_dir: Some(run),
                pidfd: Some(pidfd),
                pid: Some(pid),
                egress,
                keepalive: None,
                slot,
                nested: None,
            }),
            rt: self.clone(),
        }))
    }

    /// Links a sandbox with an allowlist to its egress proxy; `None` without one.
    async fn attach_egress(
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
            .attach(&spec.id, pid, allow)
            .await
            .map(Some)
            .map_err(|e| RuntimeError::host("link the sandbox to its egress proxy", &spec.id, e))
    }

    async fn cleanup_in(&self, id: &str) -> Result<(), RuntimeError> {
        // A snapshot of it a crash left in its staging directory (it is ours and
        // nothing else makes one under this name while we clean up).
        let sandboxes = self.pool.root().join("sandboxes");
        let mut staging = std::ffi::OsString::from(forkbox_sys::btrfs::STAGING_PREFIX);
        staging.push(id);
        let staging = sandboxes.join(staging);
        if staging.exists() {
            let (inner, dir) = (staging.join(id), staging.clone());
            tokio::task::spawn_blocking(move || {
                if inner.exists() {
                    delete_subvolume_patiently(&inner)?;
                }
                let _ = std::fs::remove_dir(&dir);
                Ok::<_, forkbox_sys::btrfs::BtrfsError>(())
            })
            .await
            .map_err(|e| RuntimeError::host("delete staging snapshot", id, e))?
            .map_err(|e| RuntimeError::host("delete staging snapshot", id, e))?;
        }
        let cgroup = self
            .cgroups
            .open(id)
            .map_err(|e| RuntimeError::host("open cgroup", id, e))?;
        let rootfs = self.pool.sandbox(id);
        let run_dir = self.run_dir.join(id);
        let mut res = Resources {
            id: id.to_owned(),
            rootfs: rootfs.exists().then_some(rootfs),
            cgroup: cgroup.exists().then_some(cgroup),
            run_dir: run_dir.exists().then_some(run_dir),
            pidfd: None,
            pid: None,
            egress: None,
            keepalive: None,
            slot: None,
            nested: None,
        };
        res.release().await
    }

    async fn create_in(
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
        // 1. Root filesystem.
        let rootfs = self.pool.sandbox(id);
        if let Origin::Fork { from, .. } = &origin {
            // On a blocking thread: a fork's children snapshot at once, and snapshots
            // taken together share btrfs transaction commits.
            let (from, to) = (from.clone(), rootfs.clone());
            tokio::task::spawn_blocking(move || forkbox_sys::btrfs::snapshot(&from, &to, false))
                .await
                .map_err(|e| RuntimeError::host("snapshot parent", id, e))?
                .map_err(|e| RuntimeError::host("snapshot parent", id, e))?;
            res.rootfs = Some(rootfs.clone());
        }
        if let Origin::Existing = origin {
            if !rootfs.exists() {
                return Err(RuntimeError::Conflict(format!(
                    "the filesystem of {id} is gone; it cannot be woken"
                )));
            }
            res.rootfs = Some(rootfs.clone());
        }
        if let (Origin::Template, Some(snap)) = (&origin, &spec.snapshot) {
            let from = self.pool.snapshot(snap);
            forkbox_sys::btrfs::snapshot(&from, &rootfs, false)
                .map_err(|e| RuntimeError::host("copy snapshot", id, e))?;
            res.rootfs = Some(rootfs.clone());
        } else if let Origin::Template = origin {
            let template = self.pool.template(&spec.template);
            if !self.pool.template_meta(&spec.template).exists() {
                if self.recipes.contains_key(&spec.template) {
                    self.prepare_template(&spec.template).await?;
                } else {
                    return Err(RuntimeError::UnknownTemplate(spec.template.clone()));
                }
            }
            forkbox_sys::btrfs::snapshot(&template, &rootfs, false)
                .map_err(|e| RuntimeError::host("snapshot template", id, e))?;
            res.rootfs = Some(rootfs.clone());
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
        let (fork_of, adopt_token, nested) = match origin {
            Origin::Template | Origin::Existing => {
                let slot = self
                    .slots
                    .allocate()
                    .map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
                res.slot = Some(slot);
                (None, None, None)
            }
            Origin::Fork {
                parent_pid,
                token,
                slot,
                nested,
                ..
            } => {
                res.slot = Some(slot);
                res.nested = Some(nested.clone());
                (Some(parent_pid), Some(token), Some(nested))
            }
        };
        let host_uid = res.slot.as_ref().map(|s| s.host_uid());
        // Volume targets pass through nothing the sandbox's own filesystem could have
        // made a symlink (a snapshot or wake of a filesystem its code wrote); jail-init
        // enforces it again when it mounts (`forkbox_sys::mounts::dir_beneath`), this
        // makes it a clear refusal.
        if !spec.volumes.is_empty() {
            let root_fd: OwnedFd = std::fs::File::open(&rootfs)
                .map_err(|e| RuntimeError::host("open root filesystem", id, e))?
                .into();
            for v in &spec.volumes {
                let target = Path::new(&v.mount);
                forkbox_sys::mounts::dir_beneath(&root_fd, target, target, false)
                    .map_err(|e| RuntimeError::Rejected(e.to_string()))?;
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
            binds,
            // Half the memory limit: a full /tmp leaves room to run.
            tmp_size: Some((spec.memory_bytes / 2).max(8 << 20)),
            orphan_grace_s: self.orphan_grace.map(|g| g.as_secs().max(1)),
        };
        let pid = self
            .run_jail_init(id, &init, listener.as_raw_fd(), nested.as_deref(), log)
            .await?;
        drop(listener);
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
        let alive = Arc::new(AtomicBool::new(true));
        {
            let alive = alive.clone();
            let fd = pidfd.clone();
            tokio::spawn(async move {
                wait_exit(&fd, Duration::from_secs(u64::MAX / 4)).await;
                alive.store(false, Ordering::SeqCst);
            });
        }
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

    async fn run_jail_init(
        &self,
        id: &str,
        init: &JailInit,
        listen_fd: i32,
        nested: Option<&OwnedFd>,
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
        // A fork child's jail-init also gets the nested agent image as fd 4.
        let nested_fd = nested.map(|f| f.as_raw_fd());
        // SAFETY: the hook is `place_fds`: async-signal-safe, no allocation.
        unsafe {
            cmd.pre_exec(move || place_fds(listen_fd, nested_fd));
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

pub struct JailInstance {
    id: String,
    pid: i32,
    rootfs: PathBuf,
    cgroup: Cgroup,
    client: AgentClient,
    alive: Arc<AtomicBool>,
    resources: tokio::sync::Mutex<Resources>,
    rt: Arc<Inner>,
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
        self.events(self.client.exec(&req).await)
    }

    async fn run_code(&self, req: RunCodeRequest) -> Result<AgentEvents, RuntimeError> {
        self.events(self.client.run_code(&req).await)
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
        match made {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RuntimeError::host("snapshot", &self.id, e)),
            Err(e) => Err(RuntimeError::host("snapshot", &self.id, e)),
        }
    }

    async fn logs(
        &self,
        follow: bool,
    ) -> Result<futures_util::stream::BoxStream<'static, String>, RuntimeError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.rt.run_dir.join(&self.id).join("agent.log");
        let mut f =
            std::fs::File::open(&path).map_err(|e| RuntimeError::host("open log", &self.id, e))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(64 * 1024);
        f.seek(SeekFrom::Start(start))
            .map_err(|e| RuntimeError::host("read log", &self.id, e))?;
        let alive = self.alive.clone();
        let state = (
            f,
            Vec::<u8>::new(),
            std::collections::VecDeque::<String>::new(),
            start > 0,
        );
        Ok(futures_util::stream::unfold(
            state,
            move |(mut f, mut partial, mut ready, mut skip_first)| {
                let alive = alive.clone();
                async move {
                    loop {
                        if let Some(l) = ready.pop_front() {
                            return Some((l, (f, partial, ready, skip_first)));
                        }
                        let mut buf = vec![0u8; 16 * 1024];
                        let n = f.read(&mut buf).unwrap_or(0);
                        if n > 0 {
                            partial.extend_from_slice(&buf[..n]);
                            while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                                let line: Vec<u8> = partial.drain(..=i).collect();
                                if std::mem::take(&mut skip_first) {
                                    continue; // cut in the middle by the 64 KiB window
                                }
                                ready.push_back(
                                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                                );
                            }
                            continue;
                        }
                        if !follow || !alive.load(Ordering::SeqCst) {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            },
        )
        .boxed())
    }

    async fn watch(
        &self,
        path: &str,
        recursive: bool,
    ) -> Result<forkbox_core::runtime::WatchEvents, RuntimeError> {
        let stream = self
            .client
            .watch(path, recursive)
            .await
            .map_err(|e| self.file_err(e))?;
        Ok(self.agent_stream(stream))
    }

    async fn pty(&self, req: PtyRequest, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        let input =
            input.map(|r| r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>));
        let stream = self
            .client
            .pty(&req, input)
            .await
            .map_err(|e| RuntimeError::Agent {
                id: self.id.clone(),
                source: e.into(),
            })?;
        Ok(self.agent_stream(stream))
    }

    async fn tcp(&self, port: u16, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        let input =
            input.map(|r| r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>));
        let stream = self
            .client
            .tcp(port, input)
            .await
            .map_err(|e| self.port_err(e))?;
        Ok(self.agent_stream(stream))
    }

    async fn ports(&self) -> Result<Vec<ListeningPort>, RuntimeError> {
        self.client.ports().await.map_err(|e| self.port_err(e))
    }

    async fn bg_start(&self, req: ExecRequest) -> Result<BgInfo, RuntimeError> {
        self.client.bg_start(&req).await.map_err(|e| self.bg_err(e))
    }

    async fn bg_list(&self) -> Result<Vec<BgInfo>, RuntimeError> {
        self.client.bg_list().await.map_err(|e| self.bg_err(e))
    }

    async fn bg_stdin(&self, pid: i32, data: Bytes, close: bool) -> Result<(), RuntimeError> {
        self.client
            .bg_stdin(pid, data, close)
            .await
            .map_err(|e| self.bg_err(e))
    }

    async fn bg_signal(&self, pid: i32, signal: i32) -> Result<(), RuntimeError> {
        self.client
            .bg_signal(pid, signal)
            .await
            .map_err(|e| self.bg_err(e))
    }

    async fn bg_wait(&self, pid: i32) -> Result<i32, RuntimeError> {
        self.client.bg_wait(pid).await.map_err(|e| self.bg_err(e))
    }

    async fn bg_output(&self, pid: i32, follow: bool) -> Result<AgentEvents, RuntimeError> {
        match self.client.bg_output(pid, follow).await {
            Err(e) => Err(self.bg_err(e)),
            ok => self.events(ok),
        }
    }

    async fn file_op(&self, op: FileOp) -> Result<FileOpReply, RuntimeError> {
        self.client.file_op(&op).await.map_err(|e| self.file_err(e))
    }

    async fn read_file(&self, path: &str) -> Result<(Option<u64>, ByteStream), RuntimeError> {
        let (size, stream) = self
            .client
            .read_file(path)
            .await
            .map_err(|e| self.file_err(e))?;
        let id = self.id.clone();
        Ok((
            size,
            stream
                .map(move |r| {
                    r.map_err(|e| RuntimeError::Agent {
                        id: id.clone(),
                        source: e.into(),
                    })
                })
                .boxed(),
        ))
    }

    async fn write_file(&self, path: &str, data: UploadStream) -> Result<WriteReply, RuntimeError> {
        let data =
            data.map(|r| r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>));
        self.client
            .write_file(path, data)
            .await
            .map_err(|e| self.file_err(e))
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
fn pidns_chain(pid: i32) -> Vec<u64> {
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
fn nspid(pid: i32) -> std::io::Result<Vec<i32>> {
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

fn pidns_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

fn token() -> String {
    use rand::Rng as _;
    let mut b = [0u8; 24];
    rand::thread_rng().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl JailInstance {
    /// See `docs/fork-design.md`: snapshot the frozen parent once per child, start each
    /// child nested in the parent's namespaces, fork the parent's Python kernel into
    /// them, and move each copy into its child's cgroup.
    async fn fork_children(&self, specs: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        let id = self.id.as_str();
        if self.rt.lineage().depth(id) + 1 > MAX_FORK_DEPTH {
            return Err(RuntimeError::Rejected(format!(
                "sandbox {id} is already {MAX_FORK_DEPTH} forks deep (the kernel nests namespaces at most 32 levels); fork an earlier ancestor"
            )));
        }
        // 1. Filesystem: one snapshot of the frozen parent, a staging copy each child's
        //    root is then snapshotted from while the parent runs again.
        let t0 = std::time::Instant::now();
        let staging = self
            .rt
            .pool
            .sandbox(&format!(".fork-{}-{}", self.id, &token()[..8]));
        self.freeze(true).await?;
        let (src, dst) = (self.rootfs.clone(), staging.clone());
        let snap =
            tokio::task::spawn_blocking(move || forkbox_sys::btrfs::snapshot(&src, &dst, false))
                .await;
        let thawed = self.freeze(false).await;
        let snap = match snap {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RuntimeError::host("snapshot parent", id, e)),
            Err(e) => Err(RuntimeError::host("snapshot parent", id, e)),
        };
        if let Some(e) = snap.err().or(thawed.err()) {
            let _ = delete_subvolume_patiently(&staging);
            return Err(e);
        }
        let t_snap = t0.elapsed();
        // 2. Children, concurrently, nested in our namespaces, in our uid range.
        let (family, cached) = {
            let r = self.resources.lock().await;
            (r.slot.clone(), r.nested.clone())
        };
        let nested = match (&family, cached) {
            (_, Some(n)) => Some(Ok(n)),
            (Some(s), None) => Some(
                self.rt
                    .agent
                    .as_ref()
                    .ok_or_else(|| std::io::Error::other("no agent image"))
                    .and_then(|a| a.nested_for(s.host_uid()).map_err(std::io::Error::other))
                    .map(Arc::new),
            ),
            (None, None) => None,
        };
        let (slot, nested) = match (family, nested) {
            (Some(slot), Some(Ok(nested))) if slot.index() > 0 => {
                self.resources.lock().await.nested = Some(nested.clone());
                (slot, nested)
            }
            (_, Some(Err(e))) => {
                let _ = delete_subvolume_patiently(&staging);
                return Err(RuntimeError::host("make the nested agent image", id, e));
            }
            _ => {
                let _ = delete_subvolume_patiently(&staging);
                return Err(RuntimeError::Conflict(format!(
                    "sandbox {id} has no uid range of its own (it predates them); hibernate and wake it to fork it"
                )));
            }
        };
        let tokens: Vec<String> = specs.iter().map(|_| token()).collect();
        let started =
            futures_util::future::join_all(specs.iter().zip(&tokens).map(|(spec, token)| {
                self.rt.start(
                    spec,
                    Origin::Fork {
                        parent_pid: self.pid,
                        token: token.clone(),
                        from: staging.clone(),
                        slot: slot.clone(),
                        nested: nested.clone(),
                    },
                )
            }))
            .await;
        let mut children: Vec<Arc<JailInstance>> = Vec::new();
        let mut failure = None;
        for r in started {
            match r {
                Ok(c) => children.push(c),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        // The staging copy is not needed any more; drop it off the request path.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = delete_subvolume_patiently(&staging) {
                tracing::warn!(path = %staging.display(), error = %e, "deleting a fork's staging snapshot");
            }
        });
        let t_start = t0.elapsed();
        let outcome = match failure {
            Some(e) => Err(e),
            None => self.carry_python(&children, &tokens).await,
        };
        tracing::debug!(
            sandbox = id,
            n = specs.len(),
            snapshot_ms = t_snap.as_secs_f64() * 1e3,
            start_children_ms = (t_start - t_snap).as_secs_f64() * 1e3,
            carry_python_ms = (t0.elapsed() - t_start).as_secs_f64() * 1e3,
            "fork phases"
        );
        match outcome {
            Ok(python) => {
                for c in &children {
                    self.rt.track(&c.id, Some(self.id.clone()), Some(c.pid));
                }
                let mut carried = vec!["filesystem".to_owned()];
                if python {
                    carried.push("python".to_owned());
                }
                Ok(Forked {
                    children: children
                        .into_iter()
                        .map(|c| c as Arc<dyn Instance>)
                        .collect(),
                    carried,
                })
            }
            Err(e) => {
                for c in children {
                    let mut res = c.resources.lock().await;
                    let _ = res.release().await;
                }
                Err(e)
            }
        }
    }

    /// Forks our Python kernel (if one runs) into `children`; true when carried.
    async fn carry_python(
        &self,
        children: &[Arc<JailInstance>],
        tokens: &[String],
    ) -> Result<bool, RuntimeError> {
        let id = self.id.as_str();
        let agent_err = |e: forkbox_agent_client::AgentError| RuntimeError::Agent {
            id: id.to_owned(),
            source: e.into(),
        };
        // Each child's agent pid as our PID namespace numbers it.
        let depth = nspid(self.pid)
            .map_err(|e| RuntimeError::host("read parent's NSpid", id, e))?
            .len();
        let mut fork_children = Vec::new();
        for (c, token) in children.iter().zip(tokens) {
            let ns =
                nspid(c.pid).map_err(|e| RuntimeError::host("read child's NSpid", &c.id, e))?;
            let pid = *ns.get(depth - 1).ok_or_else(|| {
                RuntimeError::host(
                    "locate fork child",
                    &c.id,
                    std::io::Error::other("not nested in its parent"),
                )
            })?;
            fork_children.push(ForkChild {
                pid,
                token: token.clone(),
            });
        }
        let reply = self
            .client
            .fork(&ForkRequest {
                children: fork_children,
            })
            .await
            .map_err(agent_err)?;
        let errors: Vec<String> = (0..children.len())
            .map(|i| {
                reply.errors.get(i).cloned().unwrap_or_else(|| {
                    if reply.python {
                        "no answer for this child".into()
                    } else {
                        String::new()
                    }
                })
            })
            .collect();
        let adopts =
            futures_util::future::join_all(children.iter().zip(&errors).map(|(c, error)| {
                let req = AdoptRequest {
                    expect: reply.python && error.is_empty(),
                };
                async move { c.client.adopt(&req).await }
            }))
            .await;
        if !reply.python {
            return Ok(false);
        }
        for ((c, error), r) in children.iter().zip(errors).zip(adopts) {
            let r = r.map_err(|e| RuntimeError::Agent {
                id: c.id.clone(),
                source: e.into(),
            })?;
            if !error.is_empty() || r.pid.is_none() {
                return Err(RuntimeError::host(
                    "carry the Python REPL",
                    &c.id,
                    std::io::Error::other(if error.is_empty() {
                        "the child's agent never received its copy".to_owned()
                    } else {
                        error
                    }),
                ));
            }
        }
        // The copies were born in our cgroup: move each into its child's, found by
        // the PID namespace it now lives in.
        let mine = self
            .cgroup
            .pids()
            .map_err(|e| RuntimeError::host("list parent's processes", id, e))?;
        let by_ns: HashMap<PathBuf, Vec<i32>> =
            mine.into_iter().fold(HashMap::new(), |mut m, p| {
                if let Some(ns) = pidns_of(p) {
                    m.entry(ns).or_default().push(p);
                }
                m
            });
        for c in children {
            let Some(pids) = pidns_of(c.pid).and_then(|ns| by_ns.get(&ns)) else {
                continue;
            };
            for p in pids {
                c.cgroup
                    .add(*p)
                    .map_err(|e| RuntimeError::host("move REPL copy to its cgroup", &c.id, e))?;
            }
        }
        Ok(true)
    }

    /// Kills every process in the sandbox but its PID 1.
    async fn kill_all_but_agent(&self) {
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

    async fn freeze(&self, frozen: bool) -> Result<(), RuntimeError> {
        let cg = self.cgroup.clone();
        let op = if frozen { "freeze" } else { "thaw" };
        tokio::task::spawn_blocking(move || cg.set_frozen(frozen))
            .await
            .map_err(|e| RuntimeError::host(op, &self.id, e))?
            .map_err(|e| RuntimeError::host(op, &self.id, e))
    }
    /// A stream from the agent, its errors in the runtime's terms.
    fn agent_stream<T: Send + 'static>(
        &self,
        stream: impl futures_util::Stream<Item = Result<T, forkbox_agent_client::AgentError>>
            + Send
            + 'static,
    ) -> futures_util::stream::BoxStream<'static, Result<T, RuntimeError>> {
        forkbox_core::runtime::agent_stream(&self.id, stream)
    }
    /// Maps a background-command call's failure.
    fn bg_err(&self, e: forkbox_agent_client::AgentError) -> RuntimeError {
        match e {
            forkbox_agent_client::AgentError::Status { status, message } => {
                RuntimeError::background_refused(&self.id, status.as_u16(), message)
            }
            other => RuntimeError::Agent {
                id: self.id.clone(),
                source: other.into(),
            },
        }
    }
    /// Maps a port call's failure: the agent's status says what kind.
    fn port_err(&self, e: forkbox_agent_client::AgentError) -> RuntimeError {
        match e {
            forkbox_agent_client::AgentError::Status { status, message } => {
                RuntimeError::port_refused(&self.id, status.as_u16(), message)
            }
            other => RuntimeError::Agent {
                id: self.id.clone(),
                source: other.into(),
            },
        }
    }
    /// Maps a file call's failure: the agent's status says what kind.
    fn file_err(&self, e: forkbox_agent_client::AgentError) -> RuntimeError {
        match e {
            forkbox_agent_client::AgentError::Status { status, message } => {
                RuntimeError::file_refused(&self.id, status.as_u16(), message)
            }
            other => RuntimeError::Agent {
                id: self.id.clone(),
                source: other.into(),
            },
        }
    }

    /// Maps an agent call's outcome into the runtime's terms.
    fn events(
        &self,
        res: Result<forkbox_agent_client::EventStream, forkbox_agent_client::AgentError>,
    ) -> Result<AgentEvents, RuntimeError> {
        let id = self.id.clone();
        match res {
            Ok(stream) => Ok(stream
                .map(move |r| {
                    r.map_err(|e| RuntimeError::Agent {
                        id: id.clone(),
                        source: e.into(),
                    })
                })
                .boxed()),
            Err(e) if e.is_bad_request() => Err(RuntimeError::Rejected(match e {
                forkbox_agent_client::AgentError::Status { message, .. } => message,
                other => other.to_string(),
            })),
            Err(e) => Err(RuntimeError::Agent {
                id: self.id.clone(),
                source: e.into(),
            }),
        }
    }
}

/// The `pre_exec` hook of `jail-init`: puts the agent's listening socket on fd 3 and a
/// fork child's nested agent image on fd 4. It runs between fork and exec in a
/// multi-threaded server, so it is async-signal-safe: `fcntl` and `dup2` only, on fds
/// that stay open in the parent, and no allocation (another thread may have held the
/// allocator's lock at the fork).
fn place_fds(listen_fd: i32, nested_fd: Option<i32>) -> std::io::Result<()> {
    // Move both out of the way first: either may already sit on 3 or 4.
    let mut moved = [(-1, -1); 2];
    let mut n = 0;
    for (from, to) in [(Some(listen_fd), 3), (nested_fd, 4)] {
        let Some(from) = from else { continue };
        // SAFETY: fcntl on an fd number; no memory is touched.
        let high = unsafe { libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 10) };
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
        let (a, b) = (r1.as_raw_fd(), r2.as_raw_fd());
        let (ia, ib) = (inode(a), inode(b));
        // SAFETY: the child only calls place_fds, fstat and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let before = ALLOCS.load(Ordering::SeqCst);
            let placed = place_fds(a, Some(b)).is_ok();
            let allocs = ALLOCS.load(Ordering::SeqCst) - before;
            let code = if !placed {
                2
            } else if allocs > 0 {
                3
            } else if inode(3) != ia || inode(4) != ib {
                4
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
            "2: failed, 3: allocated, 4: wrong fds"
        );
    }
}
