//! The host ↔ agent protocol.
//!
//! Transport: HTTP/2 (prior knowledge) over one stream socket per sandbox — a Unix
//! socket in the jail runtime, a virtio-serial port in the vm runtime. The agent is
//! the HTTP/2 server; the host opens one connection and multiplexes every call on it.
//!
//! Routes (all bodies JSON):
//! - `GET  /health` → [`Health`]
//! - `POST /exec` with [`ExecRequest`] → a streamed body of NDJSON [`AgentEvent`] lines,
//!   ending with exactly one `exit` event. Dropping the response stream kills the
//!   process tree.
//! - `POST /run_code` with [`RunCodeRequest`] → the same event stream, for a cell run in
//!   the sandbox's persistent REPL kernel of that language. Dropping the stream
//!   interrupts the cell (the kernel and its state stay).
//! - `POST /fork` with [`ForkRequest`] → [`ForkReply`]: the Python kernel (if one runs)
//!   forks one copy per child into that child's namespaces (see `docs/fork-design.md`).
//! - `GET /files/read?path=` → the file's bytes, streamed; `PUT /files/write?path=` with
//!   the bytes streamed as the body → [`WriteReply`] (written to a temporary sibling,
//!   renamed into place at the end; parents created); `POST /files/op` with a
//!   [`FileOp`] → [`FileOpReply`]. Paths resolve inside the sandbox's root only
//!   (relative ones from `/root`).
//!
//! Every refusal (a non-200 answer) has an [`ErrorBody`]: `{"error", "kind"[, "pid"]}`,
//! its status following from its [`Refusal`] kind.
//! - Background commands: `POST /bg/start` ([`ExecRequest`]) → [`BgInfo`];
//!   `GET /bg/list` → `[BgInfo]`; `POST /bg/stdin?pid=&close=` (raw body);
//!   `POST /bg/signal` ([`BgSignal`]); `GET /bg/wait?pid=` → `{"pid", "exit_code"}`;
//!   `GET /bg/output?pid=&follow=` → the kept output then live output, NDJSON events.
//!   404 unknown pid, 409 exited.
//! - `POST /pty?rows=&cols=[&cmd=][&pipe=1]`: an interactive terminal (or, with
//!   `pipe`, a command on plain pipes); request and response bodies are [`crate::pty`]
//!   frames (input and resizes in; output and the exit out).
//! - `GET /files/watch?path=&recursive=` → NDJSON [`WatchEvent`] lines as changes happen.
//! - `POST /hostname` with [`HostnameRequest`]: sets the sandbox's host name (`{}`).
//! - `POST /volumes/release` (`{}`): a vm guest about to be stopped ends every process
//!   and unmounts its volumes (clean file systems for the next user).
//! - `POST /disk/grow` with [`GrowRequest`] (`{}`): a vm guest grows its root file
//!   system to fill its disk.
//! - `POST /egress/listen` (`{}`) and `POST /egress/accept` (streamed both ways): a vm
//!   guest's programs' connections to the proxy address, each carried to the host's
//!   egress proxy (see the agent's `egress.rs`).
//! - `POST /adopt` with [`AdoptRequest`] → [`AdoptReply`]: a fork child's agent reports
//!   whether it received its Python kernel from the parent (or stops waiting for one).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped on every behaviour change of the agent; the host refuses a mismatch.
pub const PROTOCOL_VERSION: u32 = 8;

/// Answer of `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub protocol: u32,
    pub version: String,
    /// The agent's pid as seen inside the sandbox (1 in the jail runtime).
    pub pid: u32,
}

/// Body of `POST /exec`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Shell command line, run with `/bin/sh -c`.
    pub cmd: String,
    /// Working directory inside the sandbox; `/root` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Extra environment, applied over the sandbox's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit in milliseconds; the whole process tree is killed after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// REPL languages, by canonical name.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Javascript,
    Bash,
}

impl Language {
    /// Accepts the canonical names and common aliases.
    pub fn parse(s: &str) -> Option<Language> {
        Some(match s.to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Language::Python,
            "javascript" | "js" | "node" | "nodejs" => Language::Javascript,
            "bash" | "sh" | "shell" => Language::Bash,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Bash => "bash",
        }
    }
}

/// Body of `POST /run_code`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunCodeRequest {
    pub language: Language,
    pub code: String,
    /// The cell is interrupted (state kept) after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One line of the `/exec` response stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AgentEvent {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// The process ended. `code` is the exit status, or 128 + signal number.
    Exit {
        code: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        timed_out: bool,
        /// In a vm guest: how many processes the guest kernel's OOM killer killed while
        /// this ran (`oom_kill` of `/proc/vmstat`). `None` in a jail, whose host counts
        /// its cgroup's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oom_kills: Option<u64>,
    },
    /// The agent could not run the command at all (bad cwd, spawn failure).
    Error {
        message: String,
    },
}

