//! The `vm` runtime: every sandbox is a QEMU `microvm` guest with its own kernel.
//!
//! - Guest: Debian's cloud kernel (uncompressed `vmlinux`, PVH entry), an initramfs made
//!   here (busybox, virtio modules, the init script `init.sh`, the agent), the template's
//!   root filesystem as an ext4 image in qcow2 with a copy-on-write overlay per VM. The
//!   assets come from `make vm-assets` (`scripts/vm-assets.sh`).
//! - The agent (the same static binary as the jail's PID 1) is the guest's PID 1 and
//!   serves the agent protocol on a virtio-serial port; the host end is a Unix socket
//!   chardev the runtime connects an [`AgentClient`] to.
//! - QEMU is driven over QMP (`qmp.rs`): pause/resume are `stop`/`cont`.
//! - KVM when a probe guest boots on it within a deadline, else TCG (`accel.rs`).
//!
//! Rooms: this file holds the runtime's state and the `Runtime` trait; `boot`
//! (starting QEMU for a boot, an incoming migration or adoption), `instance` (a running
//! VM's calls), `images` (captures of a VM and copies of them: fork, named snapshots,
//! hibernate), `pool` (the templates' boot images creates are copies of), `disks`
//! (qcow2 layers and the checks of their headers), `jailer` (each QEMU's uid and
//! root), `egress`, `qmp`, `accel`, `initrd`.
//!
//! Not yet (docs/vm.md): QEMU's PID and user namespaces, vsock, fast forks of
//! boot-image copies.

pub mod accel;
pub mod initrd;
pub mod qmp;

mod boot;
mod console;
mod disks;
mod egress;
mod images;
mod instance;
pub mod jailer;
mod pool;
mod ram;

use boot::{Source, Vm};
use disks::{
    chain_refs, check_chain, check_qcow2, collect_layers, image_size, overlay, qemu_of,
    sparse_copy, Trusted,
};
use instance::BootGuard;
pub use instance::VmInstance;

use accel::Accel;
use async_trait::async_trait;
use bytes::Bytes;
use forkbox_agent_client::AgentClient;
use forkbox_core::runtime::{
    AgentEvents, ByteStream, CreateSpec, Forked, GcReport, Instance, Runtime, RuntimeError,
    UploadStream, WatchEvents,
};
use forkbox_types::agent::{
    BgInfo, ExecRequest, FileOp, FileOpReply, ListeningPort, PtyRequest, RunCodeRequest, VmInit,
    WriteReply,
};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the vm runtime finds its assets and keeps its VMs.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// `vmlinux`, `busybox`, `modules/`, `rootfs-<template>.qcow2` (`make vm-assets`).
    pub assets_dir: PathBuf,
    /// One directory per VM: overlay, sockets, console log.
    pub run_dir: PathBuf,
    /// Where guest RAM files live (a tmpfs).
    pub ram_dir: PathBuf,
    /// The static agent binary (the guest's PID 1).
    pub agent_bin: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu_bin: PathBuf,
    /// `None`: probe KVM, fall back to TCG.
    pub accel: Option<Accel>,
    /// How long a probe guest may take on KVM before KVM counts as unusable.
    pub kvm_probe_deadline: Duration,
    /// How long a guest may take from start to an answering agent.
    pub boot_deadline: Duration,
    /// The dead-man's switch: a guest powers off after this long without a server
    /// (`None`: never).
    pub orphan_grace: Option<Duration>,
    /// Where the cgroup hierarchy is mounted: every QEMU runs in a group of its own
    /// under `forkbox-vm` (memory = guest + [`QEMU_OVERHEAD`], the sandbox's CPU,
    /// [`QEMU_PIDS`] threads). `None`: no groups (tests of the runtime's own logic).
    pub cgroup_root: Option<PathBuf>,
    /// The host's egress set-up (name answers, private ranges, idle timeout), for
    /// sandboxes created with an allowlist; `None`: such creates are refused.
    pub egress: Option<forkbox_net::EgressConfig>,
    /// The host's volumes (their images, `forkbox_core::volumes::image_file`), attached
    /// as virtio-blk devices.
    pub volumes_dir: PathBuf,
    /// The first of [`jailer::UIDS`] host uids QEMUs run as, one each, in a root of
    /// their own (`jailer.rs`); `None`: QEMU stays root in the host's mount namespace.
    pub qemu_uid_base: Option<u32>,
}

