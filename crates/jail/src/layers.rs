//! Layered root filesystems: a sandbox's root is an overlay of its own `upper`
//! directory over read-only layers (`forkbox_sys::overlay`), so sandboxes of one
//! template share its files' page cache and a create or a fork child needs no btrfs
//! snapshot (a snapshot commits a transaction, ~5 ms; a subvolume for the upper
//! directory does not, ~0.05 ms).
//!
//! On the pool:
//! - `sandboxes/<id>/` — a subvolume holding `upper/` (the sandbox's own writes, its
//!   disk limit's subvolume) and `work/` (the overlay's); `sandboxes/<id>.lower` — the
//!   chain of layers under it, topmost first (JSON, [`Lower`]). Without a `.lower`
//!   file, `sandboxes/<id>` is a plain root filesystem (template builds, sandboxes made
//!   before layers).
//! - `layers/<name>` — read-only subvolumes: fork layers (the parent's subvolume
//!   frozen once per fork, its `upper` the layer), named snapshots deleted while
//!   sandboxes still stand on them, templates deleted or rebuilt while in use
//!   (`tpl-<name>-<built ns>`). Swept once nothing names them ([`sweep`]).
//! - `snapshots/<id>` with `snapshots/<id>.lower` — a named snapshot of a layered
//!   sandbox: its subvolume frozen read-only, and the chain under it.
//!
//! The chain files live outside every sandbox's view (beside the subvolume, in the
//! pool's own directories), so no sandbox can name a layer it does not stand on.

use crate::pool::Pool;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One read-only layer under a sandbox's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Lower {
    /// A template as built at `built` (unix ns): `templates/<name>`, or
    /// `layers/tpl-<name>-<built>` once that build was deleted or replaced.
    Template { name: String, built: i64 },
    /// `layers/<id>`, or its `upper` directory.
    Layer { id: String, upper: bool },
    /// A named snapshot: `snapshots/<id>`, or `layers/<id>` once deleted; or its
    /// `upper` directory.
    Snapshot { id: String, upper: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {0}: {1}")]
    Io(String, std::io::Error),
    #[error("the chain of layers in {0} is unreadable: {1}")]
    Chain(PathBuf, serde_json::Error),
    #[error("layer {0:?} is not a plain name")]
    Name(String),
    #[error("layer {0} is gone")]
    Gone(String),
    #[error(transparent)]
    Btrfs(#[from] forkbox_sys::btrfs::BtrfsError),
}

/// A pool directory entry name: no separators, not `.`/`..`, not hidden.
fn plain(name: &str) -> Result<&str, LayerError> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(LayerError::Name(name.to_owned()));
    }
    Ok(name)
}

/// Where a deleted or replaced template build lives on while sandboxes use it.
pub(crate) fn retired_template(name: &str, built: i64) -> String {
    format!("tpl-{name}-{built}")
}

impl Lower {
    /// The host directory of this layer.
    pub(crate) fn path(&self, pool: &Pool) -> Result<PathBuf, LayerError> {
        let layers = pool.layers();
        let (dir, upper) = match self {
            Lower::Template { name, built } => {
                let name = plain(name)?;
                let current = pool.template(name);
                if template_built(pool, name) == Some(*built) && current.is_dir() {
                    (current, false)
                } else {
                    (layers.join(retired_template(name, *built)), false)
                }
            }
            Lower::Layer { id, upper } => (layers.join(plain(id)?), *upper),
            Lower::Snapshot { id, upper } => {
                let named = pool.snapshot(plain(id)?);
                if named.is_dir() {
                    (named, *upper)
                } else {
                    (layers.join(id), *upper)
                }
            }
        };
        let p = if upper { dir.join("upper") } else { dir };
        if !p.is_dir() {
            return Err(LayerError::Gone(p.display().to_string()));
        }
        Ok(p)
    }

    /// The entry of `layers/` this layer may live in (what keeps it from the sweep).
    fn layer_name(&self) -> String {
        match self {
            Lower::Template { name, built } => retired_template(name, *built),
            Lower::Layer { id, .. } | Lower::Snapshot { id, .. } => id.clone(),
        }
    }
}

/// When template `name` was built (unix ns), from its record.
pub(crate) fn template_built(pool: &Pool, name: &str) -> Option<i64> {
    let meta = crate::template::read_meta(&pool.template_meta(name))?;
    i64::try_from(meta.built_at.unix_timestamp_nanos()).ok()
}

/// The chain of a layered sandbox or snapshot (`None`: a plain root filesystem).
pub(crate) fn read_chain(file: &Path) -> Result<Option<Vec<Lower>>, LayerError> {
    match std::fs::read(file) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| LayerError::Chain(file.into(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LayerError::Io(file.display().to_string(), e)),
    }
}

