//! Memory images of a VM: a capture (stopped for a moment: disk layer, device state,
//! RAM) restored into any number of copies — fork children, sandboxes made from a
//! named snapshot or from a template's boot image (`pool.rs`) — and hibernation
//! (state to disk, QEMU stopped).

use super::*;
use crate::ram::{self, SealedRam};
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

/// A VM captured while stopped: what a copy of it needs to start.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    /// The frozen disk (a layer in `<run>/layers/`), the backing of each copy's overlay.
    pub(crate) disk: PathBuf,
    /// Its virtual size.
    pub(crate) size: u64,
    /// The migration stream: device state only when `ram` is set (the RAM is that
    /// copy, skipped with `x-ignore-shared`), else device state and RAM (a capture
    /// an earlier version kept).
    pub(crate) state: PathBuf,
    /// A copy of the guest's RAM, mapped privately (copy-on-write) by each copy.
    pub(crate) ram: Option<RamCopy>,
    /// The guest's RAM in MiB and vCPUs: a copy has the same.
    pub(crate) memory_mb: u64,
    pub(crate) smp: u64,
    /// The initramfs on the captured VM's command line (a copy's QEMU needs one; the
    /// guest's memory is the captured one's).
    pub(crate) initrd: PathBuf,
    /// The layers under `disk` (`disk` itself included) as (a name of it, the name a
    /// copy's dir holds it by: see `collect_layers`).
    pub(crate) refs: Vec<(PathBuf, String)>,
}

/// Where a capture's RAM copy is.
#[derive(Debug, Clone)]
pub(crate) enum RamCopy {
    /// A file on disk (a kept capture's): copies map a sealed copy of it
    /// (`Inner::sealed_ram`).
    File(PathBuf),
    /// A sealed memfd (a fork's), mapped by the children as it is.
    Sealed(Arc<SealedRam>),
}

/// A capture kept in a directory of its own (a named snapshot's, a boot image's):
/// its files there under fixed names (`state`, `memory`, `initrd.cpio`), a name of
/// every layer under its disk, and this description.
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    disk: PathBuf,
    size: u64,
    whole_stream: bool,
    memory_mb: u64,
    smp: u64,
    refs: Vec<String>,
}

const KEPT_JSON: &str = "captured.json";
/// The names of a kept capture's files in its directory.
pub(crate) const KEPT_STATE: &str = "state";
pub(crate) const KEPT_RAM: &str = "memory";
pub(crate) const KEPT_INITRD: &str = "initrd.cpio";

impl Captured {
    /// Keeps this capture, whose stream and RAM copy were written into `dir` as
    /// [`KEPT_STATE`] and [`KEPT_RAM`]: the initramfs copied there, a name of every
    /// layer under its disk made there (so they outlive the VM it was taken from),
    /// and its description.
    pub(crate) fn keep_in(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::copy(&self.initrd, dir.join(KEPT_INITRD))?;
        for (src, name) in &self.refs {
            std::fs::hard_link(src, dir.join(name))?;
        }
        let kept = Kept {
            disk: self.disk.clone(),
            size: self.size,
            whole_stream: self.ram.is_none(),
            memory_mb: self.memory_mb,
            smp: self.smp,
            refs: self.refs.iter().map(|(_, n)| n.clone()).collect(),
        };
        let json = serde_json::to_vec_pretty(&kept).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(KEPT_JSON), json)
    }

    /// The capture kept in `dir`, if there is one.
    pub(crate) fn kept_in(dir: &Path) -> Option<Captured> {
        let raw = std::fs::read(dir.join(KEPT_JSON)).ok()?;
        let k: Kept = serde_json::from_slice(&raw).ok()?;
        Some(Captured {
            disk: k.disk,
            size: k.size,
            state: dir.join(KEPT_STATE),
            ram: (!k.whole_stream).then(|| RamCopy::File(dir.join(KEPT_RAM))),
            memory_mb: k.memory_mb,
            smp: k.smp,
            initrd: dir.join(KEPT_INITRD),
            refs: k.refs.into_iter().map(|n| (dir.join(&n), n)).collect(),
        })
    }

    /// Whether a VM made with `spec`'s limits can be a copy of this one.
    pub(crate) fn fits(&self, spec: &CreateSpec) -> Result<(), String> {
        let (memory_mb, smp) = limits_of(spec);
        if (memory_mb, smp) == (self.memory_mb, self.smp) {
            Ok(())
        } else {
            Err(format!(
                "it holds a guest of {} MiB and {} vCPU(s): create with memory_mb {} and \
                 cpu {}",
                self.memory_mb, self.smp, self.memory_mb, self.smp
            ))
        }
    }
}

