//! Credentials: capability sets, no_new_privs/seccomp, setuid binaries.

use crate::util::{self, cpath, Outcome};
use crate::Ctx;
use std::os::unix::process::CommandExt;
use std::process::Command;

fn caps(names: &[&str]) -> (bool, String) {
    let mut notes = Vec::new();
    let mut nonzero = false;
    for n in names {
        let v = util::status_field(n).unwrap_or_else(|| "?".into());
        if v.chars().any(|c| c != '0') {
            nonzero = true;
        }
        notes.push(format!("{n} {v}"));
    }
    (nonzero, notes.join(", "))
}

pub fn cap_inh_amb(_: &Ctx) -> Outcome {
    let (e, d) = caps(&["CapInh", "CapAmb"]);
    Outcome::from(e, d)
}

pub fn cap_eff_bnd(_: &Ctx) -> Outcome {
    let (e, d) = caps(&["CapPrm", "CapEff", "CapBnd"]);
    Outcome::from(e, d)
}

pub fn no_new_privs(_: &Ctx) -> Outcome {
    let nnp = util::status_field("NoNewPrivs").unwrap_or_else(|| "?".into());
    let sc = util::status_field("Seccomp").unwrap_or_else(|| "?".into());
    Outcome::from(
        nnp != "1" || sc != "2",
        format!("NoNewPrivs {nnp}, Seccomp {sc} (2 = filter)"),
    )
}

/// `--report-creds`: what a (setuid) copy of the probe runs with.
pub fn report_creds() -> String {
    let mut r = [0 as libc::uid_t; 3];
    // SAFETY: getresuid into three uids we own.
    unsafe { libc::getresuid(&mut r[0], &mut r[1], &mut r[2]) };
    format!(
        "ruid={} euid={} CapEff={} CapPrm={}",
        r[0],
        r[1],
        util::status_field("CapEff").unwrap_or_default(),
        util::status_field("CapPrm").unwrap_or_default()
    )
}

fn field<'a>(s: &'a str, k: &str) -> Option<&'a str> {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        .filter(|v| !v.is_empty())
}

pub fn setuid_binary(ctx: &Ctx) -> Outcome {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return Outcome::blocked(format!("current_exe: {e}")),
    };
    let dir = match util::scratch(&ctx.scratch, ".forkbox-probe-suid") {
        Ok(d) => d,
        Err(e) => return Outcome::blocked(e),
    };
    let copy = dir.join("forkbox-probe-suid");
    let o = (|| {
        std::fs::copy(&exe, &copy).map_err(|e| format!("copy: {e}"))?;
        let c = cpath(&copy);
        // SAFETY: chmod of the copy we own: setuid, owned by us (uid 0 in the sandbox).
        if unsafe { libc::chmod(c.as_ptr(), 0o4755) } != 0 {
            return Err(format!("chmod 4755: {}", util::last()));
        }
        let mut cmd = Command::new(&copy);
        cmd.arg("--report-creds");
        // Become an ordinary user first if we can (host root can; the sandbox's
        // capability-less root cannot): the setuid bit should then give root back.
        // SAFETY: only async-signal-safe set*id calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setgroups(0, std::ptr::null());
                libc::setresgid(65534, 65534, 65534);
                libc::setresuid(65534, 65534, 65534);
                Ok(())
            });
        }
        let out = cmd
            .output()
            .map_err(|e| format!("run the setuid copy: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let s = match o {
        Ok(s) => s,
        Err(e) => return Outcome::blocked(e),
    };
    let (Some(ruid), Some(euid), Some(eff), Some(prm)) = (
        field(&s, "ruid"),
        field(&s, "euid"),
        field(&s, "CapEff"),
        field(&s, "CapPrm"),
    ) else {
        return Outcome::blocked(format!(
            "the setuid copy did not report its credentials: {s:?}"
        ));
    };
    let zero = |v: &str| v.chars().all(|c| c == '0');
    let gained_uid = euid == "0" && ruid != "0";
    let gained_caps = !zero(eff) || !zero(prm);
    Outcome::from(
        gained_uid || gained_caps,
        format!("setuid-root copy of the probe runs with {s}"),
    )
}
