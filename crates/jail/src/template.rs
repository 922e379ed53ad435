//! Building templates: a Debian root filesystem made by mmdebstrap into a btrfs
//! subvolume, its owners shifted into the sandboxes' uid range, then made read-only.
//!
//! A build happens under an exclusive lock, into a temporary subvolume that is renamed
//! into place only when complete: a failed or interrupted build leaves nothing behind
//! that could be mistaken for a template.

use crate::pool::Pool;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio::io::AsyncBufReadExt;

pub const SUITE: &str = "bookworm";

/// What is recorded beside a finished template.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateMeta {
    pub name: String,
    pub suite: String,
    pub packages: Vec<String>,
    pub uid_base: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub built_at: time::OffsetDateTime,
    pub build_seconds: f64,
    /// Bytes of its files (templates built before this was recorded have none).
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// The template it was layered on (`None`: Debian from scratch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Commands run in its build sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run: Vec<String>,
    /// Environment of its sandboxes (and of its build commands).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory of its build commands (and its sandboxes' commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The OCI image it was imported from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<forkbox_types::api::ImageInfo>,
}

/// Every template built for `uid_base` in the pool, by name.
pub fn list(pool: &Pool, uid_base: u32) -> Vec<TemplateMeta> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(pool.root().join("templates")) else {
        return out;
    };
    for e in rd.flatten() {
        let f = e.file_name();
        let Some(name) = f.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if name.starts_with('.') || name.contains('.') {
            continue;
        }
        if let Some(m) = built(pool, name, uid_base) {
            out.push(m);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Takes the pool's exclusive template lock (held until dropped).
pub(crate) async fn lock_pool(
    pool: &Pool,
    name: &str,
) -> Result<nix::fcntl::Flock<std::fs::File>, TemplateError> {
    let lock_path = pool.lock_file();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| TemplateError::Lock(lock_path.clone(), e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| TemplateError::Lock(lock_path, e.into()))
    })
    .await
    .map_err(|e| TemplateError::Io(name.into(), std::io::Error::other(e)))?
}

/// Writes a template's record atomically (the last step of a build).
pub(crate) fn write_meta(pool: &Pool, meta: &TemplateMeta) -> Result<(), TemplateError> {
    let name = meta.name.as_str();
    let meta_path = pool.template_meta(name);
    let tmp_meta = meta_path.with_extension("json.tmp");
    let bytes =
        serde_json::to_vec_pretty(meta).map_err(|e| TemplateError::Io(name.into(), e.into()))?;
    std::fs::write(&tmp_meta, bytes).map_err(|e| TemplateError::Io(name.into(), e))?;
    std::fs::rename(&tmp_meta, &meta_path).map_err(|e| TemplateError::Io(name.into(), e))
}

/// The metadata of a built template, if it is built for `uid_base`.
pub fn built(pool: &Pool, name: &str, uid_base: u32) -> Option<TemplateMeta> {
    ready(pool, name, uid_base).ok().flatten()
}

