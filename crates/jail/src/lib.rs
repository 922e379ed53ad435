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
//!
//! Rooms: this file holds the runtime's shared state and the `Runtime` trait;
//! `create` (making a sandbox by origin), `instance` (a running sandbox's calls),
//! `fork`, `gc` (adoption and clean-up), `lineage` (fork ancestry), `resources` (what a
//! sandbox holds on the host and releasing it), plus `pool`, `slots`, `template`,
//! `build`, `volumes`, `agent_image`.

pub mod agent_image;
pub mod build;
pub mod pool;
pub mod slots;
pub mod template;
pub mod volumes;

mod create;
mod fork;
mod gc;
mod instance;
mod layers;
mod lineage;
mod resources;

use agent_image::AgentImage;
use async_trait::async_trait;
use bytes::Bytes;
use create::Origin;
use forkbox_agent_client::AgentClient;
use forkbox_core::runtime::{
    AgentEvents, ByteStream, CreateSpec, Forked, GcReport, HostStores, Instance, Runtime,
    RuntimeError, TemplateInfo, TemplateSpec, UploadStream, WatchEvents,
};
pub use forkbox_sys::btrfs::QuotaMode;
use forkbox_sys::cgroup::{Cgroup, Driver, Limits};
use forkbox_types::agent::{
    AdoptRequest, BgInfo, ExecRequest, FileOp, FileOpReply, ForkChild, ForkRequest, JailInit,
    JailInitReply, ListeningPort, PtyRequest, RunCodeRequest, WriteReply,
};
pub use instance::JailInstance;
use instance::{nspid, pidns_chain, pidns_of, token};
use layers::Lower;
use lineage::{Lineage, Node, MAX_FORK_DEPTH};
use pool::Pool;
use resources::{delete_subvolume_patiently, pid_alive, watch_liveness, Resources};
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
    /// How to build each template forkbox may build by itself, by name.
    pub recipes: std::collections::BTreeMap<String, forkbox_core::runtime::TemplateSpec>,
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