/// What the host tells `forkbox-agent jail-init` (on its stdin, as JSON) about the
/// sandbox to build. The listening socket is inherited as fd 3, the log as fd 2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct JailInit {
    /// Sandbox id; also its hostname.
    pub id: String,
    /// Host path of the sandbox's root filesystem (a btrfs subvolume); with `lowers`,
    /// the subvolume holding the overlay's `upper` and `work` directories.
    pub rootfs: String,
    /// Host paths of the read-only layers the root is an overlay over, topmost first
    /// (empty: `rootfs` is the root itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lowers: Vec<String>,
    /// Host path of the btrfs pool holding `rootfs` and every one of `lowers` (set
    /// with `lowers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// First host uid/gid of the *canonical* range: the ids files are stored with on
    /// disk (ids 0..65536 inside, shifted), whichever range the sandbox runs as.
    pub uid_base: u32,
    /// First host uid/gid of the range this sandbox's processes run as (its own slot,
    /// shared only with its fork family). The root filesystem and volumes are then
    /// idmapped mounts (`uid_base + i` on disk is `host_uid + i` to the sandbox) and
    /// the sandbox's user namespace is owned by `host_uid`. `None` or equal to
    /// `uid_base`: the sandbox runs as the canonical range itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_uid: Option<u32>,
    /// `cgroup.procs` files the sandbox's first process must be written into.
    pub cgroup_procs: Vec<String>,
    /// Environment every command in the sandbox starts with.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Fork child: host pid of the parent sandbox's agent. The child's user and PID
    /// namespaces are then created inside the parent's, so that the parent's REPL
    /// process may join them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_of: Option<i32>,
    /// Fork child: the secret the parent's REPL copy presents to be adopted as this
    /// sandbox's Python kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt_token: Option<String>,
    /// Fork child: its family's helper mount namespace (`jail-helper`) is passed on
    /// fd 63, entered instead of making one per child.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub helper_ns: bool,
    /// Host directories bind-mounted into the sandbox (volumes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<BindMount>,
    /// Size limit of the sandbox's /tmp, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_size: Option<u64>,
    /// The dead-man's switch: the sandbox ends itself after this many seconds without
    /// a server connection (`None`: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orphan_grace_s: Option<u64>,
}

/// What the vm runtime's guest agent starts with: the host writes it into the guest's
/// initramfs (`/forkbox/init.json`), the guest init copies it beside the agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInit {
    /// Sandbox id; also the guest's hostname.
    pub id: String,
    /// Environment every command in the sandbox starts with.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Name of the virtio-serial port the agent serves the protocol on.
    pub port: String,
    /// As [`JailInit::orphan_grace_s`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orphan_grace_s: Option<u64>,
    /// Volumes to mount: block devices found by serial number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VmVolume>,
}

/// A volume of a vm guest: the virtio-blk device with serial number `serial` (an ext4
/// file system), mounted at `mount`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmVolume {
    pub serial: String,
    pub mount: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A host directory mounted at `target` (absolute, inside the sandbox).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BindMount {
    pub source: String,
    pub target: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A filesystem operation other than reading or writing content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum FileOp {
    /// Entries of a directory, sorted by name.
    Ls {
        path: String,
    },
    Stat {
        path: String,
    },
    /// Creates the directory and any missing parents (`mkdir -p`).
    Mkdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    /// Removes a file, symlink or empty directory; with `recursive`, a whole tree
    /// (symlinks are removed, never followed).
    Delete {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One file's metadata.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    /// Absolute path inside the sandbox.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (e.g. 0o644 = 420).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Answer of `POST /files/op`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum FileOpReply {
    Entries { entries: Vec<FileInfo> },
    Info(FileInfo),
    Done { ok: bool },
}

/// Answer of `PUT /files/write`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriteReply {
    pub path: String,
    pub size: u64,
}

/// A background command (`POST /bg/start` and friends).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BgInfo {
    /// Pid inside the sandbox.
    pub pid: i32,
    pub cmd: String,
    /// Start time, milliseconds since the epoch.
    pub started_ms: u64,
    /// `None` while it runs.
    pub exit_code: Option<i32>,
}

/// One line of `GET /files/watch`: a change under the watched directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchEvent {
    /// `create`, `modify`, `delete`; `overflow` (the kernel's queue overflowed, some
    /// changes were lost) or `dropped` (`count` events dropped for a slow reader).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_dir: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// Query of `POST /pty` (the body and the answer are [`crate::pty`] frames).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PtyRequest {
    /// Shell command line; an interactive login shell when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    pub rows: u16,
    pub cols: u16,
    /// Working directory (`/root` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Variables added to the sandbox's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Pipes instead of a terminal: the command's stdin and stdout carry the data
    /// frames byte for byte (a language server's JSON-RPC), its stderr is discarded, the
    /// end of the input closes its stdin, and resizes are ignored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pipe: bool,
}