/// Memory a QEMU may use beyond its guest's (TCG's translation cache is 64 MiB of it).
pub const QEMU_OVERHEAD: u64 = 256 << 20;
/// Threads (and processes) one QEMU may have.
pub const QEMU_PIDS: u64 = 256;
/// The parent group of the QEMUs' groups.
pub const CGROUP_PARENT: &str = "forkbox-vm";

impl VmConfig {
    /// Defaults for a data dir; the assets default to `<data>/vm`.
    pub fn new(data_dir: &Path, agent_bin: PathBuf) -> VmConfig {
        VmConfig {
            assets_dir: data_dir.join("vm"),
            run_dir: data_dir.join("vm-run"),
            ram_dir: PathBuf::from("/dev/shm"),
            agent_bin,
            qemu_bin: PathBuf::from("qemu-system-x86_64"),
            accel: None,
            kvm_probe_deadline: Duration::from_secs(5),
            boot_deadline: Duration::from_secs(90),
            orphan_grace: None,
            cgroup_root: Some(PathBuf::from("/sys/fs/cgroup")),
            egress: None,
            volumes_dir: data_dir.join("volumes"),
            qemu_uid_base: None,
        }
    }
}

/// Failures of the vm runtime's own set-up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("vm assets missing in {dir}: {what} (run `make vm-assets`)")]
    Assets { dir: String, what: String },
    #[error("build the guest initramfs: {0}")]
    Initrd(std::io::Error),
    #[error("cannot tell the host's TSC frequency from /proc/cpuinfo")]
    Tsc,
    #[error("QEMU's cgroups: {0}")]
    Cgroup(#[from] forkbox_sys::cgroup::CgroupError),
    #[error("make the vm run dir: {0}")]
    RunDir(std::io::Error),
    #[error("QEMU's seccomp filters: {0}")]
    Seccomp(#[from] forkbox_sys::seccomp::SeccompError),
}

pub struct VmRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: VmConfig,
    /// The QEMUs' groups (`None` when `cfg.cgroup_root` is).
    cgroups: Option<forkbox_sys::cgroup::Driver>,
    /// forkbox's seccomp filters every QEMU starts under, beneath its own
    /// (`forkbox_sys::seccomp::compile_qemu`).
    seccomp: Arc<[forkbox_sys::seccomp::BpfProgram; 2]>,
    /// The initramfs shared by every VM (without the per-VM config).
    base_initrd: tokio::sync::OnceCell<Arc<Vec<u8>>>,
    accel: tokio::sync::OnceCell<Accel>,
    tsc_khz: u64,
    /// What the vm sandboxes' egress proxies share (`egress.rs`).
    egress: Option<Arc<forkbox_net::proxy::Shared>>,
    /// The boot images being made (their dirs).
    making_images: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    /// Sealed copies of kept captures' RAM files (boot images, named snapshots) that
    /// copies have been made from, by file, with the file's identity (`ram.rs`): one
    /// page cache for every copy of a capture.
    sealed: std::sync::Mutex<SealedCache>,
}

/// Sealed RAM copies by file: the file's identity, the copy, when it was last used.
type SealedCache = std::collections::HashMap<PathBuf, (FileId, Arc<ram::SealedRam>, u64)>;

/// How many sealed copies of kept captures' RAM the server keeps at most: each is as
/// large as the guest RAM its copies' guests read or wrote (boot images: at most
/// `pool::MAX_IMAGES` per template).
const SEALED_KEPT: usize = 8;

/// A file's device, inode and change time: it was not replaced.
type FileId = (u64, u64, i64, i64);