/// A sandbox's guest RAM in MiB and its vCPUs.
pub(crate) fn limits_of(spec: &CreateSpec) -> (u64, u64) {
    (
        spec.memory_bytes >> 20,
        spec.cpu_millis.div_ceil(1000).clamp(1, 64),
    )
}

/// The largest device state (RAM not included) a capture takes from a QEMU.
const MAX_DEVICE_STATE: u64 = 8 << 20;

/// A name for files of VM `id` that no other capture of it has.
pub(crate) fn layer_tag(id: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{id}-{nanos}")
}

/// Where a capture's stream and RAM copy go.
pub(crate) struct CaptureTo<'a> {
    pub(crate) state: &'a Path,
    /// A file made for the RAM copy (mode 0400), or none: a sealed memfd.
    pub(crate) ram: Option<&'a Path>,
    /// Run the VM again afterwards (it was running).
    pub(crate) resume: bool,
}

impl VmInstance {
    /// Captures this VM (see [`Captured`]): stopped, its disk frozen into a layer it
    /// runs on top of from now on, its device state and a sparse copy of its RAM
    /// taken, then run again if `to.resume`. The RAM of a VM that is itself a copy
    /// (a private mapping of another capture's) is the mapped copy and the pages it
    /// wrote (`ram::copy_private_ram`), its device state taken without RAM.
    pub(crate) async fn capture(&self, to: CaptureTo<'_>) -> Result<Captured, RuntimeError> {
        let rt = self.rt.clone();
        let io = |op: &'static str| {
            let id = self.id.clone();
            move |e: std::io::Error| RuntimeError::host(op, &id, e)
        };
        let layers = rt.cfg.run_dir.join("layers");
        std::fs::create_dir_all(&layers).map_err(io("capture"))?;
        let tag = layer_tag(&self.id);
        // The frozen disk is shared by this VM (as its new backing) and the copies,
        // so it lives outside every sandbox's run dir.
        let layer_disk = layers.join(format!("{tag}.qcow2"));
        let (generation, current) = self.vm.active_disk();
        let size = image_size(&current).await?;
        let next = self.vm.dir.join(format!("disk-{}.qcow2", generation + 1));
        let own_ram = self.ram.exists();
        let len = self.memory_mb << 20;
        // A copy's RAM is read from its QEMU's memory: through its `/proc` directory,
        // opened while it is known to be this VM's QEMU (its pid could be another
        // process's by the time of the copy, should it die meanwhile).
        let uid = rt.jail_uid(&self.vm.dir);
        let mut proc = if own_ram {
            None
        } else {
            Some(ram::ProcDir::of_qemu(self.pid, &self.vm.dir, uid).map_err(io("capture"))?)
        };
        let state_file = std::fs::File::create(to.state).map_err(io("capture"))?;
        let ram_file = match to.ram {
            Some(path) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(path)
                .and_then(|f| f.set_len(len).map(|()| f)),
            None => ram::new_memfd(len),
        }
        .map_err(io("capture"))?;
        let started = Instant::now();
        let copied = {
            let mut g = self.qmp.lock().await;
            let q = g.as_mut().ok_or_else(|| {
                RuntimeError::host("capture", &self.id, std::io::Error::other("no QMP"))
            })?;
            let host = |e: qmp::QmpError| RuntimeError::host("capture", &self.id, e);
            q.stop().await.map_err(host)?;
            let r: Result<u64, RuntimeError> = async {
                // Disk first (migration inactivates the images until `cont`): a new
                // overlay naming the layer as its backing becomes QEMU's active image
                // (it keeps the frozen one as that backing in memory), then the layer
                // is made by root as a checked copy of the frozen image. No QEMU ever
                // holds the layer, which children and snapshots stand on, writable (a
                // jailed QEMU can rewrite its own disk, header included, and keeps its
                // descriptors).
                overlay(&layer_disk, &next, size)
                    .await
                    .map_err(io("capture"))?;
                // A jailed QEMU opens its new disk by name as its own uid.
                if let Some(uid) = uid {
                    jailer::give(&next, uid).map_err(io("capture"))?;
                }
                if let Err(e) = q.snapshot_disk("d0", &next).await {
                    // Not switched: the active image is still the frozen one.
                    let _ = std::fs::remove_file(&next);
                    return Err(host(e));
                }
                let (from, layer) = (current.clone(), layer_disk.clone());
                let (trusted, limit) = (rt.trusted(&self.vm.dir), size);
                tokio::task::spawn_blocking(move || copy_layer(&from, &layer, &trusted, limit))
                    .await
                    .map_err(|e| RuntimeError::host("capture", &self.id, e))?
                    .map_err(|e| {
                        RuntimeError::host(
                            "copy the frozen disk",
                            &self.id,
                            std::io::Error::other(e),
                        )
                    })?;
                if own_ram {
                    q.getfd("state", std::os::fd::AsFd::as_fd(&state_file))
                        .await
                        .map_err(host)?;
                    q.save_devices_to_fd("state", Duration::from_secs(60))
                        .await
                        .map_err(host)?;
                } else {
                    // A private mapping is RAM `x-ignore-shared` does not skip: the
                    // device state alone, made a stream copies load.
                    let devices = ram::new_memfd(0).map_err(io("capture"))?;
                    let write_only = std::fs::OpenOptions::new()
                        .write(true)
                        .open(format!("/proc/self/fd/{}", devices.as_raw_fd()))
                        .map_err(io("capture"))?;
                    q.save_devices_only(std::os::fd::AsFd::as_fd(&write_only))
                        .await
                        .map_err(host)?;
                    // (~60 KiB; a QEMU taken over by its guest could write without
                    // end: bounded.)
                    let mut raw = Vec::new();
                    (&devices)
                        .take(MAX_DEVICE_STATE + 1)
                        .read_to_end(&mut raw)
                        .map_err(io("capture"))?;
                    if raw.len() as u64 > MAX_DEVICE_STATE {
                        return Err(io("capture")(std::io::Error::other(
                            "a device state larger than 8 MiB",
                        )));
                    }
                    let stream = ram::devices_only_stream(&raw).map_err(io("capture"))?;
                    (&state_file).write_all(&stream).map_err(io("capture"))?;
                }
                let own = own_ram.then(|| self.ram.clone());
                let into = ram_file.try_clone().map_err(io("capture"))?;
                let proc = proc.take();
                tokio::task::spawn_blocking(move || match (own, proc) {
                    (Some(from), _) => ram::copy_data(&std::fs::File::open(from)?, &into, len),
                    (None, Some(proc)) => ram::copy_private_ram(&proc, len, &into),
                    (None, None) => Err(std::io::Error::other("no QEMU to read the RAM of")),
                })
                .await
                .map_err(|e| RuntimeError::host("capture", &self.id, e))?
                .map_err(io("copy RAM"))
            }
            .await;
            let resumed = if to.resume { q.cont().await } else { Ok(()) };
            match (r, resumed) {
                (Ok(n), Ok(())) => n,
                (Err(e), _) => {
                    if let Some(path) = to.ram {
                        let _ = std::fs::remove_file(path);
                    }
                    let _ = std::fs::remove_file(to.state);
                    if !next.exists() {
                        let _ = std::fs::remove_file(&layer_disk);
                    }
                    return Err(e);
                }
                (Ok(_), Err(e)) => return Err(host(e)),
            }
        };
        drop(state_file);
        let ram = match to.ram {
            Some(path) => RamCopy::File(path.to_path_buf()),
            None => RamCopy::Sealed(Arc::new(
                SealedRam::seal(ram_file).map_err(io("seal the RAM copy"))?,
            )),
        };
        tracing::info!(
            sandbox = %self.id,
            paused_ms = started.elapsed().as_millis() as u64,
            ram_copied_mib = copied >> 20,
            own_ram,
            "vm captured"
        );
        Ok(Captured {
            disk: layer_disk,
            size,
            state: to.state.to_path_buf(),
            ram: Some(ram),
            memory_mb: self.memory_mb,
            smp: self.smp,
            initrd: self.vm.initrd.clone(),
            refs: chain_refs(&self.vm.dir, generation),
        })
    }

    /// One child per spec from this VM's current state, every process and all memory
    /// included: a capture (RAM copy on the RAM tmpfs, dropped once every child maps
    /// it), restored into each child in parallel.
    pub(crate) async fn fork_in(&self, specs: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        if let Some(v) = self.volumes.iter().find(|v| !v.read_only) {
            return Err(RuntimeError::Conflict(format!(
                "{} has volume {} attached writable: a guest's file system is its kernel's \
                 alone, so its copies cannot have it too",
                self.id, v.id
            )));
        }
        let rt = self.rt.clone();
        let tag = layer_tag(&self.id);
        let state = rt.cfg.run_dir.join("layers").join(format!("{tag}.state"));
        let started = Instant::now();
        let captured = self
            .capture(CaptureTo {
                state: &state,
                ram: None,
                resume: true,
            })
            .await?;
        let boots = specs
            .iter()
            .map(|spec| rt.restore_copy(spec, &captured, None));
        let results = futures_util::future::join_all(boots).await;
        // Every child has its private mapping now; the copy's pages live on in them
        // (the memfd goes with the last of them).
        drop(captured);
        let _ = std::fs::remove_file(&state);
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
            not_carried: "nothing inside the guest (it is copied whole); connections held \
                          from outside, such as open terminals and streams, stay with the parent"
                .into(),
        })
    }

    /// Named snapshot `snapshot`: a capture kept in `<run>/snapshots/<snapshot>/`
    /// (its RAM copy on disk), every process and all memory included.
    pub(crate) async fn snapshot_in(
        &self,
        snapshot: &str,
        running: bool,
    ) -> Result<(), RuntimeError> {
        if !self.volumes.is_empty() {
            return Err(RuntimeError::Rejected(format!(
                "{} has volumes attached: a vm snapshot holds the guest's devices, and a \
                 volume is not part of it",
                self.id
            )));
        }
        let dir = self.rt.snapshot_dir(snapshot)?;
        let io = |e: std::io::Error| RuntimeError::host("snapshot", &self.id, e);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let made = async {
            self.capture(CaptureTo {
                state: &dir.join(KEPT_STATE),
                ram: Some(&dir.join(KEPT_RAM)),
                resume: running,
            })
            .await?
            .keep_in(&dir)
            .map_err(io)
        }
        .await;
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
            collect_layers(&self.rt.cfg.run_dir.join("layers"));
        }
        made
    }

    /// Saves the whole VM (device state and RAM) into its run dir and stops QEMU.
    pub(crate) async fn hibernate_in(&self) -> Result<(), RuntimeError> {
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
}

