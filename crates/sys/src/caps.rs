//! Capabilities and other per-process privilege switches for user code.
//!
//! Everything here is a plain syscall without allocation, so it can run in a
//! `pre_exec` hook between `fork` and `exec`.

use std::io;

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

/// The highest capability number any kernel we support knows (CAP_CHECKPOINT_RESTORE).
const CAP_LAST_CAP: libc::c_ulong = 40;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Drops every capability for good: root-ness no longer grants any on `exec`, the
/// bounding and ambient sets are emptied, then the effective, permitted and inheritable
/// sets are cleared. Async-signal-safe.
pub fn drop_all() -> io::Result<()> {
    let bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) })?;
    keep_only(&[])
}

/// Capabilities a package manager needs inside a sandbox's user namespace (Docker's
/// default set without `CAP_NET_RAW` and `CAP_MKNOD`): file ownership and modes, the
/// `_apt` user switch, file capabilities, `chroot`.
pub const PACKAGE_CAPS: &[libc::c_ulong] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    18, // CAP_SYS_CHROOT
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Keeps only capabilities `keep` (numbers): every other one leaves the bounding set,
/// and the effective, permitted and inheritable sets become `keep` (ambient cleared),
/// so neither this process nor anything it executes as root can get the others back.
/// Async-signal-safe.
pub fn keep_only(keep: &[libc::c_ulong]) -> io::Result<()> {
    for cap in 0..=CAP_LAST_CAP {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments; EINVAL for caps this kernel lacks is fine.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: prctl with integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    let mut mask = [0u32; 2];
    for &cap in keep {
        if cap <= CAP_LAST_CAP {
            mask[(cap / 32) as usize] |= 1 << (cap % 32);
        }
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask[0],
            permitted: mask[0],
            inheritable: 0,
        },
        CapData {
            effective: mask[1],
            permitted: mask[1],
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads a v3 header and two data structs that live on the stack.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int })
}

/// Sets `no_new_privs`: no exec can ever grant privileges again. Async-signal-safe.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// Makes the calling process undumpable, so processes with the same uid can neither
/// ptrace it nor open its `/proc/<pid>/mem`, `environ` or `exe`.
pub fn set_undumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_capabilities_stay_dropped_across_exec() {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("/bin/grep");
        cmd.args(["-E", "^(CapEff|CapBnd|NoNewPrivs)", "/proc/self/status"]);
        // SAFETY: drop_all and set_no_new_privs only make syscalls.
        unsafe {
            cmd.pre_exec(|| {
                drop_all()?;
                set_no_new_privs()
            });
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
        assert!(text.contains("CapBnd:\t0000000000000000"), "{text}");
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    }
}
