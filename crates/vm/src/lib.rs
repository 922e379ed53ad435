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
//! Not yet: fork, hibernate/wake, snapshots, adoption after a server restart, egress,
//! volumes, terminals, watch, QEMU inside its own jail. See docs/vm.md.

pub mod accel;
pub mod initrd;
pub mod qmp;

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
use futures_util::StreamExt as _;
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
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// `None`: probe KVM, fall back to TCG.
    pub accel: Option<Accel>,
    /// How long a probe guest may take on KVM before KVM counts as unusable.
    pub kvm_probe_deadline: Duration,
    /// How long a guest may take from start to an answering agent.
    pub boot_deadline: Duration,
    /// The dead-man's switch: a guest powers off after this long without a server
    /// (`None`: never).
    pub orphan_grace: Option<Duration>,
}

impl VmConfig {
    /// Defaults for a data dir; the assets default to `<data>/vm`.
    pub fn new(data_dir: &Path, agent_bin: PathBuf) -> VmConfig {
        VmConfig {
            assets_dir: data_dir.join("vm"),
            run_dir: data_dir.join("vm-run"),
            ram_dir: PathBuf::from("/dev/shm"),
            agent_bin,
            qemu_bin: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            accel: None,
            kvm_probe_deadline: Duration::from_secs(5),
            boot_deadline: Duration::from_secs(90),
            orphan_grace: None,
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
}

pub struct VmRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: VmConfig,
    /// The initramfs shared by every VM (without the per-VM config).
    base_initrd: tokio::sync::OnceCell<Arc<Vec<u8>>>,
    accel: tokio::sync::OnceCell<Accel>,
    tsc_khz: u64,
}

/// The port name the agent serves on.
const AGENT_PORT: &str = "agent";

impl VmRuntime {
    pub fn new(cfg: VmConfig) -> Result<VmRuntime, VmError> {
        let tsc_khz = accel::host_tsc_khz().ok_or(VmError::Tsc)?;
        let inner = Arc::new(Inner {
            cfg,
            base_initrd: Default::default(),
            accel: Default::default(),
            tsc_khz,
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

    fn ram_file(&self, id: &str) -> PathBuf {
        self.cfg.ram_dir.join(format!("forkbox-vm-{id}.ram"))
    }

    async fn create(self: &Arc<Self>, spec: &CreateSpec) -> Result<Arc<VmInstance>, RuntimeError> {
        if spec.snapshot.is_some() {
            return Err(RuntimeError::Rejected(
                "the vm runtime cannot start from snapshots yet".into(),
            ));
        }
        if spec.egress.is_some() {
            return Err(RuntimeError::Rejected(
                "the vm runtime has no network yet (egress_allowlist)".into(),
            ));
        }
        if !spec.volumes.is_empty() {
            return Err(RuntimeError::Rejected(
                "the vm runtime cannot mount volumes yet".into(),
            ));
        }
        if spec.memory_bytes >> 20 < 128 {
            return Err(RuntimeError::Rejected(
                "the vm runtime needs memory_mb of at least 128".into(),
            ));
        }
        if !self.cfg.assets_dir.join("vmlinux").exists() {
            return Err(self.assets_missing("vmlinux".into()));
        }
        let image = self.image(&spec.template);
        if !image.exists() {
            return Err(RuntimeError::UnknownTemplate(format!(
                "{} (no vm image rootfs-{}.qcow2 in {}: make vm-assets)",
                spec.template,
                spec.template,
                self.cfg.assets_dir.display()
            )));
        }
        let base = self.base_initrd().await?;
        let id = spec.id.clone();
        let dir = self.cfg.run_dir.join(&id);
        let vm = Vm::paths(&dir);
        let fail = |op: &'static str| {
            let id = id.clone();
            move |e: std::io::Error| RuntimeError::host(op, &id, e)
        };
        std::fs::create_dir_all(&dir).map_err(fail("make run dir"))?;
        let mut guard = Cleanup {
            dir: dir.clone(),
            ram: self.ram_file(&id),
            armed: true,
        };
        // The disk: a copy-on-write overlay on the template's image (absolute backing path).
        let out = tokio::process::Command::new(&self.cfg.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&image)
            .arg(&vm.disk)
            .output()
            .await
            .map_err(fail("run qemu-img"))?;
        if !out.status.success() {
            return Err(RuntimeError::host(
                "make disk overlay",
                &id,
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            ));
        }
        let init = VmInit {
            id: id.clone(),
            env: spec.env.clone(),
            port: AGENT_PORT.into(),
            orphan_grace_s: self.cfg.orphan_grace.map(|g| g.as_secs().max(1)),
        };
        let init_json =
            serde_json::to_vec(&init).map_err(|e| RuntimeError::host("encode", &id, e))?;
        let mut initrd_bytes = Vec::with_capacity(base.len() + 1024);
        initrd_bytes.extend_from_slice(&base);
        initrd_bytes.extend_from_slice(&initrd::per_vm(&init_json));
        std::fs::write(&vm.initrd, &initrd_bytes).map_err(fail("write initramfs"))?;
        let instance = self.boot(spec, Source::Boot).await?;
        guard.armed = false;
        Ok(instance)
    }

    /// Starts QEMU for the VM whose files are in place and waits for its agent (see
    /// [`Source`]). On failure QEMU is gone and the VM's files are left as they were.
    async fn boot(
        self: &Arc<Self>,
        spec: &CreateSpec,
        source: Source<'_>,
    ) -> Result<Arc<VmInstance>, RuntimeError> {
        let accel = self.accel().await;
        let id = spec.id.clone();
        let vm = Vm::paths(&self.cfg.run_dir.join(&id));
        let ram = self.ram_file(&id);
        let memory_mb = spec.memory_bytes >> 20;
        let fail = |op: &'static str| {
            let id = id.clone();
            move |e: std::io::Error| RuntimeError::host(op, &id, e)
        };
        // A fresh RAM file every time (a stale one of another size stops QEMU).
        let _ = std::fs::remove_file(&ram);
        let smp = spec.cpu_millis.div_ceil(1000).clamp(1, 64);
        let log = std::fs::File::create(&vm.qemu_log).map_err(fail("make QEMU log"))?;
        let log2 = log.try_clone().map_err(fail("make QEMU log"))?;
        let mut cmd = tokio::process::Command::new(&self.cfg.qemu_bin);
        cmd.args(["-M", "microvm"])
            .args(accel.qemu_args())
            .args(["-m", &format!("{memory_mb}M"), "-smp", &smp.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-serial"])
            .arg(format!("file:{}", vm.console.display()))
            .args([
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ])
            .arg("-object")
            .arg(match source {
                // A fork child maps its parent's RAM copy privately (copy-on-write).
                Source::Fork { ram: layer, .. } => format!(
                    "memory-backend-file,id=ram0,size={memory_mb}M,mem-path={},share=off",
                    layer.display()
                ),
                _ => format!(
                    "memory-backend-file,id=ram0,size={memory_mb}M,mem-path={},share=on",
                    ram.display()
                ),
            })
            .args(["-machine", "memory-backend=ram0", "-kernel"])
            .arg(self.cfg.assets_dir.join("vmlinux"))
            .arg("-initrd")
            .arg(&vm.initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet tsc_early_khz={}",
                self.tsc_khz
            ))
            .arg("-drive")
            .arg(format!(
                "id=d0,file={},format=qcow2,if=none,cache=unsafe",
                vm.active_disk().1.display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0"])
            .args(["-device", "virtio-serial-device", "-chardev"])
            .arg(format!(
                "socket,path={},server=on,wait=off,id=c0",
                vm.agent_sock.display()
            ))
            .args([
                "-device",
                &format!("virtserialport,chardev=c0,name={AGENT_PORT}"),
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", vm.qmp_sock.display()))
            .arg("-pidfile")
            .arg(&vm.pidfile)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        if !matches!(source, Source::Boot) {
            cmd.args(["-incoming", "defer"]);
        }
        // A session and process group of its own: signals to the server's group (a
        // terminal's Ctrl-C, `timeout`, a supervisor) leave the VM alone.
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(fail("start QEMU"))?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let alive = Arc::new(AtomicBool::new(true));
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        {
            let alive = alive.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let status = child.wait().await;
                alive.store(false, Ordering::SeqCst);
                tracing::debug!(sandbox = %id, ?status, "QEMU exited");
                let _ = exited_tx.send(true);
            });
        }
        let instance = Arc::new(VmInstance {
            id: id.clone(),
            pid,
            vm,
            ram,
            client: tokio::sync::OnceCell::new(),
            qmp: tokio::sync::Mutex::new(None),
            alive,
            exited,
            rt: self.clone(),
        });
        // Should this future be dropped before the boot ends (the server stopping, its
        // caller gone), the half-booted QEMU goes with it rather than running on
        // unknown to anyone.
        let guard = BootGuard {
            pid,
            alive: instance.alive.clone(),
        };
        let connected = instance
            .connect(started, self.cfg.boot_deadline, source)
            .await;
        std::mem::forget(guard);
        match connected {
            Ok(()) => {
                tracing::info!(
                    sandbox = %id,
                    accel = accel.as_str(),
                    source = source.name(),
                    boot_ms = started.elapsed().as_millis() as u64,
                    "vm booted"
                );
                Ok(instance)
            }
            Err(e) => {
                let console = instance.console_tail();
                instance.stop_qemu().await;
                Err(match e {
                    RuntimeError::Agent { id, source } => RuntimeError::Agent {
                        id,
                        source: format!("{source}; guest console: {console}").into(),
                    },
                    other => other,
                })
            }
        }
    }
}

/// What a VM starts from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A cold boot of the kernel.
    Boot,
    /// A whole saved VM (hibernation).
    Restore(&'a Path),
    /// A fork child: the parent's device state and a copy of its RAM, mapped privately.
    Fork { state: &'a Path, ram: &'a Path },
    /// A QEMU an earlier server started, found running (`paused`: its vCPUs are stopped).
    Adopt { paused: bool },
}

impl Source<'_> {
    fn name(&self) -> &'static str {
        match self {
            Source::Boot => "boot",
            Source::Restore(_) => "restore",
            Source::Fork { .. } => "fork",
            Source::Adopt { .. } => "adopt",
        }
    }
}

/// Removes a half-made VM's files unless defused.
struct Cleanup {
    dir: PathBuf,
    ram: PathBuf,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_file(&self.ram);
        }
    }
}

/// The files of one VM.
#[derive(Debug, Clone)]
struct Vm {
    dir: PathBuf,
    /// The first disk overlay (`disk-0.qcow2`); a fork adds `disk-<n+1>.qcow2` on the
    /// frozen `disk-<n>` (see [`Vm::active_disk`]).
    disk: PathBuf,
    initrd: PathBuf,
    console: PathBuf,
    qemu_log: PathBuf,
    agent_sock: PathBuf,
    qmp_sock: PathBuf,
    pidfile: PathBuf,
    /// The saved VM (device state and RAM) of a hibernated sandbox.
    state: PathBuf,
}

impl Vm {
    /// The disk image QEMU writes to: the overlay of the highest generation. Older
    /// generations stay under their names, since a running QEMU reopens its images by
    /// name (e.g. read-only when a migration completes).
    fn active_disk(&self) -> (u32, PathBuf) {
        let mut best = (0, self.disk.clone());
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name
                    .strip_prefix("disk-")
                    .and_then(|r| r.strip_suffix(".qcow2"))
                    .and_then(|n| n.parse::<u32>().ok());
                if let Some(n) = n {
                    if n > best.0 {
                        best = (n, e.path());
                    }
                }
            }
        }
        best
    }

    fn paths(dir: &Path) -> Vm {
        Vm {
            dir: dir.to_path_buf(),
            disk: dir.join("disk-0.qcow2"),
            initrd: dir.join("initrd.cpio"),
            console: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            agent_sock: dir.join("agent.sock"),
            qmp_sock: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            state: dir.join("hibernated.state"),
        }
    }
}

