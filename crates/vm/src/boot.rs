//! Starting a VM: its disks and initramfs, QEMU's command line for a boot, an
//! incoming migration (fork child, wake) or adoption, and the files of a VM's run dir.

use super::*;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::fs::PermissionsExt as _;

impl Inner {
    /// A new VM for `spec`: a copy of the named snapshot it names, else of its
    /// template's boot image when there is one (`pool.rs`), else a cold boot (after
    /// which the boot image is made in the background).
    pub(crate) async fn create(
        self: &Arc<Self>,
        spec: &CreateSpec,
    ) -> Result<Arc<VmInstance>, RuntimeError> {
        self.refuse_unsupported(spec)?;
        let env = (!spec.env.is_empty()).then_some(&spec.env);
        if let Some(snapshot) = &spec.snapshot {
            if !spec.volumes.is_empty() {
                return Err(RuntimeError::Rejected(
                    "a vm sandbox made from a snapshot cannot mount volumes (its guest's \
                     devices are the snapshot's)"
                        .into(),
                ));
            }
            let dir = self.snapshot_dir(snapshot)?;
            let captured = images::Captured::kept_in(&dir).ok_or_else(|| {
                RuntimeError::Rejected(format!(
                    "snapshot {snapshot} was not taken by this server's vm runtime"
                ))
            })?;
            captured
                .fits(spec)
                .map_err(|why| RuntimeError::Rejected(format!("snapshot {snapshot}: {why}")))?;
            return self.restore_copy(spec, &captured, env).await;
        }
        // A boot image has no volume devices: a create with volumes boots.
        let image = match spec.volumes.is_empty() {
            true => self.boot_image(spec).await,
            false => None,
        };
        if let Some(image) = image {
            match self.restore_copy(spec, &image, env).await {
                Ok(vm) => return Ok(vm),
                Err(e) => {
                    tracing::warn!(sandbox = %spec.id, error = %e, "restoring the boot image failed; booting")
                }
            }
        }
        let vm = self.boot_fresh(spec).await?;
        self.make_image_later(spec);
        Ok(vm)
    }

    fn refuse_unsupported(&self, spec: &CreateSpec) -> Result<(), RuntimeError> {
        if spec.egress.as_ref().is_some_and(|h| !h.is_empty()) && self.egress.is_none() {
            return Err(RuntimeError::Rejected(
                "this server's vm runtime has no egress (egress_allowlist)".into(),
            ));
        }
        if spec.memory_bytes >> 20 < 128 {
            return Err(RuntimeError::Rejected(
                "the vm runtime needs memory_mb of at least 128".into(),
            ));
        }
        Ok(())
    }

