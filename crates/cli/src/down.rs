//! Who may act on a data dir, and what happens to its sandboxes when no server does:
//!
//! - `<data>/server.lock`: a `flock` the server holds for its whole life (one server
//!   per data dir); `forkbox down` and the warden take it to act, so neither runs
//!   beside a server, and a server starting meanwhile waits for them.
//! - **The warden** (`forkbox warden`, started by `serve`, in a session of its own):
//!   one per data dir (`<data>/warden.lock`). While a server holds the lock it sleeps;
//!   when none has held it for the grace period (`--orphan-grace`, as the last server
//!   wrote it into the lock file) it takes the data dir down and exits. It exits at
//!   once when nothing of the data dir is running.
//! - **`forkbox down`**: the same, now, by hand or from a test harness.

use crate::config::HostArgs;
use anyhow::Context as _;
use clap::Args;
use forkbox_core::{Manager, ManagerConfig, Runtime};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERVER_LOCK: &str = "server.lock";
const WARDEN_LOCK: &str = "warden.lock";

/// What the holder of a lock file wrote into it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Default)]
struct Holder {
    pid: u32,
    /// `server`, `warden` or `down`.
    role: String,
    /// The server's `--orphan-grace`, seconds (0: off).
    #[serde(default)]
    orphan_grace: u64,
}

/// An exclusive `flock` on a lock file, released when dropped.
pub struct Lock {
    file: Flock<File>,
}

impl Lock {
    /// Takes the lock at `path` without waiting; `Ok(None)` when someone holds it.
    fn try_take(path: &Path) -> anyhow::Result<Option<Lock>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => Ok(Some(Lock { file })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(e).with_context(|| format!("lock {}", path.display())),
        }
    }

    /// Records who holds it.
    fn write(&mut self, h: &Holder) -> anyhow::Result<()> {
        let f: &mut File = &mut self.file;
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(&serde_json::to_vec(h)?)?;
        Ok(())
    }
}

/// The data dir's lock when nobody (server, warden, `forkbox down`) holds it now.
pub fn try_hold(data: &Path) -> anyhow::Result<Option<Lock>> {
    std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
    Lock::try_take(&data.join(SERVER_LOCK))
}

/// Who holds (or last held) the lock at `path`.
fn holder(path: &Path) -> Holder {
    let mut s = String::new();
    let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut s));
    serde_json::from_str(&s).unwrap_or_default()
}

