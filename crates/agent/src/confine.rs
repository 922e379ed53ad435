//! `forkbox-agent confine [--env K=V]… [--env-stdin] [--cwd DIR] [--user SPEC] -- CMD…`:
//! run by the host (through nsenter) inside a template build sandbox, for its package
//! step and its build commands. First undumpable (no process of the sandbox may write
//! its memory while it still holds capabilities), then `no_new_privs` and the sandbox's
//! seccomp filters (`setns` denied too), then only the capabilities of a container
//! build's root (`forkbox_sys::caps::PACKAGE_CAPS`, all of them the sandbox user
//! namespace's); every inherited descriptor but 0-2 closed at exec. With `--env` (or
//! `--env-stdin`: NUL-separated `K=V` on standard input, which is then `/dev/null` —
//! values kept off the host's process list), CMD gets exactly those variables; `--cwd`
//! is where it starts; `--user` (a Dockerfile's `USER`: `name`, `uid`, `name:group`,
//! `uid:gid`, resolved in the sandbox's `/etc/passwd` and `/etc/group`) runs it as that
//! user, with its groups and `HOME`, and no capabilities at all.

use std::os::unix::process::CommandExt as _;
use std::process::ExitCode;

/// Who a `--user` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary one first).
    pub groups: Vec<u32>,
    pub home: String,
}

/// The `name:…:uid:gid:…:home:…` lines of a passwd file: (name, uid, gid, home).
fn passwd_entries(text: &str) -> impl Iterator<Item = (&str, u32, u32, &str)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some((f[0], f[2].parse().ok()?, f[3].parse().ok()?, f[5]))
    })
}

/// The `name:…:gid:members` lines of a group file: (name, gid, members).
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `spec` as Docker does: a name must be in `passwd`; a number need not be
/// (then its group is 0 and its home `/`); `:group` overrides the primary group (a
/// name must be in `group`) and then no supplementary groups are added.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<User, String> {
    let (who, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if who.is_empty() || grp.is_some_and(str::is_empty) {
        return Err(format!("USER {spec:?}: empty user or group"));
    }
    let entry = passwd_entries(passwd)
        .find(|(name, uid, _, _)| *name == who || who.parse::<u32>().is_ok_and(|n| n == *uid));
    let (name, uid, mut gid, home) = match (entry, who.parse::<u32>()) {
        (Some((n, u, g, h)), _) => (Some(n), u, g, h.to_owned()),
        (None, Ok(u)) => (None, u, 0, "/".to_owned()),
        (None, Err(_)) => return Err(format!("USER {who}: no such user in /etc/passwd")),
    };
    let mut groups = Vec::new();
    match grp {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => group_entries(group)
                    .find(|(n, _, _)| *n == g)
                    .map(|(_, id, _)| id)
                    .ok_or_else(|| format!("USER {spec}: no such group in /etc/group"))?,
            };
            groups.push(gid);
        }
        None => {
            groups.push(gid);
            if let Some(n) = name {
                for (_, id, members) in group_entries(group) {
                    if members.contains(&n) && !groups.contains(&id) {
                        groups.push(id);
                    }
                }
            }
        }
    }
    if uid >= forkbox_sys::uidshift::RANGE
        || groups.iter().any(|g| *g >= forkbox_sys::uidshift::RANGE)
    {
        return Err(format!(
            "USER {spec}: ids are below {}",
            forkbox_sys::uidshift::RANGE
        ));
    }
    Ok(User {
        uid,
        gid,
        groups,
        home,
    })
}

/// Most bytes of environment read from standard input.
const MAX_ENV: usize = 1 << 20;

/// NUL-separated `K=V` entries from standard input (at most [`MAX_ENV`] bytes), after
/// which standard input is `/dev/null`.
fn env_from_stdin() -> std::io::Result<Vec<(String, String)>> {
    use std::io::Read as _;
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_ENV as u64 + 1)
        .read_to_end(&mut buf)?;
    if buf.len() > MAX_ENV {
        return Err(std::io::Error::other("more than 1 MiB"));
    }
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 onto fd 0 of a descriptor we own.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect())
}

/// Becomes `u`: groups, then gid, then uid (the capabilities go with it; for uid 0,
/// dropped explicitly).
fn become_user(u: &User) -> std::io::Result<()> {
    let groups: Vec<nix::unistd::Gid> = u
        .groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups)?;
    let g = nix::unistd::Gid::from_raw(u.gid);
    nix::unistd::setresgid(g, g, g)?;
    if u.uid == 0 {
        forkbox_sys::caps::drop_all()?;
        return Ok(());
    }
    let uid = nix::unistd::Uid::from_raw(u.uid);
    nix::unistd::setresuid(uid, uid, uid)?;
    Ok(())
}

