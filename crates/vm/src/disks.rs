//! Guest disks: qcow2 overlays and layers, sparse copies, and which QEMU runs a VM.

use super::*;
use std::os::unix::ffi::OsStrExt as _;

/// Virtual size in bytes of a disk image (readable while QEMU holds it): a qcow2's
/// from its header, anything else from `qemu-img info`.
///
/// Read from the header, never by `qemu-img`: a guest's disk is a file its (jailed)
/// QEMU could write, not one for root's tools to parse.
pub(crate) async fn image_size(image: &Path) -> Result<u64, RuntimeError> {
    qcow2_size(image).ok_or_else(|| {
        RuntimeError::host(
            "read disk size",
            "-",
            std::io::Error::other(format!("{} is not a qcow2 image", image.display())),
        )
    })
}

/// What the images of one VM's disk chain may name as backing files: the layers its
/// own directory holds names of (its frozen `disk-<n>` generations and its `ref-*`
/// names, which are links to root's checked copies in `layers/`), found again by
/// device and inode, or a template's image among the assets (`rootfs-*.qcow2`). No file
/// a QEMU may hold writable (RAM copies, device states, another VM's disk), and no
/// layer of another VM's chain.
pub(crate) struct Trusted {
    layers: PathBuf,
    assets: PathBuf,
    chain: std::collections::HashSet<(u64, u64)>,
}

impl Trusted {
    pub(crate) fn of(layers: &Path, assets: &Path, vm_dir: &Path) -> Trusted {
        use std::os::unix::fs::MetadataExt as _;
        let chain = std::fs::read_dir(vm_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                (n.starts_with("ref-") || n.starts_with("disk-")) && n.ends_with(".qcow2")
            })
            .filter_map(|e| std::fs::symlink_metadata(e.path()).ok())
            .filter(|m| m.file_type().is_file() && m.uid() == 0)
            .map(|m| (m.dev(), m.ino()))
            .collect();
        Trusted {
            layers: layers.to_path_buf(),
            assets: assets.to_path_buf(),
            chain,
        }
    }

    fn allows(&self, backing: &Path, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let name = backing
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let layer = backing.parent() == Some(self.layers.as_path())
            && name.ends_with(".qcow2")
            && self.chain.contains(&(meta.dev(), meta.ino()));
        let asset = backing.parent() == Some(self.assets.as_path())
            && name.starts_with("rootfs-")
            && name.ends_with(".qcow2");
        layer || asset
    }
}

