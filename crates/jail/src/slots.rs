//! Host uid ranges for running sandboxes ("slots"): slot `k` is the 65536 host ids from
//! `uid_base + k·65536`. Slot 0 is the canonical range every sandbox's files are stored
//! in; each running sandbox gets a slot ≥ 1 of its own, shared only with its fork family
//! (a fork child's namespaces nest in its parent's), and sees its files through
//! idmapped mounts. So no two sandboxes' processes share a host uid, nor the per-user
//! counters the kernel keeps (fds in flight, pipe pages, inotify, keyrings, …).
//!
//! Several servers may run on one host (each with its own data dir), so the slots are
//! leased host-wide in *blocks* of [`BLOCK`]: a block is a file in the registry
//! directory (`/run/forkbox/uid-blocks`, gone at reboot with every sandbox) naming the
//! data dir that holds it, flocked while that server runs. A block naming another data
//! dir is only taken over once nothing of that data dir can be running any more (no
//! process holds its `server.lock` or `warden.lock`, per `/proc/locks`): a server's
//! sandboxes outlive it for the grace period, and its warden lives as long as they may.
//! A server that comes back takes every block naming its data dir again.
//!
//! A slot is held by an [`Arc<Slot>`] in every member of its family and freed when the
//! last one is released (after its processes are gone). A server that restarts reads a
//! running sandbox's slot back from its `uid_map` ([`Slots::claim`]).

use forkbox_sys::uidshift::RANGE;
use std::collections::HashMap;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// Slots per host-wide lease.
pub const BLOCK: u32 = 512;
/// Blocks on a host.
pub const BLOCKS: u32 = 32;
/// Slots on a host (host uids up to about `uid_base + 2^30`).
pub const MAX_SLOTS: u32 = BLOCK * BLOCKS;
/// Host uids the slots span from `uid_base` (the next ones are free for other uses:
/// the vm runtime's QEMUs).
pub const HOST_UID_SPAN: u32 = MAX_SLOTS * RANGE;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("all {MAX_SLOTS} host uid ranges of this host are in use")]
    Exhausted,
    #[error("host uid {0} is not the start of a sandbox uid range")]
    NotASlot(u32),
    #[error("uid range registry {0}: {1}")]
    Registry(PathBuf, std::io::Error),
}

/// One family's host uid range.
#[derive(Debug)]
pub struct Slot {
    index: u32,
    host_uid: u32,
    set: Weak<Mutex<Inner>>,
}