/// Takes `<data>/server.lock` as `role`, waiting up to `patience` while a warden or a
/// `forkbox down` holds it; refuses at once when a live server does.
fn take_data_dir(
    data: &Path,
    role: &str,
    orphan_grace: u64,
    patience: Duration,
) -> anyhow::Result<Lock> {
    let path = data.join(SERVER_LOCK);
    let started = Instant::now();
    let mut said = false;
    loop {
        if let Some(mut lock) = Lock::try_take(&path)? {
            lock.write(&Holder {
                pid: std::process::id(),
                role: role.to_owned(),
                orphan_grace,
            })?;
            return Ok(lock);
        }
        let h = holder(&path);
        anyhow::ensure!(
            h.role != "server" || h.pid == 0,
            "a forkbox server (pid {}) is running on {}; stop it first",
            h.pid,
            data.display()
        );
        anyhow::ensure!(
            started.elapsed() < patience,
            "{} is held by {} (pid {}) for more than {}s",
            path.display(),
            h.role,
            h.pid,
            patience.as_secs()
        );
        if !said {
            eprintln!(
                "forkbox: waiting for the {} (pid {}) on {} to finish",
                h.role,
                h.pid,
                data.display()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The server's hold on its data dir, and its warden started if none runs.
pub fn claim_for_server(host: &HostArgs, runtimes: &[String]) -> anyhow::Result<Lock> {
    let data = host.data_dir();
    std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let lock = take_data_dir(&data, "server", host.orphan_grace, Duration::from_secs(300))?;
    if host.orphan_grace > 0 {
        start_warden(host, runtimes)?;
    }
    Ok(lock)
}

/// Starts `forkbox warden` for the data dir unless one runs.
fn start_warden(host: &HostArgs, runtimes: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let data = host.data_dir();
    if Lock::try_take(&data.join(WARDEN_LOCK))?.is_none() {
        return Ok(());
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("warden.log"))
        .context("open warden.log")?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("warden")
        .args(host.to_args())
        .arg(format!("--runtimes={}", runtimes.join(",")))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log.try_clone()?);
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("start the warden")?;
    tracing::info!(pid = child.id(), data_dir = %data.display(), "warden started");
    Ok(())
}

#[derive(Args, Clone, Debug)]
pub struct DownArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Also delete hibernated sandboxes and named snapshots (everything of the data
    /// dir in the pool, which may be shared), e.g. before deleting the data dir.
    #[arg(long)]
    pub purge: bool,
}

/// `forkbox down`: ends everything of the data dir that runs, with no server on it.
pub async fn down(args: DownArgs) -> anyhow::Result<()> {
    let data = args.host.data_dir();
    if !data.exists() {
        println!("nothing to do: {} does not exist", data.display());
        return Ok(());
    }
    let _lock =
        tokio::task::block_in_place(|| take_data_dir(&data, "down", 0, Duration::from_secs(120)))?;
    let lines = take_down(&args.host, args.purge).await?;
    stop_warden(&data);
    if lines.is_empty() {
        println!("nothing to do: nothing of {} was running", data.display());
    }
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// Ends every sandbox of the data dir and frees what its runtimes hold; the caller
/// holds the data dir's lock.
async fn take_down(host: &HostArgs, purge: bool) -> anyhow::Result<Vec<String>> {
    let data = host.data_dir();
    let cfg = host.jail_config()?;
    let jail = Arc::new(forkbox_jail::JailRuntime::for_cleanup(&cfg)?);
    let mut vm_cfg = forkbox_vm::VmConfig::new(&data, cfg.agent_bin.clone());
    vm_cfg.accel = Some(forkbox_vm::accel::Accel::Tcg);
    let others: Vec<Arc<dyn Runtime>> = match forkbox_vm::VmRuntime::new(vm_cfg) {
        Ok(vm) => vec![Arc::new(vm)],
        Err(e) => {
            tracing::warn!(error = %e, "vm runtime unavailable: only jail sandboxes are ended");
            Vec::new()
        }
    };
    let store = host.open_store().await?;
    let manager = Manager::with_runtimes(store, jail, others, ManagerConfig::default());
    let mut lines = manager.down(purge).await?.lines;
    // A pool of the data dir's own, on its loop image: unmounted (the loop device
    // goes with it).
    if cfg.pool_dir.starts_with(&data) && is_mount_point(&cfg.pool_dir) {
        let out = tokio::process::Command::new("umount")
            .arg(&cfg.pool_dir)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "umount {}: {}",
            cfg.pool_dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        lines.push(format!("unmounted pool {}", cfg.pool_dir.display()));
    }
    Ok(lines)
}

/// Whether `p` is a mount point (its device differs from its parent's).
fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}

/// Ends the data dir's warden, if one runs (after a `down` it has nothing to watch).
fn stop_warden(data: &Path) {
    let path = data.join(WARDEN_LOCK);
    if matches!(Lock::try_take(&path), Ok(Some(_))) {
        return;
    }
    let h = holder(&path);
    if h.pid == 0 || h.role != "warden" {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(h.pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && matches!(Lock::try_take(&path), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Args, Clone, Debug)]
pub struct WardenArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// The runtimes the server runs (as `serve --runtimes`).
    #[arg(long, value_delimiter = ',', default_value = "jail")]
    pub runtimes: Vec<String>,
}

/// How often the warden looks for its server.
const WARDEN_TICK: Duration = Duration::from_millis(500);

/// `forkbox warden`: see the module comment.
pub async fn warden(args: WardenArgs) -> anyhow::Result<()> {
    let data = args.host.data_dir();
    let Some(mut me) = Lock::try_take(&data.join(WARDEN_LOCK))? else {
        return Ok(());
    };
    me.write(&Holder {
        pid: std::process::id(),
        role: "warden".into(),
        orphan_grace: args.host.orphan_grace,
    })?;
    tracing::info!(data_dir = %data.display(), "warden watching");
    let mut server = ServerWatch::open(&data)?;
    // Sandboxes seen, so they can be ended even if the data dir is deleted.
    let mut known = std::collections::BTreeSet::new();
    let mut grace = Duration::from_secs(args.host.orphan_grace);
    let mut gone_since: Option<Instant> = None;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WARDEN_TICK) => {}
            _ = term.recv() => return Ok(()),
        }
        let present = data.exists();
        if present {
            server.reopen_if_replaced()?;
            known.extend(running_ids(&data));
            known.retain(|id: &String| {
                data.join("run").join(id).exists() || data.join("vm-run").join(id).exists()
            });
        }
        if server.held() {
            gone_since = None;
            if present {
                grace = Duration::from_secs(holder(&data.join(SERVER_LOCK)).orphan_grace);
            }
            continue;
        }
        if known.is_empty() {
            tracing::info!("no server and nothing running: warden exits");
            return Ok(());
        }
        let since = *gone_since.get_or_insert_with(Instant::now);
        if grace.is_zero() || since.elapsed() < grace {
            continue;
        }
        // Ours now: no server starts until the data dir is down.
        let Some(_held) = server.take() else {
            continue;
        };
        tracing::warn!(
            grace_s = grace.as_secs(),
            "no server for the grace period: taking the data dir down"
        );
        let lines = if data.exists() {
            take_down(&args.host, false).await?
        } else {
            end_known(&args.host, known.iter().cloned().collect()).await?
        };
        for line in lines {
            tracing::warn!("{line}");
        }
        return Ok(());
    }
}

/// The warden's view of `<data>/server.lock`: an open file, so it still tells whether
/// the server lives after the data dir is deleted.
struct ServerWatch {
    path: PathBuf,
    file: File,
}

impl ServerWatch {
    fn open(data: &Path) -> anyhow::Result<ServerWatch> {
        let path = data.join(SERVER_LOCK);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        Ok(ServerWatch { path, file })
    }

    /// Follows a lock file made anew (the data dir was deleted and made again).
    fn reopen_if_replaced(&mut self) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let ino = |m: std::io::Result<std::fs::Metadata>| m.ok().map(|m| (m.dev(), m.ino()));
        if ino(std::fs::metadata(&self.path)) != ino(self.file.metadata()) {
            if let Some(data) = self.path.parent() {
                *self = ServerWatch::open(data)?;
            }
        }
        Ok(())
    }

    /// Whether someone (a server) holds the lock now.
    fn held(&self) -> bool {
        self.take().is_none()
    }

    /// The lock, when free; released when the guard drops.
    fn take(&self) -> Option<FlockGuard<'_>> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        (r == 0).then_some(FlockGuard(&self.file))
    }
}

