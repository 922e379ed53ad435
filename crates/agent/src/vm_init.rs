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

pub fn run() -> ExitCode {
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
    let started = Instant::now();
    loop {
        if let Some(p) = find_port(&init.port) {
            return Ok((init, p));
        }
        if started.elapsed() > PORT_PATIENCE {
            return Err(format!("no virtio-serial port named {:?}", init.port));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The device of the port named `name` (no udev in the guest, so no
/// /dev/virtio-ports/<name> link: the names are in sysfs).
fn find_port(name: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in dir.flatten() {
        let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            let dev = PathBuf::from("/dev").join(e.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}