/// Bytes of the regular files under `root` (each file once, hard links counted once).
pub(crate) fn tree_size(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else if md.is_file() && seen.insert((md.dev(), md.ino())) {
            total += md.len();
        }
    }
    total
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {0} does not exist and forkbox has no recipe for it")]
    Unknown(String),
    #[error("template {name} was built for uid base {found}, this server uses {want}; delete {path} to rebuild")]
    UidBase {
        name: String,
        found: u32,
        want: u32,
        path: PathBuf,
    },
    #[error("lock {0}: {1}")]
    Lock(PathBuf, std::io::Error),
    #[error("run mmdebstrap: {0} (is mmdebstrap installed? `make deps` installs it)")]
    Spawn(std::io::Error),
    #[error("mmdebstrap failed building {name} (exit {code:?}); last output:\n{tail}")]
    Build {
        name: String,
        code: Option<i32>,
        tail: String,
    },
    #[error("template {0}: {1}")]
    Io(String, std::io::Error),
    #[error("building template {0} from its recipe: {1}")]
    Recipe(String, Box<crate::build::BuildError>),
    #[error(transparent)]
    Btrfs(#[from] forkbox_sys::btrfs::BtrfsError),
    #[error(transparent)]
    Shift(#[from] forkbox_sys::uidshift::ShiftError),
}

pub(crate) fn read_meta(path: &Path) -> Option<TemplateMeta> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Returns the template's metadata, building the template first if it is missing.
/// `progress` receives one line per build step.
/// `recipe` is the template's package list (`None`: forkbox has no recipe for it).
pub async fn ensure(
    pool: &Pool,
    name: &str,
    recipe: Option<&[String]>,
    uid_base: u32,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<TemplateMeta, TemplateError> {
    if let Some(m) = ready(pool, name, uid_base)? {
        return Ok(m);
    }
    let packages = recipe.ok_or_else(|| TemplateError::Unknown(name.into()))?;
    let lock = lock_pool(pool, name).await?;
    // Someone else may have built it while we waited for the lock.
    if let Some(m) = ready(pool, name, uid_base)? {
        drop(lock);
        return Ok(m);
    }
    let res = build(pool, name, packages, uid_base, progress).await;
    drop(lock);
    res
}

fn ready(pool: &Pool, name: &str, uid_base: u32) -> Result<Option<TemplateMeta>, TemplateError> {
    let Some(m) = read_meta(&pool.template_meta(name)) else {
        return Ok(None);
    };
    if !pool.template(name).is_dir() {
        return Ok(None);
    }
    if m.uid_base != uid_base {
        return Err(TemplateError::UidBase {
            name: name.into(),
            found: m.uid_base,
            want: uid_base,
            path: pool.template(name),
        });
    }
    Ok(Some(m))
}

async fn build(
    pool: &Pool,
    name: &str,
    packages: &[String],
    uid_base: u32,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<TemplateMeta, TemplateError> {
    let started = std::time::Instant::now();
    let tmp = pool.root().join("templates").join(format!(".build-{name}"));
    let final_path = pool.template(name);
    // Leftovers of an interrupted build or an old template without metadata.
    for p in [&tmp, &final_path] {
        if p.exists() {
            forkbox_sys::btrfs::delete_subvolume(p)?;
        }
    }
    forkbox_sys::btrfs::create_subvolume(&tmp)?;
    let result = debootstrap(&tmp, name, packages, uid_base, progress).await;
    if let Err(e) = result {
        let _ = forkbox_sys::btrfs::delete_subvolume(&tmp);
        return Err(e);
    }
    let measured = tmp.clone();
    let size_bytes = tokio::task::spawn_blocking(move || tree_size(&measured))
        .await
        .ok();
    std::fs::rename(&tmp, &final_path).map_err(|e| TemplateError::Io(name.into(), e))?;
    forkbox_sys::btrfs::set_readonly(&final_path, true)?;
    let meta = TemplateMeta {
        name: name.into(),
        suite: SUITE.into(),
        packages: packages.to_vec(),
        uid_base,
        built_at: time::OffsetDateTime::now_utc(),
        build_seconds: started.elapsed().as_secs_f64(),
        size_bytes,
        base: None,
        run: Vec::new(),
        env: Default::default(),
        workdir: None,
        image: None,
    };
    write_meta(pool, &meta)?;
    progress(&format!(
        "template {name}: ready in {:.0}s",
        meta.build_seconds
    ));
    Ok(meta)
}

/// Kills the process group of a build tool that is still running when its build is
/// abandoned (a server stopped mid-build, a cancelled request): `kill_on_drop` alone
/// ends mmdebstrap but leaves its apt and dpkg writing into the pool, where the next
/// build of the template finds them.
struct GroupKill(Option<i32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `pre_exec` hook: the build tool is killed when the server that started it dies
/// (SIGKILL included), rather than writing into the pool after it.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: plain prctl and getppid.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died before the prctl: then we were reparented.
        if libc::getppid() == 1 {
            return Err(std::io::Error::other("the server is gone"));
        }
    }
    Ok(())
}

/// Installs Debian `packages` (minbase) with mmdebstrap into the empty directory
/// `root`, then shifts its owners into the sandboxes' uid range.
pub(crate) async fn debootstrap(
    root: &Path,
    name: &str,
    packages: &[String],
    uid_base: u32,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), TemplateError> {
    let tmp = root.to_path_buf();
    {
        progress(&format!(
            "building template {name}: debian {SUITE} + {} packages with mmdebstrap (about a minute)",
            packages.len()
        ));
        use std::os::unix::process::CommandExt;
        let mut cmd = tokio::process::Command::new("mmdebstrap");
        // SAFETY: the hook only makes two async-signal-safe syscalls.
        unsafe {
            cmd.as_std_mut().pre_exec(die_with_parent);
        }
        let mut child = cmd
            .arg("--mode=root")
            .arg("--variant=minbase")
            .args((!packages.is_empty()).then(|| format!("--include={}", packages.join(","))))
            .arg("--aptopt=Acquire::Check-Valid-Until \"false\"")
            .arg("--dpkgopt=path-exclude=/usr/share/man/*")
            .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
            .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
            .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
            .arg(SUITE)
            .arg(&tmp)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // A group of its own: mmdebstrap's apt and dpkg go with it when the build
            // is abandoned (see `GroupKill`).
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(TemplateError::Spawn)?;
        let mut group = GroupKill(child.id().and_then(|p| i32::try_from(p).ok()));
        let mut tail: std::collections::VecDeque<String> = Default::default();
        if let Some(err) = child.stderr.take() {
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(step) = l.strip_prefix("I: ") {
                    progress(&format!("template {name}: {step}"));
                }
                tail.push_back(l);
                if tail.len() > 30 {
                    tail.pop_front();
                }
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| TemplateError::Io(name.into(), e))?;
        // Reaped: its group number may be reused from here on.
        group.0 = None;
        if !status.success() {
            return Err(TemplateError::Build {
                name: name.into(),
                code: status.code(),
                tail: Vec::from(tail).join("\n"),
            });
        }
        progress(&format!(
            "template {name}: shifting owners to uid base {uid_base}"
        ));
        let root = tmp.clone();
        tokio::task::spawn_blocking(move || forkbox_sys::uidshift::shift_tree(&root, uid_base))
            .await
            .map_err(|e| TemplateError::Io(name.into(), std::io::Error::other(e)))??;
        Ok(())
    }
}