/// A `flock` taken by [`ServerWatch::take`].
struct FlockGuard<'a>(&'a File);

impl Drop for FlockGuard<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Ends sandboxes `ids` of a data dir that no longer exists (no database, no run
/// dirs): their processes, cgroups and root filesystems, and the egress namespace.
async fn end_known(host: &HostArgs, ids: Vec<String>) -> anyhow::Result<Vec<String>> {
    let cfg = host.jail_config_in_place();
    let mut runtimes: Vec<Arc<dyn Runtime>> =
        vec![Arc::new(forkbox_jail::JailRuntime::for_cleanup(&cfg)?)];
    let mut vm_cfg = forkbox_vm::VmConfig::new(&host.data_dir(), cfg.agent_bin.clone());
    vm_cfg.accel = Some(forkbox_vm::accel::Accel::Tcg);
    if let Ok(vm) = forkbox_vm::VmRuntime::new(vm_cfg) {
        runtimes.push(Arc::new(vm));
    }
    let mut lines = Vec::new();
    for rt in runtimes {
        for id in &ids {
            rt.cleanup(id).await?;
        }
        lines.extend(rt.release_host().await?);
    }
    lines.extend(ids.iter().map(|id| format!("ended sandbox {id}")));
    Ok(lines)
}

/// Ids of the sandboxes whose run dirs are in the data dir.
fn running_ids(data: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    for (dir, skip) in [("run", ""), ("vm-run", "layers")] {
        if let Ok(rd) = std::fs::read_dir(data.join(dir)) {
            ids.extend(
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| n != skip && !n.starts_with('.')),
            );
        }
    }
    ids
}