#[async_trait]
impl Runtime for VmRuntime {
    fn name(&self) -> &'static str {
        "vm"
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
        let instance = Arc::new(VmInstance {
            id: spec.id.clone(),
            pid: host_pid,
            vm,
            ram: rt.ram_file(&spec.id),
            client: tokio::sync::OnceCell::new(),
            qmp: tokio::sync::Mutex::new(None),
            alive,
            exited,
            rt: rt.clone(),
        });
        instance
            .connect(
                Instant::now(),
                Duration::from_secs(30),
                Source::Adopt { paused },
            )
            .await
            .map_err(|e| match e {
                RuntimeError::Agent { id, source } => RuntimeError::Agent {
                    id,
                    source: format!("{source}; guest console: {}", instance.console_tail()).into(),
                },
                other => other,
            })?;
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
        let _ = std::fs::remove_file(self.inner.ram_file(id));
        let r = match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::host("remove vm run dir", id, e)),
        };
        collect_layers(&self.inner.cfg.run_dir.join("layers"));
        r
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
                    .filter(|n| n != "layers"),
            );
        }
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

pub struct VmInstance {
    id: String,
    pid: i32,
    vm: Vm,
    ram: PathBuf,
    client: tokio::sync::OnceCell<AgentClient>,
    qmp: tokio::sync::Mutex<Option<qmp::Qmp>>,
    alive: Arc<AtomicBool>,
    exited: tokio::sync::watch::Receiver<bool>,
    rt: Arc<Inner>,
}

