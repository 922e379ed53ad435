//! Guest disks: qcow2 overlays and layers, sparse copies, and which QEMU runs a VM.

use super::*;

/// Virtual size in bytes of a disk image (readable while QEMU holds it).
pub(crate) async fn image_size(qemu_img: &Path, image: &Path) -> Result<u64, RuntimeError> {
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
pub(crate) async fn overlay(
    qemu_img: &Path,
    backing: &Path,
    path: &Path,
    size: u64,
) -> std::io::Result<()> {
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
pub(crate) fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<u64> {
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

/// True while process `pid` is a QEMU of the VM in `dir` (its command line names it).
pub(crate) fn qemu_of(pid: i32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}
