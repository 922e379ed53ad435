//! Guest disks: qcow2 overlays and layers, sparse copies, and which QEMU runs a VM.

use super::*;

/// Virtual size in bytes of a disk image (readable while QEMU holds it): a qcow2's
/// from its header, anything else from `qemu-img info`.
pub(crate) async fn image_size(qemu_img: &Path, image: &Path) -> Result<u64, RuntimeError> {
    if let Some(size) = qcow2_size(image) {
        return Ok(size);
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}