/// What kind of refusal an agent's non-200 answer is: the agent decides it where it
/// knows the cause, the host acts on it (never on the message or the bare status).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The request itself is wrong (a missing cwd, NUL in a command, a bad port).
    Invalid,
    /// No such background command (its pid is in [`ErrorBody::pid`]).
    NoProcess,
    /// The sandbox's current situation forbids it (a command that exited, stdin closed).
    Conflict,
    /// A file path or file argument is invalid.
    FileInvalid,
    /// No such file or directory.
    FileNotFound,
    /// Wrong kind of file (a directory where a file was wanted, a non-empty directory).
    FileConflict,
    /// Permission denied, or a read-only file system.
    FileDenied,
    /// The sandbox's disk (or quota) is full.
    NoSpace,
    /// Nothing accepts connections on that port.
    PortClosed,
    /// The agent failed at something that is not the request's fault.
    Failed,
}

impl Refusal {
    /// The HTTP status the agent answers this refusal with.
    pub fn status(self) -> u16 {
        match self {
            Refusal::Invalid | Refusal::FileInvalid => 400,
            Refusal::FileDenied => 403,
            Refusal::NoProcess | Refusal::FileNotFound => 404,
            Refusal::Conflict | Refusal::FileConflict => 409,
            Refusal::Failed => 500,
            Refusal::PortClosed => 502,
            Refusal::NoSpace => 507,
        }
    }

    /// The kind a bare status stands for, for an answer without a kind (not from a
    /// forkbox agent: a proxy in between, a malformed body).
    pub fn from_status(status: u16) -> Refusal {
        match status {
            400 | 422 => Refusal::Invalid,
            409 => Refusal::Conflict,
            502 => Refusal::PortClosed,
            507 => Refusal::NoSpace,
            _ => Refusal::Failed,
        }
    }
}

/// The body of every refusal of the agent (a non-200 answer): a message for people,
/// its kind and, where the host acts on it, the subject as data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    /// What kind of refusal; absent only in answers not from a forkbox agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Refusal>,
    /// The background command a [`Refusal::NoProcess`] is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
}

/// A TCP port something listens on in a sandbox (`GET /ports`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListeningPort {
    pub port: u16,
    /// The address it is bound to (`0.0.0.0`, `127.0.0.1`, `::`, …).
    pub address: String,
}

/// Body of `POST /disk/grow`: grow once the disk is at least `bytes` (the host just
/// grew it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrowRequest {
    #[serde(default)]
    pub bytes: u64,
}

/// Body of `POST /hostname`: the sandbox's new host name (a vm fork child, or a vm
/// restored from an image, is someone else's memory, hostname included, until the
/// host gives it its own) and, when given, its environment (replacing the one it
/// started with; the language kernels running are ended, so the next cell starts one
/// with it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostnameRequest {
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Fresh random bytes (hex) the guest's kernel mixes in and reseeds from: a copy of
    /// another guest's memory has that guest's random state too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy_hex: Option<String>,
    /// The host's clock (nanoseconds since the epoch): a copy's clock resumes at the
    /// time it was captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now_unix_ns: Option<u64>,
}

/// Body of `POST /bg/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BgSignal {
    pub pid: i32,
    pub signal: i32,
}

/// One fork child, as the parent's agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForkChild {
    /// Pid of the child's agent in the parent sandbox's PID namespace.
    pub pid: i32,
    /// The child's adopt token.
    pub token: String,
}

/// Body of `POST /fork`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForkRequest {
    pub children: Vec<ForkChild>,
}

/// Answer of `POST /fork`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForkReply {
    /// True when a Python kernel was running and was forked into every child.
    pub python: bool,
    /// Per child (same order), why its copy failed; empty strings for success.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// Body of `POST /adopt`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdoptRequest {
    /// False: no kernel is coming, stop waiting.
    pub expect: bool,
}

/// Answer of `POST /adopt`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdoptReply {
    /// Pid (in the child's namespace) of the adopted Python kernel.
    pub pid: Option<i32>,
}

/// What `jail-init` prints on its stdout once the sandbox is up (or could not be made).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JailInitReply {
    /// Host pid of the sandbox's PID 1 (the agent).
    Ready {
        pid: i32,
    },
    Failed {
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_with_a_type_tag() {
        let ev = AgentEvent::Exit {
            code: 3,
            signal: None,
            timed_out: false,
            oom_kills: None,
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert_eq!(line, r#"{"type":"exit","code":3}"#);
        assert_eq!(serde_json::from_str::<AgentEvent>(&line).unwrap(), ev);
        let out: AgentEvent = serde_json::from_str(r#"{"type":"stdout","data":"hi\n"}"#).unwrap();
        assert_eq!(
            out,
            AgentEvent::Stdout {
                data: "hi\n".into()
            }
        );
    }

    #[test]
    fn exec_request_defaults() {
        let r: ExecRequest = serde_json::from_str(r#"{"cmd":"echo hi"}"#).unwrap();
        assert_eq!(r.cmd, "echo hi");
        assert!(r.cwd.is_none() && r.env.is_empty() && r.timeout_ms.is_none());
    }
}