/// The entries of the run dir that are not VMs: shared disk layers, boot images
/// (`pool.rs`), named snapshots, the KVM probe's files.
const RUN_DIR_SHARED: [&str; 5] = ["layers", "images", "snapshots", "kvm-probe", jailer::ROOT];

/// The port name the agent serves on.
const AGENT_PORT: &str = "agent";

impl VmRuntime {
    pub fn new(mut cfg: VmConfig) -> Result<VmRuntime, VmError> {
        // QEMU is given its files by absolute name (a jailed one finds them again
        // under the same names in its own root).
        cfg.run_dir = std::path::absolute(&cfg.run_dir).map_err(VmError::RunDir)?;
        cfg.assets_dir = std::path::absolute(&cfg.assets_dir).map_err(VmError::RunDir)?;
        let tsc_khz = accel::host_tsc_khz().ok_or(VmError::Tsc)?;
        let cgroups = match &cfg.cgroup_root {
            Some(root) => Some(forkbox_sys::cgroup::Driver::detect(root, CGROUP_PARENT)?),
            None => None,
        };
        // Guest disks, RAM copies, snapshots and sockets: root's alone.
        std::fs::create_dir_all(&cfg.run_dir).map_err(VmError::RunDir)?;
        std::fs::set_permissions(
            &cfg.run_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(VmError::RunDir)?;
        // No copy of a layer is under way yet: what one cut short left goes.
        disks::sweep_half_made(&cfg.run_dir);
        // The empty directory each jailed QEMU mounts its own root on.
        std::fs::create_dir_all(cfg.run_dir.join(jailer::ROOT)).map_err(VmError::RunDir)?;
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let inner = Arc::new(Inner {
            egress: cfg
                .egress
                .as_ref()
                .map(|e| Arc::new(e.proxy_shared(nofile))),
            cgroups,
            cfg,
            base_initrd: Default::default(),
            accel: Default::default(),
            tsc_khz,
            making_images: Default::default(),
            sealed: Default::default(),
            seccomp: Arc::new(forkbox_sys::seccomp::compile_qemu()?),
        });
        // Settle KVM or TCG in the background so the first create does not wait for it.
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let me = inner.clone();
            h.spawn(async move {
                let _ = me.accel().await;
            });
        }
        Ok(VmRuntime { inner })
    }

    /// KVM or TCG, once decided.
    pub async fn accel(&self) -> Accel {
        self.inner.accel().await
    }
}

