//! Guest RAM that QEMUs map privately (copy-on-write): fork children, copies of a
//! boot image or of a named snapshot. Such a RAM is a **sealed memfd**: its contents
//! are fixed (`F_SEAL_WRITE`, `F_SEAL_SHRINK`, `F_SEAL_GROW`, `F_SEAL_SEAL`) before any
//! QEMU gets it, so the read-write descriptor QEMU 7.2 opens even for a private
//! mapping (`memory-backend-file … share=off` on `/proc/self/fd/<n>`) cannot write,
//! truncate or punch a page of it: a QEMU taken over by its guest cannot reach the
//! pages other copies have not written yet. Private writable mappings stay allowed.
//!
//! And how a capture copies the RAM of a VM that maps its RAM privately (itself a
//! copy): the mapped file's data, then every page the VM wrote (a private page of the
//! mapping, found in `/proc/<pid>/pagemap`) read from `/proc/<pid>/mem`. The device
//! state comes without RAM from `xen-save-devices-state`, to which
//! [`devices_only_stream`] adds what an incoming migration expects around it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

const PAGE: u64 = 4096;

/// A RAM image whose contents can no longer change (see the module).
#[derive(Debug)]
pub(crate) struct SealedRam {
    fd: OwnedFd,
}

impl SealedRam {
    /// Seals `file`, a memfd made by [`new_memfd`] and filled.
    pub(crate) fn seal(file: File) -> io::Result<SealedRam> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        fcntl(
            file.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_WRITE
                    | SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        Ok(SealedRam { fd: file.into() })
    }

    /// A sealed copy of the RAM file `src` (its data; holes stay holes). The file's
    /// page cache is dropped afterwards: the memfd is what copies map.
    pub(crate) fn copy_of(src: &File) -> io::Result<SealedRam> {
        let len = src.metadata()?.len();
        let dst = new_memfd(len)?;
        copy_data(src, &dst, len)?;
        let _ = nix::fcntl::posix_fadvise(
            src.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        SealedRam::seal(dst)
    }

    /// The descriptor a QEMU inherits (its close-on-exec flag cleared in the child).
    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// How a QEMU that inherited it names it as `mem-path`.
    pub(crate) fn mem_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.raw_fd()))
    }

    /// Its contents, read-only.
    #[cfg(test)]
    pub(crate) fn file(&self) -> io::Result<File> {
        use std::os::fd::AsFd as _;
        Ok(File::from(self.fd.as_fd().try_clone_to_owned()?))
    }
}

/// An empty memfd of `len` bytes that can be sealed (close-on-exec).
pub(crate) fn new_memfd(len: u64) -> io::Result<File> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(
        c"forkbox-vm-ram",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let f = File::from(fd);
    f.set_len(len)?;
    Ok(f)
}

/// Copies the data of `src`'s first `len` bytes into `dst` at the same offsets,
/// skipping holes; the bytes copied.
pub(crate) fn copy_data(src: &File, dst: &File, len: u64) -> io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    let len = len as i64;
    let mut buf = vec![0u8; 1 << 20];
    let (mut off, mut copied) = (0i64, 0u64);
    while off < len {
        let data = match lseek(src.as_raw_fd(), off, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data < off {
            return Err(io::Error::other("SEEK_DATA went backwards"));
        }
        // (A file system answering no hole after the data: the rest is data.)
        let hole = match lseek(src.as_raw_fd(), data, Whence::SeekHole)? {
            h if h <= data => len,
            h => h.min(len),
        };
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
    Ok(copied)
}

/// A process's `/proc/<pid>` directory, opened once: whatever is opened through it
/// is that process's, and fails once it is gone (its pid may be reused meanwhile).
pub(crate) struct ProcDir(File);

impl ProcDir {
    /// `/proc/<pid>`, if that process runs `vm_dir`'s QEMU: its command line names
    /// the VM's directory and, when `uid` is given (a jailed QEMU's), it runs as it.
    pub(crate) fn of_qemu(pid: i32, vm_dir: &Path, uid: Option<u32>) -> io::Result<ProcDir> {
        use std::io::Read as _;
        use std::os::unix::ffi::OsStrExt as _;
        let dir = ProcDir(File::open(format!("/proc/{pid}"))?);
        let mut cmdline = Vec::new();
        dir.open("cmdline")?
            .take(1 << 20)
            .read_to_end(&mut cmdline)?;
        let names_dir = cmdline
            .windows(vm_dir.as_os_str().len())
            .any(|w| w == vm_dir.as_os_str().as_bytes());
        let status = std::io::read_to_string(dir.open("status")?)?;
        let runs_as = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().next()?.parse::<u32>().ok());
        if !names_dir || uid.is_some_and(|u| runs_as != Some(u)) {
            return Err(io::Error::other(format!(
                "process {pid} is not the QEMU of {}",
                vm_dir.display()
            )));
        }
        Ok(dir)
    }

    /// Opens `name` under the directory, read-only.
    fn open(&self, name: &str) -> io::Result<File> {
        use nix::fcntl::{openat, OFlag};
        let fd = openat(
            Some(self.0.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: `openat` returned a descriptor nobody else owns.
        Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }
}

/// Where the process maps a guest RAM of `len` bytes privately: the mapping's start
/// and its file (opened through `map_files`, which works for an unlinked file or a
/// memfd too).
fn private_ram_mapping(proc: &ProcDir, len: u64) -> io::Result<(u64, File)> {
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut proc.open("maps")?, &mut raw)?;
    let maps = String::from_utf8_lossy(&raw);
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        if hi - lo == len && perms == "rw-p" && offset.trim_start_matches('0').is_empty() {
            if inode == "0" {
                continue;
            }
            let file = proc.open(&format!("map_files/{range}"))?;
            return Ok((lo, file));
        }
    }
    Err(io::Error::other(format!(
        "QEMU maps no private file of {len} bytes (its guest RAM)"
    )))
}