impl Slot {
    /// First host uid (and gid) of the range.
    pub fn host_uid(&self) -> u32 {
        self.host_uid
    }

    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(set) = self.set.upgrade() {
            let mut g = match set.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            // Only if the map still points at us (a claim may have replaced a dead one).
            if g.held
                .get(&self.index)
                .is_some_and(|w| w.strong_count() == 0)
            {
                g.held.remove(&self.index);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    held: HashMap<u32, Weak<Slot>>,
    /// Blocks leased by this server, with their locked registry files.
    blocks: Vec<(u32, std::fs::File)>,
    /// Where the next search starts (slots are handed out round-robin within the
    /// leased blocks, so a freed range rests before it is reused).
    next: u32,
}

/// The slots of one server.
#[derive(Debug, Clone)]
pub struct Slots {
    uid_base: u32,
    /// `None`: a runtime that only cleans up (allocates nothing).
    registry: Option<(PathBuf, PathBuf)>,
    inner: Arc<Mutex<Inner>>,
}

impl Slots {
    /// The slots of the server of `data_dir`, leased in `registry`: every block already
    /// naming `data_dir` is taken back at once.
    pub fn open(uid_base: u32, registry: &Path, data_dir: &Path) -> Result<Slots, SlotError> {
        let slots = Slots {
            uid_base,
            registry: Some((registry.to_path_buf(), data_dir.to_path_buf())),
            inner: Arc::default(),
        };
        std::fs::create_dir_all(registry).map_err(|e| SlotError::Registry(registry.into(), e))?;
        let mut g = slots.lock();
        for b in 0..BLOCKS {
            if let Some(f) = slots.lease(b, true)? {
                g.blocks.push((b, f));
            }
        }
        drop(g);
        Ok(slots)
    }

    /// Slots that can only be claimed (for a runtime that cleans up).
    pub fn detached(uid_base: u32) -> Slots {
        Slots {
            uid_base,
            registry: None,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn make(&self, index: u32) -> Arc<Slot> {
        Arc::new(Slot {
            index,
            host_uid: self.uid_base + index * RANGE,
            set: Arc::downgrade(&self.inner),
        })
    }

    /// Tries to lease block `b`: `only_ours` takes it only if it already names our data
    /// dir. The locked registry file when taken.
    fn lease(&self, b: u32, only_ours: bool) -> Result<Option<std::fs::File>, SlotError> {
        let Some((registry, data)) = &self.registry else {
            return Ok(None);
        };
        let path = registry.join(b.to_string());
        let err = |e: std::io::Error| SlotError::Registry(path.clone(), e);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let mut owner = String::new();
        f.read_to_string(&mut owner).map_err(err)?;
        let ours = owner == data.to_string_lossy();
        if only_ours && !ours {
            return Ok(None);
        }
        if !ours && !owner.is_empty() && data_dir_may_run(Path::new(&owner)) {
            return Ok(None);
        }
        f.set_len(0).map_err(err)?;
        f.rewind().map_err(err)?;
        f.write_all(data.to_string_lossy().as_bytes())
            .map_err(err)?;
        Ok(Some(f))
    }

    /// A free slot for a new family.
    pub fn allocate(&self) -> Result<Arc<Slot>, SlotError> {
        let mut g = self.lock();
        loop {
            let owned: Vec<u32> = g.blocks.iter().map(|(b, _)| *b).collect();
            let total = owned.len() as u32 * BLOCK;
            for step in 0..total {
                let i = (g.next + step) % total;
                let index = 1 + owned[(i / BLOCK) as usize] * BLOCK + i % BLOCK;
                if g.held.get(&index).is_some_and(|w| w.strong_count() > 0) {
                    continue;
                }
                let slot = self.make(index);
                g.held.insert(index, Arc::downgrade(&slot));
                g.next = (i + 1) % total;
                return Ok(slot);
            }
            // Every leased slot is in use: lease another block.
            let mut leased = None;
            for b in (0..BLOCKS).filter(|b| !owned.contains(b)) {
                if let Some(f) = self.lease(b, false)? {
                    leased = Some((b, f));
                    break;
                }
            }
            match leased {
                Some(l) => {
                    g.next = total;
                    g.blocks.push(l);
                }
                None => return Err(SlotError::Exhausted),
            }
        }
    }

    /// The slot whose range starts at `host_uid` (a running sandbox found after a
    /// restart): the family's existing one if a relative was claimed first.
    pub fn claim(&self, host_uid: u32) -> Result<Arc<Slot>, SlotError> {
        let off = host_uid
            .checked_sub(self.uid_base)
            .filter(|o| o % RANGE == 0)
            .ok_or(SlotError::NotASlot(host_uid))?;
        let index = off / RANGE;
        if index > MAX_SLOTS {
            return Err(SlotError::NotASlot(host_uid));
        }
        let mut g = self.lock();
        if let Some(s) = g.held.get(&index).and_then(Weak::upgrade) {
            return Ok(s);
        }
        let slot = self.make(index);
        g.held.insert(index, Arc::downgrade(&slot));
        Ok(slot)
    }

    /// How many slots are held.
    pub fn in_use(&self) -> usize {
        self.lock()
            .held
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// The blocks this server leases.
    pub fn blocks(&self) -> Vec<u32> {
        self.lock().blocks.iter().map(|(b, _)| *b).collect()
    }
}

/// Whether anything of the server of `data` may still run: a process holds a lock on
/// its `server.lock` or `warden.lock` (read from `/proc/locks`, without touching them).
fn data_dir_may_run(data: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let files: Vec<(u64, u64)> = ["server.lock", "warden.lock"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if files.is_empty() {
        return false;
    }
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|l| {
        l.split_whitespace()
            .find_map(parse_lock_file)
            .is_some_and(|f| files.contains(&f))
    })
}

/// `MAJOR:MINOR:INODE` of a `/proc/locks` line (major and minor in hex) as
/// (`st_dev`, `st_ino`).
fn parse_lock_file(field: &str) -> Option<(u64, u64)> {
    let mut p = field.split(':');
    let (maj, min, ino) = (p.next()?, p.next()?, p.next()?);
    if p.next().is_some() {
        return None;
    }
    let maj = u32::from_str_radix(maj, 16).ok()?;
    let min = u32::from_str_radix(min, 16).ok()?;
    Some((libc::makedev(maj, min), ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(reg: &Path, data: &Path) -> Slots {
        Slots::open(1_000_000, reg, data).unwrap()
    }

    /// `f()` once it gives something, trying for up to two seconds.
    fn eventually<T>(f: impl Fn() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "never happened");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn families_get_distinct_ranges_and_free_them_with_their_last_member() {
        let t = tempfile::tempdir().unwrap();
        let slots = open(&t.path().join("reg"), &t.path().join("data"));
        let a = slots.allocate().unwrap();
        let b = slots.allocate().unwrap();
        assert_ne!(a.host_uid(), b.host_uid());
        assert!(
            a.host_uid() >= 1_000_000 + RANGE,
            "slot 0 is the canonical range"
        );
        assert_eq!((a.host_uid() - 1_000_000) % RANGE, 0);
        // A child shares its parent's slot; the slot stays held while either lives.
        let child = a.clone();
        drop(a);
        assert_eq!(slots.in_use(), 2);
        drop(child);
        assert_eq!(slots.in_use(), 1);
        drop(b);
        assert_eq!(slots.in_use(), 0);
    }

    #[test]
    fn a_freed_range_is_not_the_next_one_handed_out() {
        let t = tempfile::tempdir().unwrap();
        let slots = open(&t.path().join("reg"), &t.path().join("data"));
        let a = slots.allocate().unwrap();
        let first = a.index();
        drop(a);
        let b = slots.allocate().unwrap();
        assert_ne!(b.index(), first);
    }

    #[test]
    fn claims_after_a_restart_join_the_family_and_reject_strangers() {
        let t = tempfile::tempdir().unwrap();
        let slots = open(&t.path().join("reg"), &t.path().join("data"));
        let parent = slots.claim(1_000_000 + 7 * RANGE).unwrap();
        let child = slots.claim(1_000_000 + 7 * RANGE).unwrap();
        assert!(Arc::ptr_eq(&parent, &child));
        // A new family never gets a claimed range.
        for _ in 0..20 {
            assert_ne!(slots.allocate().unwrap().index(), 7);
        }
        // Legacy sandboxes run as the canonical range (slot 0).
        assert_eq!(slots.claim(1_000_000).unwrap().index(), 0);
        assert!(slots.claim(1_000_001).is_err());
        assert!(slots.claim(999_999).is_err());
    }

    #[test]
    fn servers_on_one_host_lease_disjoint_blocks_and_take_theirs_back() {
        let t = tempfile::tempdir().unwrap();
        let reg = t.path().join("reg");
        let (d1, d2) = (t.path().join("d1"), t.path().join("d2"));
        std::fs::create_dir_all(&d1).unwrap();
        let s1 = open(&reg, &d1);
        let s2 = open(&reg, &d2);
        let a = s1.allocate().unwrap();
        let b = s2.allocate().unwrap();
        assert_ne!(s1.blocks(), s2.blocks());
        assert_ne!((a.index() - 1) / BLOCK, (b.index() - 1) / BLOCK);
        // The first server stops while its warden still runs (it holds warden.lock):
        // nobody else takes its block; it takes it back when it returns.
        let block1 = s1.blocks();
        drop((a, s1));
        let warden = std::fs::File::create(d1.join("warden.lock")).unwrap();
        // SAFETY: flock on an fd we own.
        assert_eq!(unsafe { libc::flock(warden.as_raw_fd(), libc::LOCK_EX) }, 0);
        let s3 = open(&reg, &t.path().join("d3"));
        s3.allocate().unwrap();
        assert!(
            !s3.blocks().iter().any(|b| block1.contains(b)),
            "{:?}",
            s3.blocks()
        );
        // (Another test thread's child process may hold a copy of a closed lock's
        // descriptor between its fork and exec: a released lock can take a moment.)
        let back = eventually(|| Some(open(&reg, &d1)).filter(|s| s.blocks() == block1));
        assert_eq!(back.blocks(), block1);
        // Once nothing of d1 can run, its block may go to another server.
        drop((back, warden));
        // (The lowest free block is leased first; 1 and 2 are s2's and s3's.)
        let taker = eventually(|| {
            let s = open(&reg, &t.path().join("d4"));
            s.allocate().ok()?;
            Some(s).filter(|s| s.blocks() == block1)
        });
        assert_eq!(taker.blocks(), block1);
        drop(s2);
    }

    #[test]
    fn running_out_leases_more_blocks_then_fails() {
        let t = tempfile::tempdir().unwrap();
        let slots = open(&t.path().join("reg"), &t.path().join("data"));
        let held: Vec<_> = (0..MAX_SLOTS).map(|_| slots.allocate().unwrap()).collect();
        assert_eq!(slots.blocks().len() as u32, BLOCKS);
        assert!(matches!(slots.allocate(), Err(SlotError::Exhausted)));
        drop(held);
        assert!(slots.allocate().is_ok());
    }

    #[test]
    fn proc_locks_fields_parse() {
        assert_eq!(
            parse_lock_file("fd:01:5678"),
            Some((libc::makedev(0xfd, 1), 5678))
        );
        assert_eq!(parse_lock_file("EOF"), None);
        assert_eq!(parse_lock_file("1:2"), None);
    }
}