/// Image archives being received for template imports, under the run dir.
pub(crate) const UPLOADS: &str = "uploads";

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
    recipes: std::collections::BTreeMap<String, forkbox_core::runtime::TemplateSpec>,
    /// One recipe build with a build sandbox at a time in this server (`publish` takes
    /// the pool's template lock itself, so it cannot be held around the build).
    recipe_builds: tokio::sync::Mutex<()>,
    volumes: volumes::Volumes,
    orphan_grace: Option<Duration>,
    /// Host uid ranges of running sandboxes (`slots.rs`).
    slots: slots::Slots,
}

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
        // Image archives an earlier server of this data dir was receiving.
        let _ = std::fs::remove_dir_all(cfg.run_dir.join(UPLOADS));
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
                egress_cfg: build::with_mirrors(&cfg.egress, cfg.recipes.values()),
                egress: tokio::sync::OnceCell::new(),
                recipes: cfg.recipes.clone(),
                recipe_builds: Default::default(),
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
                recipe_builds: Default::default(),
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

    /// The network namespace its sandboxes' egress proxies live in (made on first use).
    pub fn egress_netns(&self) -> &str {
        &self.inner.egress_cfg.netns
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
    /// A template, built first from its recipe when missing: Debian packages by
    /// mmdebstrap, or (a recipe with a base or commands) as an API build would be,
    /// its base first.
    async fn ensure_template(
        self: &Arc<Self>,
        name: &str,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<template::TemplateMeta, template::TemplateError> {
        let recipe = self.recipes.get(name);
        let Some(spec) = recipe.filter(|r| r.base.is_some() || !r.run.is_empty()) else {
            let packages = recipe.map(|r| r.packages.as_slice());
            return template::ensure(&self.pool, name, packages, self.uid_base, progress).await;
        };
        if let Some(m) = template::ensure(&self.pool, name, None, self.uid_base, progress)
            .await
            .map(Some)
            .or_else(|e| match e {
                template::TemplateError::Unknown(_) => Ok(None),
                other => Err(other),
            })?
        {
            return Ok(m);
        }
        if let Some(base) = &spec.base {
            Box::pin(self.ensure_template(base, progress)).await?;
        }
        let _one = self.recipe_builds.lock().await;
        // Lines of the build as they come (its progress callback must be 'static).
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let sink: forkbox_core::runtime::Progress = Arc::new(move |l: &str| {
            let _ = tx.send(l.to_owned());
        });
        // Boxed: a build starts a sandbox, whose create may prepare a template.
        let mut build = Box::pin(self.build_template(spec, sink));
        let res = loop {
            tokio::select! {
                r = &mut build => break r,
                Some(line) = rx.recv() => progress(&line),
            }
        };
        while let Ok(line) = rx.try_recv() {
            progress(&line);
        }
        match res {
            Ok(m) => Ok(m),
            // Built meanwhile by another server or `forkbox template prepare`.
            Err(build::BuildError::Exists(_)) => {
                template::ensure(&self.pool, name, None, self.uid_base, progress).await
            }
            Err(e) => Err(template::TemplateError::Recipe(
                name.to_owned(),
                Box::new(e),
            )),
        }
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

    async fn create(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError> {
        let inst = self.inner.start(spec, Origin::Template).await?;
        self.inner.track(&spec.id, None, inst.host_pid());
        Ok(inst)
    }
}

/// A volume's failure as the API should see it: in use or guest-written is a conflict.
pub(crate) fn volume_error(op: &'static str, id: &str, e: volumes::VolumeError) -> RuntimeError {
    match e {
        volumes::VolumeError::Busy(_) | volumes::VolumeError::GuestWritten(_) => {
            RuntimeError::Conflict(e.to_string())
        }
        other => RuntimeError::host(op, id, other),
    }
}

#[async_trait]
impl HostStores for JailRuntime {
    async fn create_volume(&self, id: &str, size_mb: u64) -> Result<(), RuntimeError> {
        self.inner
            .volumes
            .create(id, size_mb)
            .await
            .map_err(|e| RuntimeError::host("create volume", id, e))
    }

    async fn delete_volume(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner
            .volumes
            .delete(id)
            .await
            .map_err(|e| volume_error("delete volume", id, e))
    }

    async fn volume_used(&self, id: &str) -> Option<u64> {
        self.inner.volumes.used(id)
    }

    async fn detach_volume(&self, id: &str, writable: bool) -> Result<PathBuf, RuntimeError> {
        self.inner
            .volumes
            .detach(id, writable)
            .await
            .map_err(|e| volume_error("detach volume", id, e))
    }

    async fn delete_snapshot(&self, snapshot: &str) -> Result<(), RuntimeError> {
        // Sandboxes made from it stand on it: then it moves among the layers, swept
        // with the last of them (see `layers.rs`).
        let inner = self.inner.clone();
        let id = snapshot.to_owned();
        tokio::task::spawn_blocking(move || {
            let pool = &inner.pool;
            let chain = {
                let _lock = layers::PoolLock::exclusive(pool)?;
                let chain = layers::read_chain(&pool.snapshot_chain(&id)).ok().flatten();
                let _ = std::fs::remove_file(pool.snapshot_chain(&id));
                let in_use = layers::snapshot_in_use(pool, &id);
                layers::retire(pool, &pool.snapshot(&id), &id, in_use)?;
                chain
            };
            // The layers under it nothing else stands on go too.
            if let Some(chain) = chain {
                layers::drop_unused(pool.clone(), chain);
            }
            Ok::<_, layers::LayerError>(())
        })
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

    fn upload_dir(&self) -> Option<PathBuf> {
        Some(self.inner.run_dir.join(UPLOADS))
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
            image: m.image,
        }
    }

    async fn prepare_template(self: &Arc<Self>, template: &str) -> Result<(), RuntimeError> {
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
}