/// Checks a qcow2 image a QEMU may have written before a QEMU (root until it drops to
/// its uid) opens it: version 2 or 3, no encryption, no external data file (feature
/// bit 2, header extension `0x44415441`), no incompatible feature but the compression
/// type and extended L2 entries (not even dirty or corrupt: QEMU would repair the
/// image as root), no autoclear feature, no internal snapshot, no bitmaps, and a
/// backing file, if any, of format qcow2, named by a plain absolute path that
/// [`Trusted`] allows, a regular file of root's. Returns the backing file.
pub(crate) fn check_qcow2(image: &Path, trusted: &Trusted) -> Result<Option<PathBuf>, String> {
    use std::os::unix::fs::{FileExt as _, MetadataExt as _};
    let name = image.display();
    let f = std::fs::File::open(image).map_err(|e| format!("{name}: {e}"))?;
    let mut head = [0u8; 4096];
    let n = f
        .read_at(&mut head, 0)
        .map_err(|e| format!("{name}: {e}"))?;
    let head = &head[..n];
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])))
    };
    let u64_at = |o: usize| {
        head.get(o..o + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let bad = |why: &str| Err(format!("{name}: {why}"));
    if head.get(..4) != Some(&b"QFI\xfb"[..]) {
        return bad("not a qcow2 image");
    }
    let version = u32_at(4).unwrap_or(0);
    if !(2..=3).contains(&version) {
        return bad("unsupported qcow2 version");
    }
    if u32_at(32) != Some(0) {
        return bad("encrypted");
    }
    if u32_at(60) != Some(0) {
        return bad("internal snapshots");
    }
    let ext_start = if version == 3 {
        // Compression type, extended L2 entries: what QEMU's own images may use.
        let known = 0b1_1000u64;
        if u64_at(72).unwrap_or(u64::MAX) & !known != 0 {
            return bad("an incompatible feature the host does not allow (external data file, dirty, corrupt?)");
        }
        if u64_at(88) != Some(0) {
            return bad("an autoclear feature (bitmaps, raw external data)");
        }
        u32_at(100).unwrap_or(0) as usize
    } else {
        72
    };
    let (backing_at, backing_len) = (u64_at(8).unwrap_or(0), u64::from(u32_at(16).unwrap_or(0)));
    // Header extensions up to the end marker.
    let mut at = ext_start;
    let mut format = None;
    loop {
        let (Some(kind), Some(len)) = (u32_at(at), u32_at(at + 4)) else {
            return bad("header extensions run past the first 4 KiB");
        };
        let len = len as usize;
        match kind {
            0 => break,
            0x4441_5441 => return bad("names an external data file"),
            0x0537_be77 => return bad("encrypted"),
            0x2385_2875 => return bad("bitmaps"),
            0xe279_2aca => format = head.get(at + 8..at + 8 + len).map(<[u8]>::to_vec),
            _ => {}
        }
        at = at.saturating_add(8).saturating_add(len.div_ceil(8) * 8);
    }
    if backing_at == 0 {
        return Ok(None);
    }
    let end = backing_at.saturating_add(backing_len);
    let Some(raw) = usize::try_from(backing_at)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(a, e)| head.get(a..e))
    else {
        return bad("backing file name outside the first 4 KiB");
    };
    if format.as_deref() != Some(&b"qcow2"[..]) {
        return bad("backing file of another format than qcow2");
    }
    let backing = PathBuf::from(std::ffi::OsStr::from_bytes(raw));
    let plain = backing.is_absolute()
        && backing.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    if !plain {
        return bad(&format!(
            "backing file {} is not one of the host's layers",
            backing.display()
        ));
    }
    let meta =
        std::fs::symlink_metadata(&backing).map_err(|e| format!("{}: {e}", backing.display()))?;
    if !meta.file_type().is_file() || meta.uid() != 0 {
        return bad(&format!(
            "backing file {} is not a file of root's",
            backing.display()
        ));
    }
    if !trusted.allows(&backing, &meta) {
        return bad(&format!(
            "backing file {} is not one of the host's layers under this disk",
            backing.display()
        ));
    }
    Ok(Some(backing))
}

/// Checks every image of the chain from `top` down ([`check_qcow2`]).
pub(crate) fn check_chain(top: &Path, trusted: &Trusted) -> Result<(), String> {
    let mut at = top.to_path_buf();
    for _ in 0..64 {
        match check_qcow2(&at, trusted)? {
            Some(b) => at = b,
            None => return Ok(()),
        }
    }
    Err(format!("{}: more than 64 backing files", top.display()))
}

/// The virtual size in a qcow2 header (magic `QFI\xfb`, the size a big-endian u64 at
/// byte 24), if `image` is a qcow2.
fn qcow2_size(image: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt as _;
    let mut head = [0u8; 32];
    std::fs::File::open(image)
        .ok()?
        .read_exact_at(&mut head, 0)
        .ok()?;
    if head[..4] != *b"QFI\xfb" {
        return None;
    }
    Some(u64::from_be_bytes(head[24..32].try_into().ok()?))
}