/// Copies the guest RAM (`len` bytes) that the process maps privately into `dst`:
/// the mapped file's data, then each page the process has a private copy of (it wrote
/// it), read from its memory. The process must be stopped (its vCPUs). Returns the
/// bytes copied (file data and written pages).
///
/// What the process maps is its own business: a QEMU that swapped its mapping only
/// feeds its own children (this VM's copies) what it could read anyway.
pub(crate) fn copy_private_ram(proc: &ProcDir, len: u64, dst: &File) -> io::Result<u64> {
    let (start, backing) = private_ram_mapping(proc, len)?;
    let mut copied = copy_data(&backing, dst, len.min(backing.metadata()?.len()))?;
    let pagemap = proc.open("pagemap")?;
    let mem = proc.open("mem")?;
    let pages = len / PAGE;
    // 512 pagemap entries (2 MiB of guest RAM) at a time.
    let mut entries = vec![0u8; 512 * 8];
    let mut page = vec![0u8; PAGE as usize];
    let mut i = 0u64;
    while i < pages {
        let n = (pages - i).min(512);
        let buf = &mut entries[..(n * 8) as usize];
        pagemap.read_exact_at(buf, (start / PAGE + i) * 8)?;
        for (k, e) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().map_err(io::Error::other)?);
            let (present, swapped, file) = (e >> 63 & 1, e >> 62 & 1, e >> 61 & 1);
            // A private (anonymous) page: the process's own copy of it.
            if (present == 1 || swapped == 1) && file == 0 {
                let at = (i + k as u64) * PAGE;
                mem.read_exact_at(&mut page, start + at)?;
                dst.write_all_at(&page, at)?;
                copied += PAGE;
            }
        }
        i += n;
    }
    Ok(copied)
}

/// The migration stream's magic and version (QEMU's `QEMU_VM_FILE_MAGIC`, `…_VERSION`).
const STREAM_HEAD: &[u8; 8] = b"QEVM\0\0\0\x03";