impl Inner {
    async fn accel(&self) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                if let Some(a) = self.cfg.accel {
                    return a;
                }
                let a = self.cfg.assets_dir.as_path();
                let started = Instant::now();
                let kvm = accel::kvm_usable(
                    &self.cfg.qemu_bin,
                    &a.join("vmlinux"),
                    &a.join("busybox"),
                    &self.cfg.run_dir.join("kvm-probe"),
                    self.cfg.kvm_probe_deadline,
                )
                .await;
                let accel = if kvm { Accel::Kvm } else { Accel::Tcg };
                tracing::info!(
                    accel = accel.as_str(),
                    probe_ms = started.elapsed().as_millis() as u64,
                    "vm runtime: accelerator chosen"
                );
                accel
            })
            .await
    }

    fn assets_missing(&self, what: String) -> RuntimeError {
        RuntimeError::Unavailable(
            VmError::Assets {
                dir: self.cfg.assets_dir.display().to_string(),
                what,
            }
            .to_string(),
        )
    }

    async fn base_initrd(&self) -> Result<Arc<Vec<u8>>, RuntimeError> {
        let assets = self.cfg.assets_dir.clone();
        let agent = self.cfg.agent_bin.clone();
        self.base_initrd
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || initrd::base(&assets, &agent))
                    .await
                    .map_err(|e| RuntimeError::Unavailable(e.to_string()))?
                    .map(Arc::new)
                    .map_err(|e| RuntimeError::Unavailable(VmError::Initrd(e).to_string()))
            })
            .await
            .cloned()
    }

    fn image(&self, template: &str) -> PathBuf {
        self.cfg.assets_dir.join(format!("rootfs-{template}.qcow2"))
    }

    /// Puts QEMU `pid` of VM `id` into a group of its own with the sandbox's limits.
    fn confine(&self, id: &str, pid: i32, spec: &CreateSpec) -> Result<(), RuntimeError> {
        let Some(d) = &self.cgroups else {
            return Ok(());
        };
        // A VM booted to make a boot image runs no one's code, for seconds, and dies
        // with the server (`PR_SET_PDEATHSIG`): a group of its own would outlive a
        // server killed meanwhile.
        if id.starts_with(pool::IMAGE_VM_PREFIX) {
            return Ok(());
        }
        let fail = |e| RuntimeError::host("put QEMU in its cgroup", id, e);
        // A group left by an earlier QEMU of this VM (hibernated, merged) goes first.
        let _ = d.open(id).map(|g| g.remove(Duration::from_secs(1)));
        let limits = forkbox_sys::cgroup::Limits {
            memory_bytes: Some(spec.memory_bytes + QEMU_OVERHEAD),
            pids_max: Some(QEMU_PIDS),
            cpu_millis: Some(spec.cpu_millis),
        };
        let g = d.create(id, &limits).map_err(fail)?;
        g.add(pid).map_err(fail)
    }

    /// Removes VM `id`'s group once its QEMU is gone.
    fn release_cgroup(&self, id: &str) {
        if let Some(g) = self.cgroups.as_ref().and_then(|d| d.open(id).ok()) {
            if g.exists() {
                if let Err(e) = g.remove(Duration::from_secs(2)) {
                    tracing::warn!(sandbox = id, error = %e, "removing QEMU's cgroup");
                }
            }
        }
    }

    /// The sealed copy of the kept RAM file `path` that copies of its capture map:
    /// made at the first copy, then shared. Copies of files gone (a snapshot deleted,
    /// a boot image made again) are let go of here, and the least recently used
    /// beyond [`SEALED_KEPT`] (copies running keep theirs mapped; a later copy makes a
    /// new one).
    pub(crate) async fn sealed_ram(
        &self,
        path: &Path,
    ) -> Result<Arc<ram::SealedRam>, RuntimeError> {
        use std::os::unix::fs::MetadataExt as _;
        let id_of = |m: &std::fs::Metadata| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec());
        let io = |e: std::io::Error| RuntimeError::host("map a captured RAM", "-", e);
        // Its identity is the file opened, which is the file copied.
        let file = std::fs::File::open(path).map_err(io)?;
        let want = id_of(&file.metadata().map_err(io)?);
        {
            let mut cache = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|p, (id, _, _)| std::fs::metadata(p).is_ok_and(|m| id_of(&m) == *id));
            let tick = cache.values().map(|(_, _, t)| *t).max().unwrap_or(0) + 1;
            if let Some((id, ram, used)) = cache.get_mut(path) {
                if *id == want {
                    *used = tick;
                    return Ok(ram.clone());
                }
            }
        }
        let ram = tokio::task::spawn_blocking(move || ram::SealedRam::copy_of(&file))
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
            .map_err(io)?;
        let ram = Arc::new(ram);
        let mut cache = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        let tick = cache.values().map(|(_, _, t)| *t).max().unwrap_or(0) + 1;
        cache.insert(path.to_path_buf(), (want, ram.clone(), tick));
        while cache.len() > SEALED_KEPT {
            let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (_, _, t))| *t)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            cache.remove(&oldest);
        }
        Ok(ram)
    }

    /// The uid the QEMU of the VM in `vm_dir` runs as, when QEMUs are jailed.
    fn jail_uid(&self, vm_dir: &Path) -> Option<u32> {
        self.cfg.qemu_uid_base.and_then(|_| jailer::uid_of(vm_dir))
    }

    fn ram_file(&self, id: &str) -> PathBuf {
        self.cfg.ram_dir.join(format!("forkbox-vm-{id}.ram"))
    }

    /// What the disk chain of the VM in `vm_dir` may name as backing files
    /// (`disks::check_qcow2`).
    fn trusted(&self, vm_dir: &Path) -> disks::Trusted {
        disks::Trusted::of(
            &self.cfg.run_dir.join("layers"),
            &self.cfg.assets_dir,
            vm_dir,
        )
    }

    /// Kills every process left in the VM's cgroup or running as its QEMU's uid (a
    /// jailed VM's uid is its alone), and waits a little for them to go.
    /// (A QEMU cannot leave its cgroup; the uid is looked for, through every process
    /// of the host, only where there is none: guests making boot images, or no
    /// cgroups at all.) Off the async threads: it reads `/proc` and may wait.
    async fn kill_leftovers(&self, id: &str, vm_dir: &Path) {
        let grouped = self.cgroups.is_some() && !id.starts_with(pool::IMAGE_VM_PREFIX);
        let group = self.cgroups.as_ref().and_then(|d| d.open(id).ok());
        let uid = (!grouped).then(|| self.jail_uid(vm_dir)).flatten();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(g) = group {
                let _ = g.kill_all();
            }
            if let Some(uid) = uid {
                let deadline = Instant::now() + Duration::from_secs(5);
                while jailer::kill_uid(uid) > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        })
        .await;
    }
}