/// Makes `path` an empty qcow2 overlay of `size` bytes on `backing` (format qcow2),
/// without opening `backing` (QEMU may hold it) — written here rather than by
/// spawning `qemu-img create -u` (~15 ms of every create and capture), in the layout
/// `qemu-img` makes: the header (version 3, 64 KiB clusters, 16-bit refcounts, the
/// backing format as a header extension, the backing file's name after the
/// extensions) in cluster 0, the refcount table in cluster 1, its one refcount block
/// in cluster 2 (clusters 0–3 used once), the L1 table (all unallocated) in cluster 3.
pub(crate) async fn overlay(backing: &Path, path: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    const CLUSTER: u64 = 1 << 16;
    // One L1 entry per 512 MiB (an L2 table of 8192 entries of 64 KiB clusters).
    let l1_entries = size.div_ceil(CLUSTER * (CLUSTER / 8));
    let name = backing.as_os_str().as_bytes();
    // What fits the layout: one cluster of L1 table (disks up to 4 TiB), the name
    // after the header and its extensions in cluster 0 (and at most 1023 bytes).
    if l1_entries * 8 > CLUSTER || name.len() > 1023 || name.is_empty() {
        return Err(std::io::Error::other(format!(
            "no overlay of {size} bytes on {}",
            backing.display()
        )));
    }
    let mut head = Vec::with_capacity(512 + name.len());
    let be32 = |h: &mut Vec<u8>, v: u32| h.extend_from_slice(&v.to_be_bytes());
    let be64 = |h: &mut Vec<u8>, v: u64| h.extend_from_slice(&v.to_be_bytes());
    // The header extensions: the backing file's format ("qcow2", padded to 8 bytes),
    // then the end mark.
    let mut exts = Vec::new();
    be32(&mut exts, 0xe279_2aca);
    be32(&mut exts, 5);
    exts.extend_from_slice(b"qcow2\0\0\0");
    be32(&mut exts, 0);
    be32(&mut exts, 0);
    const HEADER_LEN: u32 = 112;
    let name_at = u64::from(HEADER_LEN) + exts.len() as u64;
    head.extend_from_slice(b"QFI\xfb");
    be32(&mut head, 3);
    be64(&mut head, name_at);
    be32(&mut head, name.len() as u32);
    be32(&mut head, 16); // cluster_bits
    be64(&mut head, size);
    be32(&mut head, 0); // crypt_method
    be32(&mut head, l1_entries as u32);
    be64(&mut head, 3 * CLUSTER); // l1_table_offset
    be64(&mut head, CLUSTER); // refcount_table_offset
    be32(&mut head, 1); // refcount_table_clusters
    be32(&mut head, 0); // nb_snapshots
    be64(&mut head, 0); // snapshots_offset
    be64(&mut head, 0); // incompatible features
    be64(&mut head, 0); // compatible features
    be64(&mut head, 0); // autoclear features
    be32(&mut head, 4); // refcount_order: 16-bit
    be32(&mut head, HEADER_LEN);
    head.resize(HEADER_LEN as usize, 0); // compression type zlib, padding
    head.extend_from_slice(&exts);
    head.extend_from_slice(name);
    let (path, l1_len) = (path.to_path_buf(), l1_entries * 8);
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::create(&path)?;
        f.write_all_at(&head, 0)?;
        // The refcount table's one block, and in it clusters 0-3.
        f.write_all_at(&(2 * CLUSTER).to_be_bytes(), CLUSTER)?;
        f.write_all_at(&[0, 1, 0, 1, 0, 1, 0, 1], 2 * CLUSTER)?;
        f.set_len(3 * CLUSTER + l1_len)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Copies `from` into a new file `to`, data extents only (a guest's RAM file is mostly
/// holes); the bytes copied.
pub(crate) fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<u64> {
    let src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    dst.set_len(len)?;
    let copied = crate::ram::copy_data(&src, &dst, len)?;
    let mut perms = dst.metadata()?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o400);
    dst.set_permissions(perms)?;
    Ok(copied)
}

/// The layer files a VM's disk chain rests on, as (existing name, name for a child's
/// dir): the frozen generations `disk-0..=disk-<upto>` of `dir` and its `ref-*` names.
pub(crate) fn chain_refs(dir: &Path, upto: u32) -> Vec<(PathBuf, String)> {
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
pub(crate) fn collect_layers(layers: &Path) {
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

/// Removes what a server that stopped in the middle of a layer copy left (a partial
/// `*.qcow2.tmp` under `layers`, a `*.qcow2.link` name in a VM's dir): run at start,
/// before any copy of this server's begins.
pub(crate) fn sweep_half_made(run_dir: &Path) {
    let mut found = files_ending(&run_dir.join("layers"), ".qcow2.tmp");
    for vm in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
        if vm.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(files_ending(&vm.path(), ".qcow2.link"));
        }
    }
    for f in found {
        tracing::info!(file = %f.display(), "removed a half-made layer copy");
        let _ = std::fs::remove_file(f);
    }
}

/// The regular files directly in `dir` whose names end in `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
        .map(|e| e.path())
        .collect()
}

