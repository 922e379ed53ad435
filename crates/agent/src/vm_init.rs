//! `forkbox-agent vm-init`: PID 1 of a vm sandbox's guest. The initramfs's init has
//! mounted the root filesystem (with /proc, /sys, /dev, /tmp) and `switch_root`ed to
//! this binary; here the agent names the guest, brings up loopback, finds its
//! virtio-serial port by name and serves the protocol on it.

use forkbox_types::agent::VmInit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Where the guest init puts the host's [`VmInit`].
pub const INIT_JSON: &str = "/forkbox/init.json";

/// How long the port may take to appear (the console driver probes asynchronously).
const PORT_PATIENCE: Duration = Duration::from_secs(10);

/// This agent is a vm guest's PID 1 (its kernel is the sandbox's alone).
static IN_GUEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// OOM kills of the guest's kernel while a command or cell runs: its `oom_kill`
/// counter at the start, compared at the end. Nothing in a jail (its `/proc/vmstat`
/// is the host's; the host counts the sandbox's cgroup instead).
pub struct OomWatch(Option<u64>);

impl OomWatch {
    pub fn start() -> OomWatch {
        OomWatch(
            IN_GUEST
                .load(std::sync::atomic::Ordering::Relaxed)
                .then(guest_oom_kills)
                .flatten(),
        )
    }

    /// Kills since [`OomWatch::start`] (`None` outside a guest).
    pub fn since(&self) -> Option<u64> {
        let before = self.0?;
        Some(guest_oom_kills()?.saturating_sub(before))
    }
}

