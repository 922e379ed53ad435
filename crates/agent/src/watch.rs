//! `GET /files/watch`: changes under a directory of the sandbox, from inotify, as they
//! happen. The directory is opened inside the root like any file path, then watched
//! through its descriptor (`/proc/self/fd/N`), so a swapped path cannot redirect the
//! watch. A slow reader loses events (and is told how many), never grows memory.

use crate::files::{normalize, open_in_root, FileError};
use bytes::Bytes;
use forkbox_types::agent::WatchEvent;
use nix::fcntl::OFlag;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// Directories watched at most per stream (recursive watches stop adding past it).
const MAX_WATCHES: usize = 4096;

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

struct Watcher {
    ino: Inotify,
    dirs: HashMap<WatchDescriptor, String>,
    recursive: bool,
}

impl Watcher {
    /// Watches `path` (and with `recursive` its subdirectories).
    fn add(&mut self, path: &str) -> Result<(), FileError> {
        if self.dirs.len() >= MAX_WATCHES {
            return Ok(());
        }
        let fd = open_in_root(path, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
        let wd = self
            .ino
            .add_watch(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(), mask())
            .map_err(|errno| FileError::Os {
                path: path.to_owned(),
                errno,
            })?;
        self.dirs.insert(wd, path.to_owned());
        if self.recursive {
            if let Ok(rd) = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        if let Some(name) = e.file_name().to_str() {
                            let _ = self.add(&join(path, name));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn line(ev: &WatchEvent) -> Bytes {
    Bytes::from(forkbox_types::ndjson::line(ev))
}

/// Starts watching; events go to `tx` until it closes.
pub fn start(path: &str, recursive: bool, tx: mpsc::Sender<Bytes>) -> Result<(), FileError> {
    let path = normalize(path)?;
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|errno| {
        FileError::Os {
            path: path.clone(),
            errno,
        }
    })?;
    let mut w = Watcher {
        ino,
        dirs: HashMap::new(),
        recursive,
    };
    w.add(&path)?;
    let raw = w
        .ino
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| FileError::Os {
            path: path.clone(),
            errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
    // SAFETY: `raw` is an OwnedFd (a dup of the inotify fd) moved into the AsyncFd.
    let afd = unsafe { AsyncFd::register(raw) }.map_err(|_| FileError::Os {
        path: path.clone(),
        errno: nix::errno::Errno::EIO,
    })?;
    tokio::spawn(async move {
        let mut dropped = 0u64;
        loop {
            let ready = tokio::select! {
                r = afd.readable() => r,
                _ = tx.closed() => return,
            };
            let Ok(mut guard) = ready else { return };
            let events = match w.ino.read_events() {
                Ok(evs) => evs,
                Err(nix::errno::Errno::EAGAIN) => {
                    guard.clear_ready();
                    continue;
                }
                Err(_) => return,
            };
            let mut out: Vec<WatchEvent> = Vec::new();
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    out.push(WatchEvent {
                        kind: "overflow".into(),
                        path: None,
                        is_dir: false,
                        count: None,
                    });
                    continue;
                }
                let Some(dir) = w.dirs.get(&ev.wd).cloned() else {
                    continue;
                };
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    w.dirs.remove(&ev.wd);
                    continue;
                }
                let Some(name) = ev.name.as_ref().and_then(|n| n.to_str()).map(str::to_owned)
                else {
                    continue;
                };
                let p = join(&dir, &name);
                let is_dir = ev.mask.contains(AddWatchFlags::IN_ISDIR);
                let kind = if ev
                    .mask
                    .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                {
                    if is_dir && w.recursive {
                        let _ = w.add(&p);
                    }
                    "create"
                } else if ev.mask.contains(AddWatchFlags::IN_MODIFY) {
                    "modify"
                } else {
                    "delete"
                };
                // One write often comes as many modify events: report it once per batch.
                if kind == "modify"
                    && out
                        .last()
                        .is_some_and(|l| l.kind == "modify" && l.path.as_deref() == Some(&p))
                {
                    continue;
                }
                out.push(WatchEvent {
                    kind: kind.into(),
                    path: Some(p),
                    is_dir,
                    count: None,
                });
            }
            for ev in out {
                if dropped > 0 {
                    let note = WatchEvent {
                        kind: "dropped".into(),
                        path: None,
                        is_dir: false,
                        count: Some(dropped),
                    };
                    if tx.try_send(line(&note)).is_ok() {
                        dropped = 0;
                    }
                }
                match tx.try_send(line(&ev)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        }
    });
    Ok(())
}