/// True while process `pid` is a QEMU of the VM in `dir` (its command line names it).
pub(crate) fn qemu_of(pid: i32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_half_made_layer_copy_is_swept_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let (layers, vm) = (t.path().join("layers"), t.path().join("sbx-1"));
        std::fs::create_dir_all(&layers).unwrap();
        std::fs::create_dir_all(&vm).unwrap();
        let keep = [
            layers.join("a.qcow2"),
            layers.join("a.state"),
            vm.join("disk-0.qcow2"),
            vm.join("console.log"),
        ];
        let gone = [layers.join("b.qcow2.tmp"), vm.join("disk-0.qcow2.link")];
        for f in keep.iter().chain(&gone) {
            std::fs::write(f, b"x").unwrap();
        }
        sweep_half_made(t.path());
        for f in &keep {
            assert!(f.exists(), "{}", f.display());
        }
        for f in &gone {
            assert!(!f.exists(), "{}", f.display());
        }
    }

    /// The overlay written here is the one `qemu-img create -u` makes (but for the
    /// feature name table, which is optional): `qemu-img check` finds nothing wrong,
    /// `qemu-img info` reads its size and backing, and the host's own check passes.
    #[tokio::test]
    async fn an_overlay_is_what_qemu_img_makes() {
        let t = tempfile::tempdir().unwrap();
        let (layers, assets, vm_dir) = (t.path().join("l"), t.path().join("a"), t.path().join("v"));
        for d in [&layers, &assets, &vm_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let backing = assets.join("rootfs-python.qcow2");
        // Compared with qemu-img's where it is installed (the vm tests need it anyway).
        let qemu_img = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&backing)
            .arg("1G")
            .status()
            .is_ok_and(|s| s.success());
        if !qemu_img {
            std::fs::write(&backing, header(0, &[], None)).unwrap();
        }
        let top = vm_dir.join("disk-0.qcow2");
        overlay(&backing, &top, 9 << 30).await.unwrap();
        assert_eq!(qcow2_size(&top), Some(9 << 30));
        let trusted = Trusted::of(&layers, &assets, &vm_dir);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(check_qcow2(&top, &trusted), Ok(Some(backing.clone())));
        }
        assert!(overlay(&backing, &t.path().join("huge"), 5 << 40)
            .await
            .is_err());
        if !qemu_img {
            eprintln!("no qemu-img here: compared with QEMU's only where it is installed");
            return;
        }
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&top)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&top)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 9u64 << 30, "{info}");
        assert_eq!(
            info["backing-filename"],
            backing.display().to_string(),
            "{info}"
        );
        assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
        let theirs = t.path().join("theirs.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&backing)
            .arg(&theirs)
            .arg((9u64 << 30).to_string())
            .status()
            .unwrap();
        assert!(made.success());
        let (ours, theirs) = (
            std::fs::read(&top).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(ours.len(), theirs.len());
        // Everything after cluster 0 (refcounts, L1) is the same, and so is the header
        // but for where the backing file's name is (after the feature name table).
        assert!(ours[1 << 16..] == theirs[1 << 16..]);
        assert_eq!(ours[..8], theirs[..8]);
        assert_eq!(ours[16..104], theirs[16..104]);
    }

    #[test]
    fn a_qcow2_header_gives_its_virtual_size() {
        let t = tempfile::tempdir().unwrap();
        let q = t.path().join("d.qcow2");
        let mut head = vec![0u8; 104];
        head[..4].copy_from_slice(b"QFI\xfb");
        head[4..8].copy_from_slice(&3u32.to_be_bytes());
        head[24..32].copy_from_slice(&(9u64 << 30).to_be_bytes());
        std::fs::write(&q, &head).unwrap();
        assert_eq!(qcow2_size(&q), Some(9 << 30));
        std::fs::write(&q, b"not a qcow2 image at all, longer than 32 bytes").unwrap();
        assert_eq!(qcow2_size(&q), None);
        assert_eq!(qcow2_size(&t.path().join("missing")), None);
    }

    /// A qcow2 v3 header: `incompatible` features, header extensions (type, data), and
    /// a backing file name after them.
    fn header(incompatible: u64, exts: &[(u32, &[u8])], backing: Option<&[u8]>) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        for (kind, data) in exts {
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&(data.len() as u32).to_be_bytes());
            h.extend_from_slice(data);
            h.resize(h.len().div_ceil(8) * 8, 0);
        }
        h.extend_from_slice(&[0u8; 8]);
        if let Some(name) = backing {
            let at = h.len() as u64;
            h[8..16].copy_from_slice(&at.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h.extend_from_slice(name);
        }
        h
    }

    #[test]
    fn only_headers_naming_the_hosts_own_layers_pass() {
        let t = tempfile::tempdir().unwrap();
        let layers = t.path().join("layers");
        std::fs::create_dir_all(&layers).unwrap();
        let layer = layers.join("l.qcow2");
        std::fs::write(&layer, header(0, &[], None)).unwrap();
        // Another VM's layer, and this VM's dir naming its own.
        let other = layers.join("other.qcow2");
        std::fs::write(&other, header(0, &[], None)).unwrap();
        let (vm_dir, assets) = (t.path().join("vm"), t.path().join("assets"));
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::create_dir_all(&assets).unwrap();
        std::fs::hard_link(&layer, vm_dir.join("ref-1.qcow2")).unwrap();
        let image = assets.join("rootfs-python.qcow2");
        std::fs::write(&image, header(0, &[], None)).unwrap();
        let trusted = Trusted::of(&layers, &assets, &vm_dir);
        let top = t.path().join("top.qcow2");
        let check = |h: Vec<u8>| {
            std::fs::write(&top, h).unwrap();
            check_qcow2(&top, &trusted)
        };
        let qcow2: (u32, &[u8]) = (0xe279_2aca, b"qcow2");
        let name = layer.as_os_str().as_bytes();
        // No backing: fine; the layer itself passes.
        assert_eq!(check(header(0, &[], None)), Ok(None));
        assert_eq!(check_chain(&layer, &trusted), Ok(()));
        // A backing file of root's under a trusted dir, format qcow2 (the tests run as
        // root where the runtime does: elsewhere the file is not root's).
        let ok = check(header(0, &[qcow2], Some(name)));
        if nix::unistd::geteuid().is_root() {
            assert_eq!(ok, Ok(Some(layer.clone())));
            std::fs::write(&top, header(0, &[qcow2], Some(name))).unwrap();
            assert_eq!(check_chain(&top, &trusted), Ok(()));
            let asset = image.as_os_str().as_bytes();
            assert_eq!(
                check(header(0, &[qcow2], Some(asset))),
                Ok(Some(image.clone()))
            );
            // A layer of root's that is not under this VM's disk.
            let got = check(header(0, &[qcow2], Some(other.as_os_str().as_bytes())));
            assert!(
                got.as_ref().is_err_and(|e| e.contains("under this disk")),
                "{got:?}"
            );
        } else {
            assert!(ok.unwrap_err().contains("not a file of root's"));
        }
        // Refused: an external data file (feature bit, extension), an unknown
        // incompatible feature, encryption, another backing format or none named, a
        // backing file elsewhere, through `..`, relative, a symlink, missing.
        for (h, why) in [
            (header(1 << 2, &[], None), "incompatible feature"),
            (header(1 << 9, &[], None), "incompatible feature"),
            (header(1, &[], None), "incompatible feature"),
            (header(0, &[(0x2385_2875, b"x")], None), "bitmaps"),
            (
                header(0, &[(0x4441_5441, b"/etc/shadow")], None),
                "external data file",
            ),
            (header(0, &[(0x0537_be77, b"x")], None), "encrypted"),
            (header(0, &[(0xe279_2aca, b"raw")], Some(name)), "format"),
            (header(0, &[], Some(name)), "format"),
            (
                header(0, &[qcow2], Some(b"/etc/shadow")),
                "not one of the host's layers",
            ),
            (
                header(0, &[qcow2], Some(b"json:{\"driver\":\"file\"}")),
                "not one of the host's layers",
            ),
            (
                header(
                    0,
                    &[qcow2],
                    Some(format!("{}/../x", layers.display()).as_bytes()),
                ),
                "not one of the host's layers",
            ),
            (
                header(0, &[qcow2], Some(b"layers/l.qcow2")),
                "not one of the host's layers",
            ),
        ] {
            let got = check(h);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{why}: {got:?}"
            );
        }
        let link = layers.join("link.qcow2");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let got = check(header(0, &[qcow2], Some(link.as_os_str().as_bytes())));
        assert!(got.is_err(), "{got:?}");
        let missing = layers.join("missing.qcow2");
        let got = check(header(0, &[qcow2], Some(missing.as_os_str().as_bytes())));
        assert!(got.is_err(), "{got:?}");
        // Not a qcow2 at all.
        std::fs::write(&top, b"raw disk bytes").unwrap();
        assert!(check_qcow2(&top, &trusted).is_err());
    }
}
