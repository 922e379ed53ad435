//! The baselines `forkbox bench` measures beside forkbox, on the same machine in the
//! same run: plain host processes, `unshare` + `chroot`, `bwrap` (bubblewrap), `crun`
//! (an OCI bundle whose root is the template's root filesystem) and `cp -a` of that
//! root. Every command is timed as a whole (spawn to exit) and its output checked.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::ms;

/// Times `n` runs of the command `make(i)` builds (after `warm` untimed ones),
/// checking that each exits 0 with exactly `want` on stdout.
pub fn time_cmd(
    n: usize,
    warm: usize,
    want: &[u8],
    mut make: impl FnMut(usize) -> Command,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n + warm {
        let mut cmd = make(i);
        cmd.stdin(Stdio::null());
        let t = Instant::now();
        let o = cmd
            .output()
            .with_context(|| format!("run {:?}", cmd.get_program()))?;
        let took = t.elapsed();
        if !o.status.success() || o.stdout != want {
            bail!(
                "{cmd:?}: {} with stdout {:?}, stderr {}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if i >= warm {
            out.push(ms(took));
        }
    }
    Ok(out)
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// A bare fork+exec of `/bin/echo hi` on the host.
pub fn fork_exec_echo(n: usize) -> anyhow::Result<Vec<f64>> {
    time_cmd(n, 3, b"hi\n", |_| {
        let mut c = Command::new("/bin/echo");
        c.arg("hi");
        c
    })
}

/// `python3 -c 'print(1)'` on the host.
pub fn host_python(n: usize) -> anyhow::Result<Vec<f64>> {
    time_cmd(n, 2, b"1\n", |_| {
        let mut c = Command::new("python3");
        c.args(["-c", "print(1)"]);
        c
    })
}

/// `unshare` with the namespaces a jail sandbox gets + `chroot` into the template +
/// `echo hi`: namespaces without cgroups, seccomp or an agent.
pub fn unshare_chroot(root: &Path, n: usize) -> anyhow::Result<Vec<f64>> {
    time_cmd(n, 2, b"hi\n", |_| {
        let mut c = Command::new("unshare");
        c.args([
            "--user",
            "--map-root-user",
            "--mount",
            "--pid",
            "--fork",
            "--net",
            "--ipc",
            "--uts",
            "--cgroup",
            "chroot",
        ])
        .arg(root)
        .args(["/bin/echo", "hi"]);
        c
    })
}

/// `bwrap --unshare-all` (user, mount, PID, network, IPC, UTS, cgroup namespaces) with
/// the template read-only as `/`, a fresh /proc, /dev and /tmp, running `args`.
pub fn bwrap(root: &Path, args: &[&str], want: &[u8], n: usize) -> anyhow::Result<Vec<f64>> {
    time_cmd(n, 2, want, |_| {
        let mut c = Command::new("bwrap");
        c.args(["--unshare-all", "--die-with-parent", "--ro-bind"])
            .arg(root)
            .args([
                "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/",
            ])
            .args(args);
        c
    })
}

/// A python3 whose heap holds ~200 MB (like the fork rows' parent REPL) forking `k`
/// children until each has run (`bench/fork_baseline.py`); per `k`, `samples` times.
/// Its allocator uses transparent huge pages, as forkbox's Python kernels do, so the
/// page tables `fork()` copies are the same size.
pub fn process_fork(ks: &[usize], samples: usize) -> anyhow::Result<Vec<Vec<f64>>> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/fork_baseline.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(samples.to_string())
        .args(ks.iter().map(|k| k.to_string()))
        .env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        .stdin(Stdio::null())
        .output()
        .context("run python3 bench/fork_baseline.py")?;
    if !out.status.success() {
        bail!(
            "fork baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: std::collections::BTreeMap<String, Vec<f64>> = serde_json::from_slice(&out.stdout)?;
    Ok(ks
        .iter()
        .map(|k| v.get(&k.to_string()).cloned().unwrap_or_default())
        .collect())
}

/// `k` concurrent `cp -a` of the template root into fresh directories in `scratch` (on
/// the pool's btrfs, where coreutils ≥ 9 clones file data: `--reflink=auto`), timed
/// until all finished; removed afterwards, untimed.
pub fn cp_a(root: &Path, scratch: &Path, k: usize, samples: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::fs::create_dir_all(scratch)
            .with_context(|| format!("create {}", scratch.display()))?;
        let t = Instant::now();
        let kids = (0..k)
            .map(|i| {
                Command::new("cp")
                    .arg("-a")
                    .arg(root)
                    .arg(scratch.join(format!("copy-{i}")))
                    .stdin(Stdio::null())
                    .spawn()
                    .context("run cp")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for mut c in kids {
            if !c.wait()?.success() {
                bail!("cp -a {} failed", root.display());
            }
        }
        out.push(ms(t.elapsed()));
        std::fs::remove_dir_all(scratch)
            .with_context(|| format!("remove {}", scratch.display()))?;
    }
    Ok(out)
}

/// What the crun rows measured.
#[derive(Default)]
pub struct CrunTimes {
    /// `crun run` of `true` (create, start, wait, delete).
    pub run_true: Vec<f64>,
    /// `crun exec` of `echo hi` in a running container.
    pub exec_echo: Vec<f64>,
    pub pause: Vec<f64>,
    pub resume: Vec<f64>,
    /// `crun run` of `python3 -c 'print(1)'`.
    pub run_python: Vec<f64>,
}

/// The cgroup parent crun's containers go under (removed afterwards).
const CRUN_CGROUP: &str = "forkbox-bench-crun";

/// An OCI runtime config for `args` in a container whose root is `root` (read-only),
/// with the namespaces and limits of a default jail sandbox: user (0–65535 →
/// `uid_base`…), mount, PID, network, IPC, UTS and cgroup namespaces; 512 MiB of
/// memory, 512 pids, one CPU.
fn oci_config(root: &Path, args: &[&str], uid_base: u32, id: &str) -> serde_json::Value {
    let ns = ["user", "mount", "pid", "network", "ipc", "uts", "cgroup"]
        .iter()
        .map(|t| serde_json::json!({ "type": t }))
        .collect::<Vec<_>>();
    let map = serde_json::json!([{ "containerID": 0, "hostID": uid_base, "size": 65536 }]);
    serde_json::json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            "cwd": "/",
            "capabilities": { "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": [] },
            "noNewPrivileges": true
        },
        "root": { "path": root, "readonly": true },
        "hostname": "bench",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=262144k"] }
        ],
        "linux": {
            "namespaces": ns,
            "uidMappings": map,
            "gidMappings": map,
            "cgroupsPath": format!("/{CRUN_CGROUP}/{id}"),
            "resources": {
                "memory": { "limit": 512u64 << 20 },
                "pids": { "limit": 512 },
                "cpu": { "quota": 100_000, "period": 100_000 }
            }
        }
    })
}

