//! Host facts the guest's command line depends on: KVM or TCG, and the TSC frequency.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt as _;

/// How QEMU runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// Software emulation; `tb-size=64` keeps the translation cache small (the default
    /// is 1 GiB and grows).
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// QEMU's `-accel` and `-cpu` values.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,tb-size=64", "-cpu", "max"],
        }
    }
}

/// The host's TSC frequency in kHz (the guest is told it with `tsc_early_khz`: microvm
/// has no HPET or PM timer to calibrate against, and calibration fails at random on a
/// busy host). From /proc/cpuinfo's `cpu MHz`, which x86 reports from the calibrated TSC.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0).round() as u64)
}

/// The marker the probe guest prints.
const PROBE_OK: &[u8] = b"forkbox-kvm-ok";

/// Boots a trivial guest (busybox printing a marker and powering off) under KVM and
/// tells whether it finished within `deadline`. `/dev/kvm` can exist and still run a
/// standard guest pathologically slowly (nested virtualisation), so its presence alone
/// proves nothing.
/// Its scratch files go in `dir` (under the data dir, so a server killed mid-probe
/// leaves nothing elsewhere), removed afterwards.
pub async fn kvm_usable(
    qemu: &Path,
    vmlinux: &Path,
    busybox: &Path,
    dir: &Path,
    deadline: Duration,
) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let outcome = trivial_boot(qemu, vmlinux, busybox, dir, Accel::Kvm, deadline).await;
    let _ = std::fs::remove_dir_all(dir);
    match outcome {
        Ok(ok) => ok.is_some(),
        Err(e) => {
            tracing::info!(error = %e, "KVM probe failed");
            false
        }
    }
}

/// Boots `vmlinux` on a bare `microvm` with `accel` to a trivial init (busybox printing
/// a marker and powering off): the time from QEMU's start to the marker, `None` if it
/// did not come within `deadline`. The KVM probe, and the bare boot `forkbox bench`
/// compares the vm runtime's creates with. Scratch files in `dir`.
pub async fn trivial_boot(
    qemu: &Path,
    vmlinux: &Path,
    busybox: &Path,
    dir: &Path,
    accel: Accel,
    deadline: Duration,
) -> std::io::Result<Option<Duration>> {
    std::fs::create_dir_all(dir)?;
    let mut c = crate::initrd::Cpio::default();
    c.dir("dev");
    c.char_dev("dev/console", 0o600, 5, 1);
    c.dir("bin");
    c.file("bin/busybox", 0o755, &std::fs::read(busybox)?);
    c.file(
        "init",
        0o755,
        b"#!/bin/busybox sh\n/bin/busybox echo forkbox-kvm-ok\n/bin/busybox poweroff -f\n",
    );
    let initrd = dir.join("probe.cpio");
    std::fs::write(&initrd, c.finish())?;
    let khz = host_tsc_khz().unwrap_or(0);
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args(["-M", "microvm"])
        .args(accel.qemu_args())
        .args(["-m", "128"])
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(vmlinux)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet tsc_early_khz={khz}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let read = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = out.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(PROBE_OK.len()).any(|w| w == PROBE_OK) {
                return Ok(true);
            }
        }
    };
    let ok = matches!(tokio::time::timeout(deadline, read).await, Ok(Ok(true)));
    let took = started.elapsed();
    let _ = child.kill().await;
    Ok(ok.then_some(took))
}