/// Kills a QEMU whose boot was abandoned (see `boot`).
struct BootGuard {
    pid: i32,
    alive: Arc<AtomicBool>,
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
const REATTACH_ATTEMPT: Duration = Duration::from_secs(6);

impl VmInstance {
    fn agent_err(
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
    async fn connect(
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
            tokio::time::sleep(Duration::from_millis(5)).await;
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

    fn client(&self) -> Result<&AgentClient, RuntimeError> {
        self.client
            .get()
            .ok_or_else(|| self.agent_err("not connected"))
    }

    /// The last lines the guest printed on its console.
    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.vm.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(8).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Runs `stop` (`pause`) or `cont` on the VM.
    async fn run_state(&self, pause: bool) -> Result<(), RuntimeError> {
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

    /// Loads the saved VM into this QEMU (started with `-incoming defer`) and runs it.
    /// `ignore_shared`: the stream has device state only (a fork child's).
    async fn restore(
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

    /// Kills QEMU, waits for it and frees its RAM; the VM's files stay.
    async fn stop_qemu(&self) {
        if self.pid > 0 && self.alive.load(Ordering::SeqCst) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let mut exited = self.exited.clone();
        let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
        self.alive.store(false, Ordering::SeqCst);
        *self.qmp.lock().await = None;
        let _ = std::fs::remove_file(&self.ram);
    }

    async fn destroy_in(&self) -> Result<(), RuntimeError> {
        self.stop_qemu().await;
        let r = match std::fs::remove_dir_all(&self.vm.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::host("remove vm run dir", &self.id, e)),
        };
        collect_layers(&self.rt.cfg.run_dir.join("layers"));
        r
    }

    /// One child per spec from this VM's current state, every process and all memory
    /// included: the VM is stopped for the copy (disk snapshot, device state, sparse copy
    /// of its RAM file), then runs on; each child is a new QEMU mapping the RAM copy
    /// privately (copy-on-write) on its own qcow2 overlay of the frozen disk.
    async fn fork_in(&self, specs: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        let rt = self.rt.clone();
        let io = |op: &'static str| {
            let id = self.id.clone();
            move |e: std::io::Error| RuntimeError::host(op, &id, e)
        };
        let layers = rt.cfg.run_dir.join("layers");
        std::fs::create_dir_all(&layers).map_err(io("fork"))?;
        let tag = format!(
            "{}-{}",
            self.id,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        // The frozen disk is shared by the parent (as its new backing) and the children,
        // so it lives outside every sandbox's run dir.
        let layer_disk = layers.join(format!("{tag}.qcow2"));
        let layer_state = layers.join(format!("{tag}.state"));
        let layer_ram = rt.cfg.ram_dir.join(format!("forkbox-vm-layer-{tag}.ram"));
        let (generation, current) = self.vm.active_disk();
        let size = image_size(&rt.cfg.qemu_img, &current).await?;
        let next = self.vm.dir.join(format!("disk-{}.qcow2", generation + 1));
        let state_file = std::fs::File::create(&layer_state).map_err(io("fork"))?;
        let started = Instant::now();
        let copied = {
            let mut g = self.qmp.lock().await;
            let q = g.as_mut().ok_or_else(|| {
                RuntimeError::host("fork", &self.id, std::io::Error::other("no QMP"))
            })?;
            let host = |e: qmp::QmpError| RuntimeError::host("fork", &self.id, e);
            q.stop().await.map_err(host)?;
            let r: Result<u64, RuntimeError> = async {
                // Disk first (migration inactivates the images until `cont`).
                std::fs::hard_link(&current, &layer_disk).map_err(io("fork"))?;
                overlay(&rt.cfg.qemu_img, &layer_disk, &next, size)
                    .await
                    .map_err(io("fork"))?;
                q.snapshot_disk("d0", &next).await.map_err(host)?;
                q.getfd("state", std::os::fd::AsFd::as_fd(&state_file))
                    .await
                    .map_err(host)?;
                q.save_devices_to_fd("state", Duration::from_secs(60))
                    .await
                    .map_err(host)?;
                let (from, to) = (self.ram.clone(), layer_ram.clone());
                tokio::task::spawn_blocking(move || sparse_copy(&from, &to))
                    .await
                    .map_err(|e| RuntimeError::host("fork", &self.id, e))?
                    .map_err(io("copy RAM"))
            }
            .await;
            let resumed = q.cont().await;
            match (r, resumed) {
                (Ok(n), Ok(())) => n,
                (Err(e), _) => {
                    let _ = std::fs::remove_file(&layer_ram);
                    let _ = std::fs::remove_file(&layer_state);
                    let _ = std::fs::remove_file(&next);
                    return Err(e);
                }
                (Ok(_), Err(e)) => return Err(host(e)),
            }
        };
        drop(state_file);
        tracing::info!(
            sandbox = %self.id,
            paused_ms = started.elapsed().as_millis() as u64,
            ram_copied_mib = copied >> 20,
            "vm fork: parent state taken"
        );
        let boots = specs.iter().map(|spec| {
            let rt = rt.clone();
            let (layer_disk, layer_state, layer_ram) =
                (layer_disk.clone(), layer_state.clone(), layer_ram.clone());
            let initrd = self.vm.initrd.clone();
            let parent_dir = self.vm.dir.clone();
            async move {
                let dir = rt.cfg.run_dir.join(&spec.id);
                let vm = Vm::paths(&dir);
                let io = |e: std::io::Error| RuntimeError::host("fork child", &spec.id, e);
                std::fs::create_dir_all(&dir).map_err(io)?;
                let made = async {
                    // The child holds a name of every layer under its disk (see
                    // `collect_layers`): the parent's frozen generations and its refs.
                    for (src, name) in chain_refs(&parent_dir, generation) {
                        std::fs::hard_link(&src, dir.join(name)).map_err(io)?;
                    }
                    overlay(&rt.cfg.qemu_img, &layer_disk, &vm.disk, size)
                        .await
                        .map_err(io)?;
                    // Only for QEMU's command line: the guest's memory is the parent's.
                    std::fs::copy(&initrd, &vm.initrd).map_err(io)?;
                    rt.boot(
                        spec,
                        Source::Fork {
                            state: &layer_state,
                            ram: &layer_ram,
                        },
                    )
                    .await
                }
                .await;
                if made.is_err() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                made
            }
        });
        let results = futures_util::future::join_all(boots).await;
        // Every child has its private mapping now; the copy's pages live on in them.
        let _ = std::fs::remove_file(&layer_ram);
        let _ = std::fs::remove_file(&layer_state);
        let mut children: Vec<Arc<dyn Instance>> = Vec::new();
        let mut failure = None;
        for r in results {
            match r {
                Ok(i) => children.push(i),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            for c in children {
                let _ = c.destroy().await;
            }
            return Err(e);
        }
        tracing::info!(
            sandbox = %self.id,
            children = specs.len(),
            total_ms = started.elapsed().as_millis() as u64,
            "vm fork done"
        );
        Ok(Forked {
            children,
            carried: vec![
                "filesystem".into(),
                "memory".into(),
                "processes".into(),
                "python".into(),
            ],
        })
    }

    /// Saves the whole VM (device state and RAM) into its run dir and stops QEMU.
    async fn hibernate_in(&self) -> Result<(), RuntimeError> {
        let host = |e: qmp::QmpError| RuntimeError::host("hibernate", &self.id, e);
        let tmp = self.vm.state.with_extension("tmp");
        let file = std::fs::File::create(&tmp)
            .map_err(|e| RuntimeError::host("hibernate", &self.id, e))?;
        let saved = {
            let mut g = self.qmp.lock().await;
            let q = g.as_mut().ok_or_else(|| {
                RuntimeError::host("hibernate", &self.id, std::io::Error::other("no QMP"))
            })?;
            q.stop().await.map_err(host)?;
            let r = async {
                q.getfd("state", std::os::fd::AsFd::as_fd(&file)).await?;
                q.save_to_fd("state", Duration::from_secs(300)).await
            }
            .await;
            if r.is_err() {
                let _ = q.cont().await;
            }
            r
        };
        drop(file);
        if let Err(e) = saved {
            let _ = std::fs::remove_file(&tmp);
            return Err(host(e));
        }
        std::fs::rename(&tmp, &self.vm.state)
            .map_err(|e| RuntimeError::host("hibernate", &self.id, e))?;
        self.stop_qemu().await;
        Ok(())
    }

    /// Maps an agent call's outcome into the runtime's terms.
    fn events(
        &self,
        res: Result<forkbox_agent_client::EventStream, forkbox_agent_client::AgentError>,
    ) -> Result<AgentEvents, RuntimeError> {
        match res {
            Ok(stream) => Ok(self.agent_stream(stream)),
            Err(forkbox_agent_client::AgentError::Status { status, message })
                if status.as_u16() == 400 =>
            {
                Err(RuntimeError::Rejected(message))
            }
            Err(e) => Err(self.agent_err(e)),
        }
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
            other => self.agent_err(other),
        }
    }
    /// Maps a port call's failure: the agent's status says what kind.
    fn port_err(&self, e: forkbox_agent_client::AgentError) -> RuntimeError {
        match e {
            forkbox_agent_client::AgentError::Status { status, message } => {
                RuntimeError::port_refused(&self.id, status.as_u16(), message)
            }
            other => self.agent_err(other),
        }
    }
    /// Maps a file call's failure: the agent's status says what kind.
    fn file_err(&self, e: forkbox_agent_client::AgentError) -> RuntimeError {
        match e {
            forkbox_agent_client::AgentError::Status { status, message } => {
                RuntimeError::file_refused(&self.id, status.as_u16(), message)
            }
            other => self.agent_err(other),
        }
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
        0
    }

    async fn exec(&self, req: ExecRequest) -> Result<AgentEvents, RuntimeError> {
        let c = self.client()?;
        self.events(c.exec(&req).await)
    }

    async fn run_code(&self, req: RunCodeRequest) -> Result<AgentEvents, RuntimeError> {
        let c = self.client()?;
        self.events(c.run_code(&req).await)
    }

    async fn pause(&self) -> Result<(), RuntimeError> {
        self.run_state(true).await
    }

    async fn resume(&self) -> Result<(), RuntimeError> {
        self.run_state(false).await
    }

    async fn watch(&self, path: &str, recursive: bool) -> Result<WatchEvents, RuntimeError> {
        let stream = self
            .client()?
            .watch(path, recursive)
            .await
            .map_err(|e| self.file_err(e))?;
        Ok(self.agent_stream(stream))
    }

    async fn pty(&self, req: PtyRequest, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        let input =
            input.map(|r| r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>));
        let stream = self
            .client()?
            .pty(&req, input)
            .await
            .map_err(|e| self.agent_err(e))?;
        Ok(self.agent_stream(stream))
    }

    async fn tcp(&self, port: u16, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        let input =
            input.map(|r| r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>));
        let stream = self
            .client()?
            .tcp(port, input)
            .await
            .map_err(|e| self.port_err(e))?;
        Ok(self.agent_stream(stream))
    }

    async fn ports(&self) -> Result<Vec<ListeningPort>, RuntimeError> {
        self.client()?.ports().await.map_err(|e| self.port_err(e))
    }

    async fn bg_start(&self, req: ExecRequest) -> Result<BgInfo, RuntimeError> {
        self.client()?
            .bg_start(&req)
            .await
            .map_err(|e| self.bg_err(e))
    }

    async fn bg_list(&self) -> Result<Vec<BgInfo>, RuntimeError> {
        self.client()?.bg_list().await.map_err(|e| self.bg_err(e))
    }

    async fn bg_stdin(&self, pid: i32, data: Bytes, close: bool) -> Result<(), RuntimeError> {
        self.client()?
            .bg_stdin(pid, data, close)
            .await
            .map_err(|e| self.bg_err(e))
    }

    async fn bg_signal(&self, pid: i32, signal: i32) -> Result<(), RuntimeError> {
        self.client()?
            .bg_signal(pid, signal)
            .await
            .map_err(|e| self.bg_err(e))
    }

    async fn bg_wait(&self, pid: i32) -> Result<i32, RuntimeError> {
        self.client()?
            .bg_wait(pid)
            .await
            .map_err(|e| self.bg_err(e))
    }

    async fn bg_output(&self, pid: i32, follow: bool) -> Result<AgentEvents, RuntimeError> {
        match self.client()?.bg_output(pid, follow).await {
            Err(e) => Err(self.bg_err(e)),
            ok => self.events(ok),
        }
    }

    async fn file_op(&self, op: FileOp) -> Result<FileOpReply, RuntimeError> {
        self.client()?
            .file_op(&op)
            .await
            .map_err(|e| self.file_err(e))
    }

    async fn read_file(&self, path: &str) -> Result<(Option<u64>, ByteStream), RuntimeError> {
        let (size, stream) = self
            .client()?
            .read_file(path)
            .await
            .map_err(|e| self.file_err(e))?;
        Ok((size, self.agent_stream(stream)))
    }

    async fn write_file(&self, path: &str, data: UploadStream) -> Result<WriteReply, RuntimeError> {
        let data =
            data.map(|r| r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>));
        self.client()?
            .write_file(path, data)
            .await
            .map_err(|e| self.file_err(e))
    }

