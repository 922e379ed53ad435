//! Helpers shared by the fuzz targets: splitting input into chunks the way a network
//! would, `arbitrary` mirrors of the wire types (which do not derive `Arbitrary`
//! themselves), and the directory tree the path resolver is fuzzed against.

use arbitrary::Arbitrary;
use forkbox_types::agent::{AgentEvent, ExecRequest, FileOp, WatchEvent};
use forkbox_types::pty::Frame;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Splits `data` into chunks whose sizes (1..=64 bytes) follow a sequence derived from
/// `seed`, so one input exercises many different split points.
pub fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut state = u32::from(seed) | 1;
    let mut rest = data;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 64) as usize + 1;
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

/// A PTY frame.
#[derive(Arbitrary, Debug, Clone)]
pub enum ArbFrame {
    Data(Vec<u8>),
    Resize { rows: u16, cols: u16 },
    Exit(i32),
    Kill,
}

impl From<ArbFrame> for Frame {
    fn from(f: ArbFrame) -> Frame {
        match f {
            ArbFrame::Data(d) => Frame::Data(d),
            ArbFrame::Resize { rows, cols } => Frame::Resize { rows, cols },
            ArbFrame::Exit(c) => Frame::Exit(c),
            ArbFrame::Kill => Frame::Kill,
        }
    }
}

/// An exec event.
#[derive(Arbitrary, Debug, Clone)]
pub enum ArbEvent {
    Stdout(String),
    Stderr(String),
    Exit {
        code: i32,
        signal: Option<i32>,
        timed_out: bool,
        oom_kills: Option<u64>,
    },
    Error(String),
}

impl From<ArbEvent> for AgentEvent {
    fn from(e: ArbEvent) -> AgentEvent {
        match e {
            ArbEvent::Stdout(data) => AgentEvent::Stdout { data },
            ArbEvent::Stderr(data) => AgentEvent::Stderr { data },
            ArbEvent::Exit {
                code,
                signal,
                timed_out,
                oom_kills,
            } => AgentEvent::Exit {
                code,
                signal,
                timed_out,
                oom_kills,
            },
            ArbEvent::Error(message) => AgentEvent::Error { message },
        }
    }
}

/// A file watch event.
#[derive(Arbitrary, Debug, Clone)]
pub struct ArbWatch {
    pub kind: String,
    pub path: Option<String>,
    pub is_dir: bool,
    pub count: Option<u64>,
}

impl From<ArbWatch> for WatchEvent {
    fn from(w: ArbWatch) -> WatchEvent {
        WatchEvent {
            kind: w.kind,
            path: w.path,
            is_dir: w.is_dir,
            count: w.count,
        }
    }
}

/// A file operation request.
#[derive(Arbitrary, Debug, Clone)]
pub enum ArbFileOp {
    Ls(String),
    Stat(String),
    Mkdir(String),
    Rename(String, String),
    Delete(String, bool),
}

impl From<ArbFileOp> for FileOp {
    fn from(o: ArbFileOp) -> FileOp {
        match o {
            ArbFileOp::Ls(path) => FileOp::Ls { path },
            ArbFileOp::Stat(path) => FileOp::Stat { path },
            ArbFileOp::Mkdir(path) => FileOp::Mkdir { path },
            ArbFileOp::Rename(from, to) => FileOp::Rename { from, to },
            ArbFileOp::Delete(path, recursive) => FileOp::Delete { path, recursive },
        }
    }
}

/// An exec request.
#[derive(Arbitrary, Debug, Clone)]
pub struct ArbExec {
    pub cmd: String,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: Option<u64>,
}

impl From<ArbExec> for ExecRequest {
    fn from(e: ArbExec) -> ExecRequest {
        ExecRequest {
            cmd: e.cmd,
            cwd: e.cwd,
            env: e.env,
            timeout_ms: e.timeout_ms,
        }
    }
}

/// A directory tree that tries every way out of itself:
///
/// ```text
/// <base>/outside/secret                 (must never be reached)
/// <base>/root/                          (the root the resolver is given)
///   root/  etc/passwd  tmp/  file  dir/sub/file
///   abs     -> /                        absolute symlink
///   hostetc -> /etc                     absolute symlink to a real host directory
///   up      -> ../../../..              relative symlink climbing out
///   sib     -> ../outside               relative symlink to the sibling
///   hostabs -> <base>/outside           absolute host path of the sibling
///   magic   -> /proc/self/root          a magic link
///   fdlink  -> /proc/self/fd            a directory of magic links
///   loop    -> loop                     a symlink loop
///   dir/sub/back -> ../../..            climbs out from deeper down
/// ```
///
/// Returns the canonical path of `root`. Made once per process.
pub fn escape_tree() -> &'static Path {
    static TREE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TREE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("forkbox-fuzz-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        let outside = base.join("outside");
        for d in [
            root.join("root"),
            root.join("etc"),
            root.join("tmp"),
            root.join("dir/sub"),
            outside.clone(),
        ] {
            std::fs::create_dir_all(&d).expect("make the fuzz tree");
        }
        for (f, body) in [
            (root.join("file"), "inside"),
            (root.join("etc/passwd"), "inside"),
            (root.join("dir/sub/file"), "inside"),
            (outside.join("secret"), "outside"),
        ] {
            std::fs::write(f, body).expect("write the fuzz tree");
        }
        let outside_s = outside.to_string_lossy().into_owned();
        for (target, link) in [
            ("/", "abs"),
            ("/etc", "hostetc"),
            ("../../../..", "up"),
            ("../outside", "sib"),
            (outside_s.as_str(), "hostabs"),
            ("/proc/self/root", "magic"),
            ("/proc/self/fd", "fdlink"),
            ("loop", "loop"),
            ("../../..", "dir/sub/back"),
        ] {
            std::os::unix::fs::symlink(target, root.join(link)).expect("symlink in the fuzz tree");
        }
        root.canonicalize().expect("canonical fuzz root")
    })
}

/// Where an open fd really points (`/proc/self/fd/N`).
pub fn fd_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("readlink of an open fd")
}