fn guest_oom_kills() -> Option<u64> {
    std::fs::read_to_string("/proc/vmstat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

pub fn run() -> ExitCode {
    IN_GUEST.store(true, std::sync::atomic::Ordering::Relaxed);
    match setup() {
        Ok((init, port)) => {
            let opts = crate::server::Options {
                env: init.env,
                adopt: None,
                orphan_grace: init.orphan_grace_s.map(Duration::from_secs),
            };
            crate::server::run_on(crate::server::Endpoint::Port(port), opts)
        }
        Err(e) => {
            // As PID 1, exiting panics the guest kernel and QEMU quits (`panic=-1`,
            // `-no-reboot`): the host sees the VM end and reads this on the console.
            eprintln!("forkbox-agent: vm-init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn setup() -> Result<(VmInit, PathBuf), String> {
    let raw = std::fs::read(INIT_JSON).map_err(|e| format!("read {INIT_JSON}: {e}"))?;
    let init: VmInit =
        serde_json::from_slice(&raw).map_err(|e| format!("decode {INIT_JSON}: {e}"))?;
    nix::unistd::sethostname(&init.id).map_err(|e| format!("sethostname: {e}"))?;
    forkbox_sys::net::loopback_up().map_err(|e| format!("loopback up: {e}"))?;
    grow_root(0)?;
    for (i, v) in init.volumes.iter().enumerate() {
        mount_volume(i, v)?;
    }
    let _ = VOLUMES.set(init.volumes.iter().map(|v| v.mount.clone()).collect());
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd as _;
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
    }
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"forkbox-agent".as_ptr(), 0, 0, 0) };
    // No udev in the guest, so no /dev/virtio-ports/<name> link: the names are in sysfs.
    match wait_for_device("/sys/class/virtio-ports", "name", &init.port, PORT_PATIENCE) {
        Some(p) => Ok((init, p)),
        None => Err(format!("no virtio-serial port named {:?}", init.port)),
    }
}

/// The device (`/dev/<entry>`) of the entry of sysfs directory `class` whose file
/// `attr` says `want`, waiting up to `patience` for it (virtio devices probe
/// asynchronously).
fn wait_for_device(class: &str, attr: &str, want: &str, patience: Duration) -> Option<PathBuf> {
    let find = || {
        std::fs::read_dir(class).ok()?.flatten().find_map(|e| {
            let v = std::fs::read_to_string(e.path().join(attr)).unwrap_or_default();
            let dev = PathBuf::from("/dev").join(e.file_name());
            (v.trim() == want && dev.exists()).then_some(dev)
        })
    };
    let started = Instant::now();
    loop {
        if let Some(d) = find() {
            return Some(d);
        }
        if started.elapsed() > patience {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long a volume's device may take to appear (virtio devices probe asynchronously).
const DEVICE_PATIENCE: Duration = Duration::from_secs(10);

/// Where the guest's volumes are mounted (`release_volumes`).
static VOLUMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Ends every process but this one and unmounts the volumes (the guest is about to
/// be stopped: their file systems are left clean).
pub fn release_volumes() -> Result<(), String> {
    let mounts = VOLUMES.get().cloned().unwrap_or_default();
    if mounts.is_empty() {
        return Ok(());
    }
    // SAFETY: kill(-1) signals every process this one may signal but itself (and, from
    // PID 1, every process of the guest); no memory is touched.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let mut last = String::new();
    for _ in 0..100 {
        last.clear();
        for m in &mounts {
            if let Err(e) = nix::mount::umount(m.as_str()) {
                if e != nix::errno::Errno::EINVAL {
                    last = format!("unmount {m}: {e}");
                }
            }
        }
        if last.is_empty() {
            return Ok(());
        }
        // Processes just killed may still hold files there until reaped.
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last)
}

/// Uids (and gids) a volume's owners are shifted by: a jail sandbox's range.
const VOLUME_IDS: u32 = 65536;

/// Mounts volume `v` (the `i`th): the block device with its serial number, an ext4
/// file system, at its mount point (made if missing); read-only ones read-only. A volume is made for the jail's sandboxes, its root owned by
/// the first uid of their range: when its root's owner is not 0, the mount is
/// idmapped so that owner (and the 65536 ids from it) is the guest's root (and its
/// ids), as a jail sandbox sees it — the guest's commands, root without
/// capabilities, can write it, and what they make is stored as a jail sandbox's
/// would be.
fn mount_volume(i: usize, v: &forkbox_types::agent::VmVolume) -> Result<(), String> {
    use nix::mount::MsFlags;
    use std::os::fd::AsFd as _;
    let dev = wait_for_device("/sys/block", "serial", &v.serial, DEVICE_PATIENCE)
        .ok_or_else(|| format!("no block device with serial {:?}", v.serial))?;
    std::fs::create_dir_all(&v.mount).map_err(|e| format!("make {}: {e}", v.mount))?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if v.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let stage = PathBuf::from(format!("/tmp/.forkbox-volume-{i}"));
    std::fs::create_dir_all(&stage).map_err(|e| format!("make {}: {e}", stage.display()))?;
    // A read-only device whose journal a writer left unreplayed (it ended uncleanly)
    // mounts only without the journal: what it held is not seen.
    nix::mount::mount(Some(&dev), &stage, Some("ext4"), flags, None::<&str>)
        .or_else(|e| match v.read_only {
            true => nix::mount::mount(Some(&dev), &stage, Some("ext4"), flags, Some("noload")),
            false => Err(e),
        })
        .map_err(|e| format!("mount {}: {e}", dev.display()))?;
    if !v.read_only {
        // lost+found is the host's business, as in the jail.
        let _ = std::fs::remove_dir(stage.join("lost+found"));
    }
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(&stage).map_err(|e| format!("stat {}: {e}", stage.display()))?,
    );
    let placed = (|| {
        let userns = (owner != 0)
            .then(|| forkbox_sys::idmap::shift_userns(owner, 0, VOLUME_IDS, false))
            .transpose()
            .map_err(|e| e.to_string())?;
        let tree = forkbox_sys::idmap::detached_tree(&stage, userns.as_ref())
            .map_err(|e| e.to_string())?;
        let target = std::fs::File::open(&v.mount).map_err(|e| format!("open {}: {e}", v.mount))?;
        forkbox_sys::idmap::attach(tree.as_fd(), target.as_fd(), std::path::Path::new(&v.mount))
            .map_err(|e| e.to_string())
    })();
    let _ = nix::mount::umount2(&stage, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&stage);
    placed
}

/// Grows the root file system to fill its disk (`/dev/vda`), which the host made the
/// template's image plus the sandbox's `disk_mb` (and may grow later: a copy of a boot
/// image gets its own size after it is restored, `POST /disk/grow`): once the disk
/// is `at_least` bytes (the host grew it; the guest's kernel learns of it a moment
/// later), at most 5 s.
pub fn grow_root(at_least: u64) -> Result<(), String> {
    let size = || {
        let sectors = std::fs::read_to_string("/sys/block/vda/size")
            .map_err(|e| format!("read the root disk's size: {e}"))?;
        sectors
            .trim()
            .parse::<u64>()
            .map(|s| s * 512)
            .map_err(|e| format!("the root disk's size {sectors:?}: {e}"))
    };
    let started = Instant::now();
    let mut bytes = size()?;
    while bytes < at_least {
        if started.elapsed() > Duration::from_secs(5) {
            return Err(format!("the root disk is {bytes} bytes, not {at_least}"));
        }
        std::thread::sleep(Duration::from_millis(10));
        bytes = size()?;
    }
    forkbox_sys::mounts::grow_ext4(std::path::Path::new("/"), bytes)
        .map(|_| ())
        .map_err(|e| format!("grow the root file system to {bytes} bytes: {e}"))
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`) and `RNDRESEEDCRNG` (`_IO('R', 0x07)`).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes the host's random bytes (`hex`) into the kernel's pool, credited, and has the
/// kernel reseed its generator from it now: a guest restored from a capture must not
/// go on with the captured random state.
pub fn reseed(hex: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    if bytes.is_empty() || bytes.len() > 512 || bytes.len() * 2 != hex.len() {
        return Err("entropy must be 1-512 bytes of hex".into());
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(&bytes);
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(|e| format!("open /dev/random: {e}"))?;
    // SAFETY: the kernel reads the header and `buf_size` bytes after it from `info`.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG, 0) } < 0 {
        return Err(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