/// Runs the crun rows. crun is run from a thread of its own in a private mount
/// namespace: crun 1.8 refuses "hybrid" hosts whose cgroup2 mount (at
/// `/sys/fs/cgroup/unified`) has any controller, as this machine's has (hugetlb), so
/// that mount is detached there and crun sees a v1 host, manages v1 cgroups as forkbox
/// does, and the host is left as it was.
pub fn crun(root: PathBuf, dir: PathBuf, uid_base: u32, n: usize) -> anyhow::Result<CrunTimes> {
    std::thread::spawn(move || {
        private_mount_ns()?;
        let res = crun_rows(&root, &dir, uid_base, n);
        remove_crun_cgroups();
        let _ = std::fs::remove_dir_all(&dir);
        res
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the crun thread panicked"))?
}

fn private_mount_ns() -> anyhow::Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("unshare a mount namespace for crun")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private")?;
    let unified = Path::new("/sys/fs/cgroup/unified");
    let is_cgroup2 = nix::sys::statfs::statfs(unified)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if is_cgroup2 {
        umount2(unified, MntFlags::MNT_DETACH).context("detach /sys/fs/cgroup/unified")?;
    }
    Ok(())
}

fn remove_crun_cgroups() {
    let base = Path::new("/sys/fs/cgroup");
    let _ = std::fs::remove_dir(base.join(CRUN_CGROUP));
    if let Ok(rd) = std::fs::read_dir(base) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir(e.path().join(CRUN_CGROUP));
        }
    }
}

fn crun_rows(root: &Path, dir: &Path, uid_base: u32, n: usize) -> anyhow::Result<CrunTimes> {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).with_context(|| format!("create {}", state.display()))?;
    let tag = std::process::id();
    let bundle = |name: &str, args: &[&str]| -> anyhow::Result<PathBuf> {
        let b = dir.join(name);
        std::fs::create_dir_all(&b)?;
        let cfg = oci_config(root, args, uid_base, &format!("{name}-{tag}"));
        std::fs::write(b.join("config.json"), serde_json::to_vec_pretty(&cfg)?)?;
        Ok(b)
    };
    let crun = || {
        let mut c = Command::new("crun");
        c.arg("--root").arg(&state);
        c
    };
    let run = |b: PathBuf, id: String| {
        move |i: usize| {
            let mut c = crun();
            c.arg("run")
                .arg("--bundle")
                .arg(&b)
                .arg(format!("{id}-{i}"));
            c
        }
    };
    let mut t = CrunTimes {
        run_true: time_cmd(
            n,
            2,
            b"",
            run(bundle("true", &["/bin/true"])?, format!("fb-true-{tag}")),
        )?,
        run_python: time_cmd(
            n,
            2,
            b"1\n",
            run(
                bundle("python", &["python3", "-c", "print(1)"])?,
                format!("fb-py-{tag}"),
            ),
        )?,
        ..CrunTimes::default()
    };
    // A long-running container for exec, pause and resume.
    let id = format!("fb-sleep-{tag}");
    let st = crun()
        .arg("run")
        .arg("--detach")
        .arg("--bundle")
        .arg(bundle("sleep", &["sleep", "infinity"])?)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("crun run --detach")?;
    if !st.success() {
        bail!("crun run --detach: {st}");
    }
    let res = (|| -> anyhow::Result<()> {
        t.exec_echo = time_cmd(n, 3, b"hi\n", |_| {
            let mut c = crun();
            c.args(["exec", &id, "/bin/echo", "hi"]);
            c
        })?;
        for _ in 0..n + 2 {
            for (op, out) in [("pause", &mut t.pause), ("resume", &mut t.resume)] {
                out.extend(time_cmd(1, 0, b"", |_| {
                    let mut c = crun();
                    c.args([op, &id]);
                    c
                })?);
            }
        }
        // The first two pause/resume pairs were warm-ups.
        t.pause.drain(..2.min(t.pause.len()));
        t.resume.drain(..2.min(t.resume.len()));
        Ok(())
    })();
    let _ = crun()
        .args(["delete", "--force", &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    res.map(|()| t)
}