/// Writes a chain file atomically.
pub(crate) fn write_chain(file: &Path, chain: &[Lower]) -> Result<(), LayerError> {
    let io = |e| LayerError::Io(file.display().to_string(), e);
    let tmp = file.with_extension("lower-tmp");
    let bytes = serde_json::to_vec(chain).map_err(|e| LayerError::Chain(file.into(), e))?;
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)
}

/// Makes a layered sandbox's subvolume: `upper/` owned and moded like the top layer's
/// root (the overlay's root directory takes the upper's), and the overlay's `work/`.
pub(crate) fn make_upper(rootfs: &Path, top: &Path) -> Result<(), LayerError> {
    let shown = rootfs.display().to_string();
    let io = |e| LayerError::Io(shown.clone(), e);
    forkbox_sys::btrfs::create_subvolume(rootfs)?;
    let meta = std::fs::metadata(top).map_err(io)?;
    let upper = rootfs.join("upper");
    std::fs::create_dir(&upper).map_err(io)?;
    std::os::unix::fs::chown(&upper, Some(meta.uid()), Some(meta.gid())).map_err(io)?;
    std::fs::set_permissions(
        &upper,
        std::fs::Permissions::from_mode(meta.mode() & 0o7777),
    )
    .map_err(io)?;
    let work = rootfs.join("work");
    std::fs::create_dir(&work).map_err(io)?;
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// Chain files of every layered sandbox and snapshot on the pool (every server's), and
/// of forks being made (`sandboxes/.pending-…lower`). `None` when one cannot be read:
/// then nothing may be taken for unused (failing closed).
fn chains(pool: &Pool) -> Option<Vec<Vec<Lower>>> {
    let mut out = Vec::new();
    for dir in [pool.root().join("sandboxes"), pool.root().join("snapshots")] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "lower") {
                match read_chain(&p) {
                    Ok(Some(c)) => out.push(c),
                    // Gone meanwhile (a sandbox deleted): it names nothing any more.
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "an unreadable chain of layers: no layer is taken for unused");
                        return None;
                    }
                }
            }
        }
    }
    Some(out)
}

/// The `layers/` entries some chain names (`None`: unknown, see [`chains`]).
fn named(pool: &Pool) -> Option<HashSet<String>> {
    Some(
        chains(pool)?
            .iter()
            .flatten()
            .map(Lower::layer_name)
            .collect(),
    )
}

/// One lock for the pool's layers, a file every server on the host opens: exclusive
/// to decide a layer is unused and delete or move it; shared from resolving a new
/// sandbox's layers until its overlay holds them, so no layer is deleted or moved
/// between a create finding it and mounting it (btrfs deletes a subvolume an overlay
/// stands on without a word, and the overlay's view goes with it).
pub(crate) struct PoolLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl PoolLock {
    fn take(pool: &Pool, arg: nix::fcntl::FlockArg) -> Result<PoolLock, LayerError> {
        let path = pool.layers().join(".lock");
        let io = |e| LayerError::Io(path.display().to_string(), e);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        nix::fcntl::Flock::lock(f, arg)
            .map(PoolLock)
            .map_err(|(_, e)| io(e.into()))
    }

    /// Shared: a create resolving and mounting its layers.
    pub(crate) fn shared(pool: &Pool) -> Result<PoolLock, LayerError> {
        PoolLock::take(pool, nix::fcntl::FlockArg::LockShared)
    }

    /// Exclusive: deciding layers are unused, deleting or moving them.
    pub(crate) fn exclusive(pool: &Pool) -> Result<PoolLock, LayerError> {
        PoolLock::take(pool, nix::fcntl::FlockArg::LockExclusive)
    }
}

/// Whether any sandbox or snapshot stands on template `name` as built at `built`
/// (`true` when unknown). Call under [`PoolLock::exclusive`].
pub(crate) fn template_in_use(pool: &Pool, name: &str, built: i64) -> bool {
    named(pool).is_none_or(|n| n.contains(&retired_template(name, built)))
}

/// Whether any sandbox stands on named snapshot `id` (`true` when unknown). Call under
/// [`PoolLock::exclusive`].
pub(crate) fn snapshot_in_use(pool: &Pool, id: &str) -> bool {
    named(pool).is_none_or(|n| n.contains(id))
}