impl Inner {
    /// A new VM `spec.id` that is a copy of `captured` (memory, processes, files) on an
    /// overlay of its disk, with its own host name and, if `env` is given, that
    /// environment. On failure nothing of it is left.
    pub(crate) async fn restore_copy(
        self: &Arc<Self>,
        spec: &CreateSpec,
        captured: &Captured,
        env: Option<&BTreeMap<String, String>>,
    ) -> Result<Arc<VmInstance>, RuntimeError> {
        let dir = self.cfg.run_dir.join(&spec.id);
        let vm = Vm::paths(&dir);
        let io = |e: std::io::Error| RuntimeError::host("restore vm", &spec.id, e);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let made = async {
            // The copy holds a name of every layer under its disk (`collect_layers`).
            for (src, name) in &captured.refs {
                std::fs::hard_link(src, dir.join(name)).map_err(io)?;
            }
            overlay(&captured.disk, &vm.disk, captured.size)
                .await
                .map_err(io)?;
            // Only for QEMU's command line (the guest's memory is the capture's): a
            // second name will do.
            std::fs::hard_link(&captured.initrd, &vm.initrd)
                .or_else(|_| std::fs::copy(&captured.initrd, &vm.initrd).map(|_| ()))
                .map_err(io)?;
            let sealed = match &captured.ram {
                Some(RamCopy::Sealed(ram)) => Some(ram.clone()),
                Some(RamCopy::File(path)) => Some(self.sealed_ram(path).await?),
                None => None,
            };
            let source = match &sealed {
                Some(ram) => Source::Fork {
                    state: &captured.state,
                    ram,
                },
                None => Source::Restore(&captured.state),
            };
            let copy = self.boot(spec, source).await?;
            let own = async {
                // Its memory is another VM's, hostname included: its own instead.
                copy.refresh_identity(&spec.id, env).await?;
                // Its disk: at least the origin's, grown to its own `disk_mb`.
                let want = self.disk_size(spec).await?;
                if want > captured.size {
                    copy.grow_disk(want).await?;
                }
                Ok::<(), RuntimeError>(())
            }
            .await;
            if let Err(e) = own {
                let _ = copy.destroy().await;
                return Err(e);
            }
            Ok(copy)
        }
        .await;
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(self.ram_file(&spec.id));
            collect_layers(&self.cfg.run_dir.join("layers"));
        }
        made
    }

    /// Where named snapshot `snapshot` is kept.
    pub(crate) fn snapshot_dir(&self, snapshot: &str) -> Result<PathBuf, RuntimeError> {
        if snapshot.is_empty()
            || !snapshot
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(RuntimeError::Rejected(format!(
                "invalid snapshot id {snapshot:?}"
            )));
        }
        Ok(self.cfg.run_dir.join("snapshots").join(snapshot))
    }
}