    /// A cold boot of `spec`'s template.
    pub(crate) async fn boot_fresh(
        self: &Arc<Self>,
        spec: &CreateSpec,
    ) -> Result<Arc<VmInstance>, RuntimeError> {
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
        // The disk: a copy-on-write overlay on the template's image (absolute backing
        // path), `disk_mb` bigger (the guest grows its file system to fill it).
        let size = self.disk_size(spec).await?;
        disks::overlay(&image, &vm.disk, size)
            .await
            .map_err(fail("make disk overlay"))?;
        let init = VmInit {
            id: id.clone(),
            env: spec.env.clone(),
            port: AGENT_PORT.into(),
            // A guest booted to make a boot image ends soon after its server: its
            // QEMU drops to its jail uid, which clears the parent-death signal.
            orphan_grace_s: if id.starts_with(pool::IMAGE_VM_PREFIX) {
                Some(IMAGE_VM_GRACE_S)
            } else {
                self.cfg.orphan_grace.map(|g| g.as_secs().max(1))
            },
            volumes: spec
                .volumes
                .iter()
                .enumerate()
                .map(|(i, v)| forkbox_types::agent::VmVolume {
                    serial: volume_serial(i),
                    mount: v.mount.clone(),
                    read_only: v.read_only,
                })
                .collect(),
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
    pub(crate) async fn boot(
        self: &Arc<Self>,
        spec: &CreateSpec,
        source: Source<'_>,
    ) -> Result<Arc<VmInstance>, RuntimeError> {
        let accel = self.accel().await;
        let id = spec.id.clone();
        let vm = Vm::paths(&self.cfg.run_dir.join(&id));
        let ram = self.ram_file(&id);
        let (memory_mb, smp) = images::limits_of(spec);
        let fail = |op: &'static str| {
            let id = id.clone();
            move |e: std::io::Error| RuntimeError::host(op, &id, e)
        };
        // A fresh RAM file every time (a stale one of another size stops QEMU), made
        // here so that only root reads it (QEMU would make it 0644).
        let _ = std::fs::remove_file(&ram);
        if !matches!(source, Source::Fork { .. } | Source::Adopt { .. }) {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&ram)
                .map_err(fail("make the RAM file"))?;
        }
        // Nothing of an earlier QEMU of this VM may still run (it could write the disk
        // about to be checked): a woken guest's, say, that hid from its watcher.
        if matches!(source, Source::Restore(_)) {
            self.kill_leftovers(&id, &vm.dir).await;
        }
        // Root opens the disk chain (QEMU drops to its uid after opening its files): no
        // image of it may name a file of the host's (an earlier, jailed QEMU of this VM
        // could write its own disk, header included).
        let trusted = self.trusted(&vm.dir);
        let top = vm.active_disk().1;
        tokio::task::spawn_blocking(move || check_chain(&top, &trusted))
            .await
            .map_err(|e| RuntimeError::host("check the disk chain", &id, e))?
            .map_err(|e| {
                RuntimeError::host("check the disk chain", &id, std::io::Error::other(e))
            })?;
        // Its jail (`jailer.rs`): a uid of its own, which its active disk becomes (QEMU
        // reopens it by name), and a root holding only its directory.
        let jail = match self.cfg.qemu_uid_base {
            Some(base) => {
                let uid = jailer::claim(Path::new(jailer::CLAIMS), base, &vm.dir)
                    .map_err(fail("claim a QEMU uid"))?;
                std::fs::set_permissions(&vm.dir, std::fs::Permissions::from_mode(0o711))
                    .map_err(fail("open the VM dir to its QEMU"))?;
                jailer::give(&vm.active_disk().1, uid).map_err(fail("give QEMU its disk"))?;
                let needs = [
                    self.cfg.assets_dir.as_path(),
                    &self.cfg.ram_dir,
                    &self.cfg.volumes_dir,
                ];
                let plan = jailer::Plan::new(&self.cfg.run_dir, &vm.dir, &needs)
                    .map_err(fail("plan QEMU's root"))?;
                Some((uid, plan))
            }
            None => None,
        };
        let log = std::fs::File::create(&vm.qemu_log).map_err(fail("make QEMU log"))?;
        // Its console: a FIFO QEMU writes, the server already reading (`console.rs`).
        let fifo = console::make_fifo(&vm.console_fifo).map_err(fail("make the console FIFO"))?;
        let pump = console::Pump::start(fifo.read, vm.console.clone(), &id)
            .map_err(fail("read the console"))?;
        let console_fd = fifo.write;
        let log2 = log.try_clone().map_err(fail("make QEMU log"))?;
        // A VM booted to make a boot image is no sandbox: it ends with the server (an
        // unjailed QEMU at once; a jailed one loses the parent-death signal when it
        // drops to its uid, its guest powers off `IMAGE_VM_GRACE_S` after the server).
        let die_with_server = id.starts_with(pool::IMAGE_VM_PREFIX);
        // A PID namespace of its own, QEMU its PID 1: util-linux's `unshare --pid
        // --fork` makes it and waits for QEMU (the server keeps QEMU's host pid).
        let mut cmd = tokio::process::Command::new(UNSHARE);
        cmd.args(["--pid", "--fork"]);
        if die_with_server {
            cmd.arg("--kill-child=SIGKILL");
        }
        cmd.arg("--").arg(&self.cfg.qemu_bin);
        cmd.args(["-M", "microvm"])
            .args(accel.qemu_args())
            .args(["-m", &format!("{memory_mb}M"), "-smp", &smp.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-add-fd"])
            .arg(format!(
                "fd={},set={CONSOLE_FDSET}",
                std::os::fd::AsRawFd::as_raw_fd(&console_fd)
            ))
            // (`append=on`: QEMU would truncate the file, which a FIFO refuses.)
            .args([
                "-chardev",
                &format!("file,id=con0,path=/dev/fdset/{CONSOLE_FDSET},append=on"),
                "-serial",
                "chardev:con0",
            ])
            .args([
                "-sandbox",
                // A jailed QEMU drops to its uid itself (set*id calls), after which it
                // has no capability to raise it again.
                if jail.is_some() {
                    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
                } else {
                    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
                },
            ])
            .arg("-object")
            .arg(match source {
                // A copy maps the capture's sealed RAM privately (copy-on-write), a
                // descriptor it inherits (`ram.rs`).
                Source::Fork { ram: sealed, .. } => format!(
                    "memory-backend-file,id=ram0,size={memory_mb}M,mem-path={},share=off",
                    sealed.mem_path().display()
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
            .args(self.volume_args(spec))
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
            // Its temporary files (a read-only volume's overlay) go with the VM's dir.
            .env("TMPDIR", &vm.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        if !matches!(source, Source::Boot) {
            cmd.args(["-incoming", "defer"]);
        }
        if let Some((uid, plan)) = &jail {
            cmd.arg("-chroot")
                .arg(plan.root())
                .arg("-runas")
                .arg(format!("{uid}:{uid}"));
        }
        let plan = jail.map(|(_, p)| p);
        // A session and process group of its own: signals to the server's group (a
        // terminal's Ctrl-C, `timeout`, a supervisor) leave the VM alone. Network, IPC
        // and UTS namespaces of its own: QEMU needs none of the host's (its sockets
        // are files), so a QEMU taken over by its guest reaches no host network.
        // The sealed RAM a copy maps, inherited (its descriptor stays open meanwhile).
        // So is the console FIFO's write end.
        let inherit = [
            match source {
                Source::Fork { ram, .. } => Some(ram.raw_fd()),
                _ => None,
            },
            Some(std::os::fd::AsRawFd::as_raw_fd(&console_fd)),
        ];
        let seccomp = self.seccomp.clone();
        // SAFETY: setsid, unshare, prctl, fcntl and seccomp are async-signal-safe and
        // touch no memory of ours (the filters were compiled before the fork).
        unsafe {
            cmd.pre_exec(move || {
                for fd in inherit.into_iter().flatten() {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // A jailed QEMU's mount namespace is its own too (its root, `jailer.rs`).
                let mount_ns = if plan.is_some() { libc::CLONE_NEWNS } else { 0 };
                if libc::setsid() < 0
                    || libc::unshare(
                        libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | mount_ns,
                    ) < 0
                    || (die_with_server
                        && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(plan) = &plan {
                    plan.enter()?;
                }
                // forkbox's deny-list beneath QEMU's own filter (inherited by
                // `unshare` and QEMU; allocates nothing).
                for f in seccomp.iter() {
                    forkbox_sys::seccomp::install_one(f)
                        .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))?;
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(fail("start QEMU"))?;
        // QEMU holds the console's write end now: the FIFO ends when QEMU does.
        drop(console_fd);
        let waiter = child.id().map(|p| p as i32).unwrap_or(0);
        let pid = qemu_under(waiter, &mut child, &id).await;
        // Its pid, for a later server (adoption, clean-up), written by us: QEMU's own
        // `-pidfile` would be a file it keeps open and could rewrite.
        let recorded = pid.and_then(|pid| {
            std::fs::write(&vm.pidfile, pid.to_string())
                .map(|()| pid)
                .map_err(fail("record QEMU's pid"))
        });
        // Its limits before the guest runs (its RAM is touched, and charged, later).
        let pid = match recorded.and_then(|pid| self.confine(&id, pid, spec).map(|()| pid)) {
            Ok(pid) => pid,
            Err(e) => {
                kill_start(waiter, &mut child);
                let _ = child.wait().await;
                self.release_cgroup(&id);
                return Err(e);
            }
        };
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
            memory_mb,
            smp,
            volumes: spec.volumes.clone(),
            egress: Default::default(),
            client: tokio::sync::OnceCell::new(),
            qmp: tokio::sync::Mutex::new(None),
            console: std::sync::Mutex::new(Some(pump)),
            alive,
            exited,
            rt: self.clone(),
            oom_kills: Default::default(),
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
        let connected = match (connected, spec.egress.as_deref()) {
            (Ok(()), Some(hosts)) if !hosts.is_empty() => {
                // A paused guest cannot answer; its listener runs since before.
                let listen = !matches!(source, Source::Adopt { paused: true });
                instance.start_egress(hosts, listen).await
            }
            (r, _) => r,
        };
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
                let e = instance.with_console(e).await;
                instance.stop_qemu().await;
                Err(e)
            }
        }
    }
}

/// util-linux's `unshare` (Debian: essential), which gives QEMU its PID namespace.
const UNSHARE: &str = "unshare";

/// The host pid of the QEMU that `unshare` (pid `waiter`, `child`) forked into its
/// PID namespace, once it is there; should `unshare` end first, or QEMU not appear,
/// an error (and both are killed: `unshare` leads the process group QEMU is in).
async fn qemu_under(
    waiter: i32,
    child: &mut tokio::process::Child,
    id: &str,
) -> Result<i32, RuntimeError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = children_of(waiter).into_iter().next() {
            return Ok(pid);
        }
        let ended = match child.try_wait() {
            Ok(Some(status)) => Some(format!("unshare ended: {status}")),
            Ok(None) if Instant::now() > deadline => Some("QEMU did not start in 10 s".into()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = ended {
            kill_start(waiter, child);
            return Err(RuntimeError::host(
                "start QEMU",
                id,
                std::io::Error::other(why),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Kills a QEMU start that failed: `unshare` (pid `waiter`, `child`) and QEMU, its
/// process group (`unshare` leads it: `setsid`).
fn kill_start(waiter: i32, child: &mut tokio::process::Child) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(waiter),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.start_kill();
}

/// The children of process `pid`: from `/proc/<pid>/task/<pid>/children`, or, on a
/// kernel without it, from every process's parent.
fn children_of(pid: i32) -> Vec<i32> {
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        return text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    }
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            // `stat`: "pid (comm) state ppid …"; comm may hold anything but ')'.
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// The serial number the guest finds volume `i` of its sandbox by.
fn volume_serial(i: usize) -> String {
    format!("forkbox-vol{i}")
}

impl Inner {
    /// The size of `spec`'s root disk: its template's image and `disk_mb` more.
    pub(crate) async fn disk_size(&self, spec: &CreateSpec) -> Result<u64, RuntimeError> {
        Ok(image_size(&self.image(&spec.template)).await? + spec.disk_bytes)
    }

    /// QEMU's arguments for `spec`'s volumes: each image a virtio-blk device (QEMU
    /// locks the images it opens).
    fn volume_args(&self, spec: &CreateSpec) -> Vec<String> {
        let mut args = Vec::with_capacity(spec.volumes.len() * 4);
        for (i, v) in spec.volumes.iter().enumerate() {
            let image = self
                .cfg
                .volumes_dir
                .join(forkbox_core::volumes::image_file(&v.id));
            args.push("-drive".into());
            // A read-only volume is a read-only device: the guest cannot write a byte
            // of it (nor fill the host's disk through an overlay).
            args.push(format!(
                "id=v{i},file={},format=raw,if=none,readonly={}",
                image.display(),
                if v.read_only { "on" } else { "off" }
            ));
            args.push("-device".into());
            args.push(format!(
                "virtio-blk-device,drive=v{i},serial={}",
                volume_serial(i)
            ));
        }
        args
    }
}

/// What a VM starts from.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// A cold boot of the kernel.
    Boot,
    /// A whole saved VM (hibernation).
    Restore(&'a Path),
    /// A copy (fork child, a copy of a boot image or a snapshot): the capture's device
    /// state and its RAM, mapped privately.
    Fork {
        state: &'a Path,
        ram: &'a crate::ram::SealedRam,
    },
    /// A QEMU an earlier server started, found running (`paused`: its vCPUs are stopped).
    Adopt { paused: bool },
}

impl Source<'_> {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Source::Boot => "boot",
            Source::Restore(_) => "restore",
            Source::Fork { .. } => "fork",
            Source::Adopt { .. } => "adopt",
        }
    }
}

/// Removes a half-made VM's files unless defused.
pub(crate) struct Cleanup {
    pub(crate) dir: PathBuf,
    pub(crate) ram: PathBuf,
    pub(crate) armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_file(&self.ram);
        }
    }
}

/// The QEMU fd set (`-add-fd`) holding the console FIFO's write end.
const CONSOLE_FDSET: u32 = 1;

/// How long a guest making a boot image outlives a server that went away.
const IMAGE_VM_GRACE_S: u64 = 10;

/// The files of one VM.
#[derive(Debug, Clone)]
pub(crate) struct Vm {
    pub(crate) dir: PathBuf,
    /// The first disk overlay (`disk-0.qcow2`); a fork adds `disk-<n+1>.qcow2` on the
    /// frozen `disk-<n>` (see [`Vm::active_disk`]).
    pub(crate) disk: PathBuf,
    pub(crate) initrd: PathBuf,
    /// What the guest printed on its console (`console.rs`), and the FIFO QEMU
    /// writes it to.
    pub(crate) console: PathBuf,
    pub(crate) console_fifo: PathBuf,
    pub(crate) qemu_log: PathBuf,
    pub(crate) agent_sock: PathBuf,
    pub(crate) qmp_sock: PathBuf,
    pub(crate) pidfile: PathBuf,
    /// The saved VM (device state and RAM) of a hibernated sandbox.
    pub(crate) state: PathBuf,
}

impl Vm {
    /// The disk image QEMU writes to: the overlay of the highest generation. Older
    /// generations stay under their names, since a running QEMU reopens its images by
    /// name (e.g. read-only when a migration completes).
    pub(crate) fn active_disk(&self) -> (u32, PathBuf) {
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

    pub(crate) fn paths(dir: &Path) -> Vm {
        Vm {
            dir: dir.to_path_buf(),
            disk: dir.join("disk-0.qcow2"),
            initrd: dir.join("initrd.cpio"),
            console: dir.join("console.log"),
            console_fifo: dir.join("console.fifo"),
            qemu_log: dir.join("qemu.log"),
            agent_sock: dir.join("agent.sock"),
            qmp_sock: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            state: dir.join("hibernated.state"),
        }
    }
}