    async fn hibernate(&self) -> Result<(), RuntimeError> {
        self.hibernate_in().await
    }

    async fn fork(&self, children: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        self.fork_in(children).await
    }

    async fn destroy(&self) -> Result<(), RuntimeError> {
        self.destroy_in().await
    }
}

/// Virtual size in bytes of a disk image (readable while QEMU holds it).
async fn image_size(qemu_img: &Path, image: &Path) -> Result<u64, RuntimeError> {
    let out = tokio::process::Command::new(qemu_img)
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .await
        .map_err(|e| RuntimeError::host("qemu-img info", "-", e))?;
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get("virtual-size").and_then(|s| s.as_u64()))
        .ok_or_else(|| {
            RuntimeError::host(
                "qemu-img info",
                "-",
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            )
        })
}

/// Makes a qcow2 overlay on `backing` without opening it (QEMU may hold it).
async fn overlay(qemu_img: &Path, backing: &Path, path: &Path, size: u64) -> std::io::Result<()> {
    let out = tokio::process::Command::new(qemu_img)
        .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(path)
        .arg(size.to_string())
        .output()
        .await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Copies `from` into a new file `to`, data extents only (a guest's RAM file is mostly
/// holes); the bytes copied.
fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::FileExt as _;
    let src = std::fs::File::open(from)?;
    let len = src.metadata()?.len() as i64;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    dst.set_len(len as u64)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut off, mut copied) = (0i64, 0u64);
    while off < len {
        let data = match lseek(src.as_raw_fd(), off, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src.as_raw_fd(), data, Whence::SeekHole)?;
        let mut pos = data;
        while pos < hole {
            let n = (buf.len() as i64).min(hole - pos) as usize;
            src.read_exact_at(&mut buf[..n], pos as u64)?;
            dst.write_all_at(&buf[..n], pos as u64)?;
            pos += n as i64;
            copied += n as u64;
        }
        off = hole;
    }
    let mut perms = dst.metadata()?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o400);
    dst.set_permissions(perms)?;
    Ok(copied)
}

/// The layer files a VM's disk chain rests on, as (existing name, name for a child's
/// dir): the frozen generations `disk-0..=disk-<upto>` of `dir` and its `ref-*` names.
fn chain_refs(dir: &Path, upto: u32) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ino = e
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap_or(0);
            if name.starts_with("ref-") {
                out.push((e.path(), name));
            } else if let Some(n) = name
                .strip_prefix("disk-")
                .and_then(|r| r.strip_suffix(".qcow2"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                if n <= upto {
                    out.push((e.path(), format!("ref-{ino}.qcow2")));
                }
            }
        }
    }
    out
}

/// Deletes the shared disk layers (`<run>/layers/*.qcow2`) no VM needs any more. Every
/// VM dir holds a hard link to each layer under its disk (its own frozen `disk-<n>`
/// generations, `ref-*` for its ancestors'), so a layer whose only name is the one in
/// `layers/` is unused.
fn collect_layers(layers: &Path) {
    let Ok(entries) = std::fs::read_dir(layers) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if std::os::unix::fs::MetadataExt::nlink(&m) == 1
            && e.path().extension().is_some_and(|x| x == "qcow2")
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// True while process `pid` is a QEMU of the VM in `dir` (its command line names it).
fn qemu_of(pid: i32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}