/// Moves a read-only subvolume that sandboxes still stand on into `layers/` as
/// `name`, or deletes it when none does. Call under [`PoolLock::exclusive`].
pub(crate) fn retire(pool: &Pool, path: &Path, name: &str, in_use: bool) -> Result<(), LayerError> {
    if !path.exists() {
        return Ok(());
    }
    if in_use {
        // A read-only subvolume cannot change directory (its `..` would): writable for
        // the move, read-only again after.
        let to = pool.layers().join(plain(name)?);
        forkbox_sys::btrfs::set_readonly(path, false)?;
        let moved = std::fs::rename(path, &to).map_err(|e| LayerError::Io(name.to_owned(), e));
        forkbox_sys::btrfs::set_readonly(if moved.is_ok() { &to } else { path }, true)?;
        return moved;
    }
    crate::resources::delete_subvolume_patiently(path).map_err(LayerError::from)
}

/// After the chain `chain` stopped being named (a sandbox deleted, a snapshot deleted):
/// deletes, off the caller's path, every layer of it in `layers/` that no other chain
/// names (a fork layer once its last child ends, a deleted snapshot once its last
/// sandbox does).
pub(crate) fn drop_unused(pool: Pool, chain: Vec<Lower>) {
    let stood_on: Vec<PathBuf> = chain
        .iter()
        .map(|l| pool.layers().join(l.layer_name()))
        .filter(|p| p.exists())
        .collect();
    if stood_on.is_empty() {
        return;
    }
    let work = move || {
        let Ok(_lock) = PoolLock::exclusive(&pool) else {
            return;
        };
        let Some(named) = named(&pool) else {
            return;
        };
        for p in stood_on {
            let unused = p
                .file_name()
                .is_some_and(|n| !named.contains(n.to_string_lossy().as_ref()));
            if unused {
                if let Err(e) = crate::resources::delete_subvolume_patiently(&p) {
                    tracing::warn!(layer = %p.display(), error = %e, "deleting an unused layer");
                }
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => drop(h.spawn_blocking(work)),
        Err(_) => work(),
    }
}

/// After a sandbox's subvolume at `rootfs` (`<pool>/sandboxes/<id>`) is deleted: its
/// chain file goes, then its layers nothing else stands on ([`drop_unused`]).
pub(crate) fn released(rootfs: &Path) {
    let mut file = rootfs.as_os_str().to_owned();
    file.push(".lower");
    let file = PathBuf::from(file);
    let chain = read_chain(&file).ok().flatten();
    let _ = std::fs::remove_file(&file);
    if let (Some(chain), Some(pool_root)) = (chain, rootfs.parent().and_then(Path::parent)) {
        drop_unused(Pool::attach(pool_root), chain);
    }
}

/// A fork's claim on the layer it is making, named by a chain file of its own
/// (`sandboxes/.pending-<layer>.lower`) from before the snapshot until its children's
/// chains name the layer; removed when dropped. A claim a crash left behind is removed
/// by [`sweep`] once older than [`LAYER_GRACE`].
pub(crate) struct Pending(PathBuf);

impl Pending {
    pub(crate) fn claim(pool: &Pool, layer: &str) -> Result<Pending, LayerError> {
        let file = pool
            .root()
            .join("sandboxes")
            .join(format!(".pending-{}.lower", plain(layer)?));
        write_chain(
            &file,
            &[Lower::Layer {
                id: layer.to_owned(),
                upper: false,
            }],
        )?;
        Ok(Pending(file))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Deletes every layer no chain names (and claims of forks a crash interrupted, older
/// than `grace`); returns how many layers went.
pub(crate) fn sweep(pool: &Pool, grace: Duration) -> usize {
    let Ok(_lock) = PoolLock::exclusive(pool) else {
        return 0;
    };
    if let Ok(rd) = std::fs::read_dir(pool.root().join("sandboxes")) {
        for e in rd.flatten() {
            let stale = e.file_name().to_string_lossy().starts_with(".pending-")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= grace);
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let Ok(rd) = std::fs::read_dir(pool.layers()) else {
        return 0;
    };
    let Some(named) = named(pool) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if named.contains(&name) || name.starts_with('.') {
            continue;
        }
        if crate::resources::delete_subvolume_patiently(&e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// How long a fork's claim on the layer it makes may stand (a crash interrupted it).
pub(crate) const LAYER_GRACE: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_round_trip_and_names_are_plain() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("x.lower");
        assert!(read_chain(&f).unwrap().is_none());
        let c = vec![
            Lower::Layer {
                id: "fork-a-1".into(),
                upper: true,
            },
            Lower::Snapshot {
                id: "snap-1".into(),
                upper: false,
            },
            Lower::Template {
                name: "base".into(),
                built: 17,
            },
        ];
        write_chain(&f, &c).unwrap();
        assert_eq!(read_chain(&f).unwrap().unwrap(), c);
        for bad in ["", "..", ".x", "a/b", "../../etc"] {
            assert!(plain(bad).is_err(), "{bad}");
        }
        std::fs::write(&f, "not json").unwrap();
        assert!(read_chain(&f).is_err());
    }
}