/// See the module comment. Returns only on failure.
pub fn run(args: &[String]) -> ExitCode {
    let usage = || {
        eprintln!(
            "usage: forkbox-agent confine [--env K=V]… [--cwd DIR] [--user SPEC] -- CMD [ARGS…]"
        );
        ExitCode::from(2)
    };
    let Some(sep) = args.iter().position(|a| a == "--") else {
        return usage();
    };
    let cmd = &args[sep + 1..];
    if cmd.is_empty() {
        return usage();
    }
    // Before anything else: nothing in the sandbox may open this process's memory
    // (same uid; dumpable after the exec of a readable image) while it has capabilities.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let (mut env, mut cwd, mut user) = (None::<Vec<(String, String)>>, None, None);
    let mut opts = args[..sep].iter();
    while let Some(o) = opts.next() {
        if o == "--env-stdin" {
            match env_from_stdin() {
                Ok(e) => env.get_or_insert_with(Vec::new).extend(e),
                Err(e) => {
                    eprintln!("forkbox-agent confine: environment: {e}");
                    return ExitCode::FAILURE;
                }
            }
            continue;
        }
        match (o.as_str(), opts.next()) {
            ("--env", Some(kv)) => {
                let Some((k, v)) = kv.split_once('=') else {
                    return usage();
                };
                env.get_or_insert_with(Vec::new)
                    .push((k.to_owned(), v.to_owned()));
            }
            ("--cwd", Some(d)) => cwd = Some(d.clone()),
            ("--user", Some(u)) => user = Some(u.clone()),
            _ => return usage(),
        }
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("forkbox-agent confine: {what}: {e}");
        ExitCode::FAILURE
    };
    let user = match user {
        None => None,
        Some(spec) => {
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
            match resolve(&spec, &passwd, &group) {
                Ok(u) => Some(u),
                Err(e) => return fail("user", &e),
            }
        }
    };
    let filters = match forkbox_sys::seccomp::compile() {
        Ok(f) => f,
        Err(e) => return fail("seccomp", &e),
    };
    // The filters first (they allow what follows: prctl, capset, setgroups, setres*id),
    // then the capabilities down to a build's, then the user.
    let confined = forkbox_sys::caps::set_no_new_privs()
        .and_then(|()| forkbox_sys::seccomp::install(&filters).map_err(std::io::Error::other))
        .and_then(|()| {
            forkbox_sys::seccomp::install_one(&filters.nosetns).map_err(std::io::Error::other)
        })
        .and_then(|()| forkbox_sys::caps::keep_only(forkbox_sys::caps::PACKAGE_CAPS))
        .and_then(|()| match &user {
            Some(u) => become_user(u),
            None => Ok(()),
        });
    if let Err(e) = confined {
        return fail("confine", &e);
    }
    let mut c = std::process::Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    if let Some(env) = env {
        c.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
        // (A user's HOME is its own, unless the build's environment sets one.)
        if let Some(u) = user
            .as_ref()
            .filter(|_| !env.iter().any(|(k, _)| k == "HOME"))
        {
            c.env("HOME", &u.home);
        }
    }
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    // (What nsenter passed on — the agent image's fd among them — stays out of CMD.)
    // SAFETY: close_range with integer arguments only.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    let e = c.exec();
    fail(&format!("exec {}", cmd[0]), &e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nweb:x:33:33::/var/www:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,web\napp:x:1000:\nweb:x:33:\n";

    #[test]
    fn users_resolve_as_docker_resolves_them() {
        let u = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!(
            (u.uid, u.gid, u.groups.clone(), u.home.as_str()),
            (1000, 1000, vec![1000, 50], "/home/app")
        );
        assert_eq!(resolve("1000", PASSWD, GROUP).unwrap(), u);
        let u = resolve("app:web", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (1000, 33, vec![33]));
        let u = resolve("4242:7", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 7, "/"));
        let u = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (4242, 0));
        assert!(resolve("nobody", PASSWD, GROUP)
            .unwrap_err()
            .contains("no such user"));
        assert!(resolve("app:nogroup", PASSWD, GROUP)
            .unwrap_err()
            .contains("no such group"));
        assert!(resolve("70000", PASSWD, GROUP).is_err());
        assert!(resolve(":x", PASSWD, GROUP).is_err() && resolve("app:", PASSWD, GROUP).is_err());
    }
}