/// Makes `devices` — the stream `xen-save-devices-state` wrote: device state only,
/// no configuration section — a stream `migrate-incoming` loads into a QEMU mapping
/// the RAM itself: the configuration section an incoming migration expects (machine
/// `microvm`, capability `x-ignore-shared`, which the loading QEMU has on) after the
/// head, and an (empty) description section after the end.
pub(crate) fn devices_only_stream(devices: &[u8]) -> io::Result<Vec<u8>> {
    let Some(rest) = devices.strip_prefix(STREAM_HEAD.as_slice()) else {
        return Err(io::Error::other("not a QEMU device state stream"));
    };
    const MACHINE: &[u8] = b"microvm";
    const SUBSECTION: &[u8] = b"configuration/capabilities";
    const CAPABILITY: &[u8] = b"x-ignore-shared";
    let mut out = Vec::with_capacity(devices.len() + 128);
    out.extend_from_slice(STREAM_HEAD);
    // QEMU_VM_CONFIGURATION: the machine's name.
    out.push(0x07);
    out.extend_from_slice(&(MACHINE.len() as u32).to_be_bytes());
    out.extend_from_slice(MACHINE);
    // QEMU_VM_SUBSECTION "configuration/capabilities", version 1: one capability.
    out.push(0x05);
    out.push(SUBSECTION.len() as u8);
    out.extend_from_slice(SUBSECTION);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.push(CAPABILITY.len() as u8);
    out.extend_from_slice(CAPABILITY);
    // The device sections, up to and with QEMU_VM_EOF.
    out.extend_from_slice(rest);
    // QEMU_VM_VMDESCRIPTION: a JSON description the loader reads and drops.
    out.push(0x06);
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(b"{}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A RAM file of `len` bytes in `dir` holding `data` at page offsets, and its
    /// sealed copy.
    fn sealed_from(dir: &Path, len: u64, data: &[(u64, &[u8])]) -> (PathBuf, SealedRam) {
        let path = dir.join("memory");
        let src = File::create(&path).unwrap();
        src.set_len(len).unwrap();
        for (page, bytes) in data {
            src.write_all_at(bytes, page * PAGE).unwrap();
        }
        drop(src);
        let ram = SealedRam::copy_of(&File::open(&path).unwrap()).unwrap();
        (path, ram)
    }

    /// `len` bytes of `file` mapped read-write with `flags` (`MAP_FAILED` if refused).
    fn map(file: &File, len: u64, flags: i32) -> *mut libc::c_void {
        // SAFETY: a new mapping of a file the caller holds; the caller unmaps it.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        }
    }

    /// A sealed memfd keeps its contents: no write, no truncation, no hole punched,
    /// also through a read-write reopen by path; a private mapping of it is writable
    /// and leaves it as it was.
    #[test]
    fn sealed_ram_cannot_change() {
        let t = tempfile::tempdir().unwrap();
        let (_, ram) = sealed_from(t.path(), 8 * PAGE, &[(3, b"guest")]);
        let again = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(ram.mem_path())
            .unwrap();
        assert_eq!(again.metadata().unwrap().len(), 8 * PAGE);
        assert!(again.write_all_at(b"evil", 3 * PAGE).is_err());
        assert!(again.set_len(PAGE).is_err());
        assert!(again.set_len(16 * PAGE).is_err());
        let punched = nix::fcntl::fallocate(
            again.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            (8 * PAGE) as i64,
        );
        assert!(punched.is_err());
        let p = map(&again, 8 * PAGE, libc::MAP_PRIVATE);
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: inside the mapping made above, unmapped here.
        unsafe {
            let b = p.cast::<u8>().add((3 * PAGE) as usize);
            assert_eq!(*b, b'g');
            *b = b'X';
            libc::munmap(p, (8 * PAGE) as usize);
        }
        let mut buf = [0u8; 5];
        ram.file()
            .unwrap()
            .read_exact_at(&mut buf, 3 * PAGE)
            .unwrap();
        assert_eq!(&buf, b"guest");
        // A shared writable mapping is refused.
        assert_eq!(map(&again, PAGE, libc::MAP_SHARED), libc::MAP_FAILED);
    }

    /// The RAM a process maps privately is copied as it sees it: the file's data
    /// where it wrote nothing, its own pages where it did.
    #[test]
    fn private_ram_is_copied_with_the_pages_written() {
        let len = 64 * PAGE;
        let t = tempfile::tempdir().unwrap();
        let (path, ram) = sealed_from(t.path(), len, &[(2, b"from the file"), (5, b"overwritten")]);
        let file = ram.file().unwrap();
        let p = map(&file, len, libc::MAP_PRIVATE);
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: inside the mapping.
        unsafe {
            let base = p.cast::<u8>();
            std::ptr::copy_nonoverlapping(b"written".as_ptr(), base.add(5 * PAGE as usize), 7);
            std::ptr::copy_nonoverlapping(b"in a hole".as_ptr(), base.add(40 * PAGE as usize), 9);
        }
        let dst = new_memfd(len).unwrap();
        // Only the QEMU of the VM named is read.
        let me = std::process::id() as i32;
        let exe = std::env::current_exe().unwrap();
        assert!(ProcDir::of_qemu(me, Path::new("/no/such/vm"), None).is_err());
        let uid = nix::unistd::getuid().as_raw();
        assert!(ProcDir::of_qemu(me, exe.parent().unwrap(), Some(uid + 1)).is_err());
        let proc = ProcDir::of_qemu(me, exe.parent().unwrap(), Some(uid)).unwrap();
        let copied = copy_private_ram(&proc, len, &dst).unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len as usize) };
        assert!(copied >= 2 * PAGE, "{copied}");
        let read = |at: u64, n: usize| {
            let mut b = vec![0u8; n];
            dst.read_exact_at(&mut b, at).unwrap();
            b
        };
        assert_eq!(read(2 * PAGE, 13), b"from the file");
        assert_eq!(read(5 * PAGE, 11), b"writtentten");
        assert_eq!(read(40 * PAGE, 9), b"in a hole");
        assert_eq!(read(41 * PAGE, 4), [0; 4]);
        // The file itself is unchanged.
        assert_eq!(
            &std::fs::read(&path).unwrap()[(5 * PAGE) as usize..][..11],
            b"overwritten"
        );
    }

    #[test]
    fn a_device_state_gets_the_configuration_an_incoming_migration_expects() {
        let mut devices = STREAM_HEAD.to_vec();
        devices.extend_from_slice(&[0x04, 0, 0, 0, 0, 5, b't', b'i', b'm', b'e', b'r', 0x00]);
        let s = devices_only_stream(&devices).unwrap();
        assert!(s.starts_with(b"QEVM\0\0\0\x03\x07\0\0\0\x07microvm\x05\x1aconfiguration/capabilities\0\0\0\x01\0\0\0\x01\x0fx-ignore-shared\x04"));
        assert!(s.ends_with(b"timer\x00\x06\0\0\0\x02{}"));
        assert!(devices_only_stream(b"not a stream").is_err());
    }
}