/// Makes `layer` a copy of the frozen disk image `frozen` (root's, read-only to
/// others), checked before it is named, and then `frozen`'s name in its VM's dir a
/// name of the layer too (the VM's chain and its children's `ref-*` names count the
/// layer's links; QEMU reopens its backing by that name, read-only). A layer is only
/// ever opened read-only, by QEMUs of other sandboxes too.
///
/// `size` is the disk's virtual size: a qcow2 file much larger than it (holes a QEMU
/// made with `ftruncate`) is refused, and holes are not copied.
fn copy_layer(frozen: &Path, layer: &Path, trusted: &Trusted, size: u64) -> Result<(), String> {
    let tmp = layer.with_extension("qcow2.tmp");
    let len = std::fs::metadata(frozen)
        .map_err(|e| format!("{}: {e}", frozen.display()))?
        .len();
    // The data plus generous room for qcow2's metadata.
    if len > size.saturating_add(size / 8).saturating_add(256 << 20) {
        return Err(format!(
            "{} is {len} bytes for a {size}-byte disk",
            frozen.display()
        ));
    }
    let _ = std::fs::remove_file(&tmp);
    let made = (|| {
        sparse_copy(frozen, &tmp).map_err(|e| format!("copy {}: {e}", frozen.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;
        check_qcow2(&tmp, trusted)?;
        std::fs::rename(&tmp, layer).map_err(|e| e.to_string())
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return made;
    }
    let name = frozen.with_extension("qcow2.link");
    let _ = std::fs::remove_file(&name);
    std::fs::hard_link(layer, &name)
        .and_then(|()| std::fs::rename(&name, frozen))
        .map_err(|e| format!("name the layer in the VM's dir: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A kept capture names its files in its own dir (so the dir can be renamed into
    /// place), holds a name of every layer under its disk, and is found again whole.
    #[test]
    fn a_kept_capture_is_found_again_in_its_dir() {
        let t = tempfile::tempdir().unwrap();
        let (vm_dir, keep) = (t.path().join("vm"), t.path().join("kept"));
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::create_dir_all(&keep).unwrap();
        let layer = vm_dir.join("disk-0.qcow2");
        std::fs::write(&layer, b"layer").unwrap();
        std::fs::write(vm_dir.join("initrd.cpio"), b"initrd").unwrap();
        let c = Captured {
            disk: t.path().join("layers/x.qcow2"),
            size: 1 << 30,
            state: keep.join(KEPT_STATE),
            ram: Some(RamCopy::File(keep.join(KEPT_RAM))),
            memory_mb: 512,
            smp: 1,
            initrd: vm_dir.join("initrd.cpio"),
            refs: vec![(layer.clone(), "ref-7.qcow2".into())],
        };
        c.keep_in(&keep).unwrap();
        let moved = t.path().join("moved");
        std::fs::rename(&keep, &moved).unwrap();
        let k = Captured::kept_in(&moved).unwrap();
        assert_eq!(k.disk, c.disk);
        assert_eq!((k.size, k.memory_mb, k.smp), (1 << 30, 512, 1));
        assert_eq!(k.state, moved.join(KEPT_STATE));
        assert!(matches!(&k.ram, Some(RamCopy::File(p)) if *p == moved.join(KEPT_RAM)));
        assert_eq!(std::fs::read(&k.initrd).unwrap(), b"initrd");
        assert_eq!(
            k.refs,
            [(moved.join("ref-7.qcow2"), "ref-7.qcow2".to_owned())]
        );
        // The layer has a second name: it outlives the VM's dir.
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(std::fs::metadata(&layer).unwrap().nlink(), 2);
        // A copy must have the captured guest's size.
        let spec = |mb: u64, millis: u64| CreateSpec {
            id: "sbx-x".into(),
            template: "python".into(),
            cpu_millis: millis,
            memory_bytes: mb << 20,
            disk_bytes: 0,
            pids_max: 0,
            env: Default::default(),
            snapshot: None,
            egress: None,
            volumes: Vec::new(),
        };
        assert!(k.fits(&spec(512, 1000)).is_ok());
        assert!(k.fits(&spec(512, 500)).is_ok());
        let why = k.fits(&spec(256, 1000)).unwrap_err();
        assert!(why.contains("memory_mb 512"), "{why}");
        assert!(k.fits(&spec(512, 2000)).is_err());
        // A whole-stream capture has no RAM file.
        let whole = Captured { ram: None, ..c };
        let again = t.path().join("whole");
        std::fs::create_dir_all(&again).unwrap();
        whole.keep_in(&again).unwrap();
        assert!(Captured::kept_in(&again).unwrap().ram.is_none());
    }
}