#[async_trait]
impl Runtime for VmRuntime {
    fn name(&self) -> &'static str {
        "vm"
    }

    fn accelerator(&self) -> Option<&'static str> {
        Some(self.inner.accel.get().map_or("probing", |a| a.as_str()))
    }

    fn capabilities(&self) -> forkbox_core::runtime::Capabilities {
        // Hibernate saves the whole guest (device state and RAM).
        forkbox_core::runtime::Capabilities {
            hibernate_keeps_memory: true,
            own_snapshots: true,
            volumes_as_devices: true,
        }
    }

    async fn prepare_template(&self, template: &str) -> Result<(), RuntimeError> {
        if self.inner.image(template).exists() {
            Ok(())
        } else {
            Err(self
                .inner
                .assets_missing(format!("no image of template {template}")))
        }
    }

    async fn create(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError> {
        let i = self.inner.create(spec).await?;
        Ok(i)
    }

    async fn wake(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError> {
        let vm = Vm::paths(&self.inner.cfg.run_dir.join(&spec.id));
        if !vm.state.exists() {
            return Err(RuntimeError::Conflict(format!(
                "{} has no saved vm state to wake from",
                spec.id
            )));
        }
        let i = self.inner.boot(spec, Source::Restore(&vm.state)).await?;
        // Running again: the saved RAM is not needed any more.
        let _ = std::fs::remove_file(&vm.state);
        // Its clock stopped when it went to sleep; its random state was saved.
        if let Err(e) = i.refresh_identity(&spec.id, None).await {
            let _ = i.destroy_in().await;
            return Err(e);
        }
        Ok(i)
    }

    async fn adopt(
        &self,
        spec: &CreateSpec,
        host_pid: i32,
        paused: bool,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        let rt = &self.inner;
        let vm = Vm::paths(&rt.cfg.run_dir.join(&spec.id));
        let pid = std::fs::read_to_string(&vm.pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if pid != Some(host_pid) || !qemu_of(host_pid, &vm.dir) {
            return Err(RuntimeError::Unavailable(format!(
                "QEMU {host_pid} of {} is not running",
                spec.id
            )));
        }
        let alive = Arc::new(AtomicBool::new(true));
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        {
            // Not our child: watch for it to go.
            let (alive, dir) = (alive.clone(), vm.dir.clone());
            tokio::spawn(async move {
                while qemu_of(host_pid, &dir) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                alive.store(false, Ordering::SeqCst);
                let _ = exited_tx.send(true);
            });
        }
        // Its console again (QEMU's writes failed while no server read it); a QEMU of
        // an earlier version writes a console file or socket of its own.
        let console = match console::Pump::attach(&vm.console_fifo, vm.console.clone(), &spec.id) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(sandbox = %spec.id, error = %e, "console not attached");
                None
            }
        };
        let instance = Arc::new(VmInstance {
            id: spec.id.clone(),
            pid: host_pid,
            vm,
            ram: rt.ram_file(&spec.id),
            memory_mb: images::limits_of(spec).0,
            smp: images::limits_of(spec).1,
            volumes: spec.volumes.clone(),
            egress: Default::default(),
            client: tokio::sync::OnceCell::new(),
            qmp: tokio::sync::Mutex::new(None),
            console: std::sync::Mutex::new(console),
            alive,
            exited,
            rt: rt.clone(),
            oom_kills: Default::default(),
        });
        if let Err(e) = instance
            .connect(
                Instant::now(),
                Duration::from_secs(30),
                Source::Adopt { paused },
            )
            .await
        {
            return Err(instance.with_console(e).await);
        }
        if let Some(hosts) = spec.egress.as_deref().filter(|h| !h.is_empty()) {
            // A paused guest cannot answer; its listener runs since before.
            instance.start_egress(hosts, !paused).await?;
        }
        tracing::info!(sandbox = %spec.id, paused, "vm adopted");
        Ok(instance)
    }

    async fn cleanup(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.inner.cfg.run_dir.join(id);
        let vm = Vm::paths(&dir);
        if let Ok(pid) = std::fs::read_to_string(&vm.pidfile) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // Only a QEMU of this VM: its command line names the VM's directory.
                if qemu_of(pid, &dir) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    // Gone (or a zombie of some other parent) before its files go.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while qemu_of(pid, &dir) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
        // And whatever else still runs in its cgroup or as its uid (a QEMU the pid
        // file did not name).
        self.inner.kill_leftovers(id, &dir).await;
        let _ = std::fs::remove_file(self.inner.ram_file(id));
        // What a fork of it interrupted by a crash left: its device state (and the
        // RAM copy an earlier version made in the RAM dir; a fork's is a memfd now).
        let layer_prefix = format!("forkbox-vm-layer-{id}-");
        for e in std::fs::read_dir(&self.inner.cfg.ram_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&layer_prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let state_prefix = format!("{id}-");
        for e in std::fs::read_dir(dir.parent().unwrap_or(&dir).join("layers"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&state_prefix) && name.ends_with(".state") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.inner.release_cgroup(id);
        let r = match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::host("remove vm run dir", id, e)),
        };
        collect_layers(&self.inner.cfg.run_dir.join("layers"));
        r
    }

    async fn forget_snapshot(&self, snapshot: &str) -> Result<(), RuntimeError> {
        let dir = self.inner.snapshot_dir(snapshot)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RuntimeError::host("delete snapshot", snapshot, e)),
        }
        // Its sealed RAM goes once no copy maps it.
        self.inner
            .sealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p, _| !p.starts_with(&dir));
        // Its layers go with it unless sandboxes made from it stand on them.
        collect_layers(&self.inner.cfg.run_dir.join("layers"));
        Ok(())
    }

    async fn collect_garbage(
        &self,
        keep: &std::collections::HashSet<String>,
        candidates: Vec<String>,
    ) -> Result<GcReport, RuntimeError> {
        let run_dir = &self.inner.cfg.run_dir;
        let mut ids: std::collections::BTreeSet<String> = candidates.into_iter().collect();
        if let Ok(rd) = std::fs::read_dir(run_dir) {
            ids.extend(
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| !RUN_DIR_SHARED.contains(&n.as_str())),
            );
        }
        // (Not the groups under `forkbox-vm`: they are host-wide, and other servers'
        // VMs have theirs there. A VM's group goes with its run dir.)
        let mut report = GcReport::default();
        for id in ids {
            if keep.contains(&id) || id.is_empty() || id.contains('/') || id.starts_with('.') {
                continue;
            }
            if !run_dir.join(&id).exists() && !self.inner.ram_file(&id).exists() {
                continue;
            }
            self.cleanup(&id).await?;
            report.freed += 1;
        }
        Ok(report)
    }
}
