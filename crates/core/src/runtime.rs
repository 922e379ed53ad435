//! The interface every runtime (jail, vm) implements. Runtimes never see HTTP; they get
//! typed specs and return instances that speak the agent protocol's events.

use async_trait::async_trait;
use bytes::Bytes;
use forkbox_types::agent::{
    AgentEvent, BgInfo, ExecRequest, FileOp, FileOpReply, ListeningPort, PtyRequest, Refusal,
    RunCodeRequest, WatchEvent, WriteReply,
};
use futures_util::stream::BoxStream;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything a runtime needs to make one sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSpec {
    pub id: String,
    pub template: String,
    /// CPU bandwidth in millicores.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Most bytes of its own the sandbox's filesystem may hold (beyond its template's).
    pub disk_bytes: u64,
    pub pids_max: u64,
    pub env: BTreeMap<String, String>,
    /// Start from this named snapshot's filesystem instead of the template's.
    pub snapshot: Option<String>,
    /// Give the sandbox a link to an egress proxy admitting these host names
    /// (`forkbox_types::egress`); `None`: loopback only.
    pub egress: Option<Vec<String>>,
    /// Volumes to mount.
    pub volumes: Vec<crate::model::VolumeMount>,
}

/// A built template.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateInfo {
    pub name: String,
    /// Bytes of its files, when measured at build time.
    pub size_bytes: Option<u64>,
    pub packages: Vec<String>,
    pub built_at: time::OffsetDateTime,
    /// Where it lives on the host.
    pub path: String,
    /// The template it was layered on (`None`: built from Debian packages).
    pub base: Option<String>,
    /// Commands run in its build sandbox, in order.
    pub run: Vec<String>,
    /// Environment its sandboxes start with (under their own `env`).
    pub env: BTreeMap<String, String>,
    /// Working directory its build commands ran in, and its sandboxes' commands start
    /// in (when they name none).
    pub workdir: Option<String>,
    /// Seconds the build took.
    pub build_seconds: f64,
    /// The OCI image it was imported from.
    pub image: Option<forkbox_types::api::ImageInfo>,
}

/// Where an imported template's OCI image comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// An archive received whole.
    Archive(ImageArchive),
    /// An image in a registry, pulled by the runtime (`reference` as
    /// `forkbox_oci::registry::Reference` reads it).
    Registry {
        reference: String,
        auth: Option<forkbox_types::api::RegistryAuth>,
    },
}

/// An OCI image archive (an OCI layout or a `docker save` tar) received for a template
/// import, in a file of the runtime's ([`HostStores::upload_dir`]); the file goes when
/// the last holder drops it.
#[derive(Debug, PartialEq, Eq)]
pub struct ImageArchive {
    pub path: PathBuf,
    /// Which image of the archive (its name or tag); `None`: the only one.
    pub reference: Option<String>,
}

impl Drop for ImageArchive {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What to build as a template (see [`HostStores::build_template`]).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct TemplateSpec {
    pub name: String,
    /// Template to layer on (a copy of its filesystem); `None`: Debian from scratch.
    pub base: Option<String>,
    /// Debian packages to install.
    pub packages: Vec<String>,
    /// Shell commands run in order inside a build sandbox; the first failure fails it.
    pub run: Vec<String>,
    /// Environment of the commands, recorded for the template's sandboxes.
    pub env: BTreeMap<String, String>,
    /// Working directory of the commands (default `/root`).
    pub workdir: Option<String>,
    /// Host names the build sandbox may reach through its egress proxy; `None`: no
    /// network for the commands.
    pub egress: Option<Vec<String>>,
    /// A build context (a tar the commands take files from, a Dockerfile's `COPY`),
    /// put at `forkbox_types::api::BUILD_CONTEXT_TAR` in the build sandbox for the commands
    /// and removed after them. Not part of the recorded recipe: such a template is
    /// built on the node that received it only.
    #[serde(skip)]
    pub context: Option<std::sync::Arc<Vec<u8>>>,
    /// Build arguments (a Dockerfile's `ARG`s): the commands' environment besides
    /// `env`, kept neither in the template nor in its recorded recipe (such a template
    /// is built on the node that received it only).
    #[serde(skip)]
    pub args: BTreeMap<String, String>,
    /// Keep each command's result for later builds and start from the longest kept
    /// run (a Dockerfile's build cache); off, every command runs (a `run` list).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_steps: bool,
    /// An OCI image to start from instead of `base` (its layers, then its `Env` and
    /// `WorkingDir` under `env` and `workdir`). Not part of the recorded recipe (a
    /// registry's credentials are never written down).
    #[serde(skip)]
    pub image: Option<Arc<ImageSource>>,
}

/// Receives one line per build step or line of build output.
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// The cause of an agent or host failure.
pub type Source = Box<dyn std::error::Error + Send + Sync>;

/// Runtime failures, by what the API should answer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("template {0} does not exist")]
    UnknownTemplate(String),
    /// The request was refused as invalid by the runtime or agent (e.g. a missing cwd).
    #[error("{0}")]
    Rejected(String),
    /// The sandbox's current situation forbids it (e.g. hibernating a fork parent).
    #[error("{0}")]
    Conflict(String),
    /// The sandbox's agent does not answer.
    #[error("agent of sandbox {id} does not answer: {source}")]
    Agent { id: String, source: Source },
    /// No background command with this pid.
    #[error("no background command with pid {0}")]
    NoProcess(i32),
    /// Nothing accepts connections on that port in the sandbox.
    #[error("{0}")]
    PortClosed(String),
    /// A file operation inside the sandbox failed.
    #[error("{message}")]
    File {
        kind: FileErrorKind,
        message: String,
    },
    /// The host has no room or the runtime cannot work right now.
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
    /// This runtime does not do that at all (a permanent gap, not a passing failure).
    #[error("{0}")]
    Unsupported(String),
    /// Anything else that went wrong on the host while doing `op`.
    #[error("{op} failed for {id}: {source}")]
    Host {
        op: &'static str,
        id: String,
        source: Source,
    },
}

impl RuntimeError {
    /// Sandbox `id`'s agent refused call `op`: what it means follows from the kind the
    /// agent gave (never from the message, which is for people), the subject (`pid`)
    /// from the data it sent.
    pub fn refused(
        id: &str,
        op: &'static str,
        kind: Refusal,
        message: String,
        pid: Option<i32>,
    ) -> RuntimeError {
        let file = |kind| RuntimeError::File {
            kind,
            message: message.clone(),
        };
        match kind {
            Refusal::Invalid => RuntimeError::Rejected(message),
            Refusal::NoProcess => RuntimeError::NoProcess(pid.unwrap_or(0)),
            Refusal::Conflict => RuntimeError::Conflict(message),
            Refusal::FileInvalid => file(FileErrorKind::Invalid),
            Refusal::FileNotFound => file(FileErrorKind::NotFound),
            Refusal::FileConflict => file(FileErrorKind::Conflict),
            Refusal::FileDenied => file(FileErrorKind::Denied),
            Refusal::NoSpace => file(FileErrorKind::NoSpace),
            Refusal::PortClosed => RuntimeError::PortClosed(message),
            Refusal::Failed => RuntimeError::host(op, id, std::io::Error::other(message)),
        }
    }
}

/// A stream from sandbox `id`'s agent, its errors as [`RuntimeError::Agent`].
pub fn agent_stream<T: Send + 'static, E: Into<Source> + 'static>(
    id: &str,
    stream: impl futures_util::Stream<Item = Result<T, E>> + Send + 'static,
) -> BoxStream<'static, Result<T, RuntimeError>> {
    use futures_util::StreamExt as _;
    let id = id.to_owned();
    stream
        .map(move |r| {
            r.map_err(|e| RuntimeError::Agent {
                id: id.clone(),
                source: e.into(),
            })
        })
        .boxed()
}

/// Why a file operation failed, by what the client should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileErrorKind {
    /// Bad path or arguments.
    Invalid,
    NotFound,
    /// Wrong kind of file (a directory where a file was wanted, a non-empty directory).
    Conflict,
    Denied,
    NoSpace,
}

/// A file's bytes as they come.
pub type ByteStream = BoxStream<'static, Result<Bytes, RuntimeError>>;

/// File changes as they happen.
pub type WatchEvents = BoxStream<'static, Result<WatchEvent, RuntimeError>>;

/// Bytes to write; an error aborts the write and leaves no partial file.
pub type UploadStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

fn unsupported() -> RuntimeError {
    RuntimeError::Unsupported("this runtime has no background commands".into())
}

impl RuntimeError {
    pub fn host(op: &'static str, id: &str, source: impl Into<Source>) -> RuntimeError {
        RuntimeError::Host {
            op,
            id: id.to_owned(),
            source: source.into(),
        }
    }
}

/// What a garbage collection found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Leftover sandboxes whose processes, cgroup, filesystem or run dir were freed.
    pub freed: usize,
    /// Leftovers kept because live sandboxes depend on them (hollow fork ancestors).
    pub kept: usize,
    /// Staging snapshots of interrupted forks and layers nothing stands on, deleted.
    pub staging: usize,
}

/// What a fork made.
pub struct Forked {
    /// One running instance per requested child, in order.
    pub children: Vec<Arc<dyn Instance>>,
    /// What the children inherited from the parent, e.g. `filesystem`, `python`.
    pub carried: Vec<String>,
    /// What they did not, in words (for the API's answer).
    pub not_carried: String,
}

/// What a runtime keeps, where the API's answers and events must say so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Hibernate keeps memory and processes (wake resumes them); else files only.
    pub hibernate_keeps_memory: bool,
    /// Its named snapshots are its own (whole guests, deleted with
    /// [`Runtime::forget_snapshot`]), not files in the host's stores.
    pub own_snapshots: bool,
    /// It attaches volumes as block devices (their images), not as the host's
    /// mounts: see [`HostStores::detach_volume`].
    pub volumes_as_devices: bool,
}

/// The events of one exec, as the agent reports them.
pub type AgentEvents = BoxStream<'static, Result<AgentEvent, RuntimeError>>;

/// A sandbox factory: makes, wakes, adopts and cleans up after sandboxes of one kind.
/// The stores they are made from are [`HostStores`].
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Short name (`jail`, `vm`).
    fn name(&self) -> &'static str;

    /// What it keeps (see [`Capabilities`]); nothing beyond files unless it says so.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// The accelerator its sandboxes run on, for runtimes that have one (the vm's
    /// `kvm` or `tcg`; `probing` while it is being decided).
    fn accelerator(&self) -> Option<&'static str> {
        None
    }

    /// Makes sure `template` exists, building it if this runtime can.
    async fn prepare_template(&self, template: &str) -> Result<(), RuntimeError>;

    /// Creates a running sandbox whose agent answers.
    async fn create(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError>;

    /// Starts a hibernated sandbox again on its kept filesystem (`spec.id` is its
    /// runtime resource id). Memory is not restored in the jail runtime.
    async fn wake(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError> {
        let _ = spec;
        Err(RuntimeError::Unsupported(
            "this runtime cannot wake sandboxes".into(),
        ))
    }

    /// Takes over a sandbox an earlier server left running (`spec.id` is its runtime
    /// resource id, `host_pid` its first process as recorded; `paused`: it is frozen,
    /// so its agent cannot answer until resumed).
    async fn adopt(
        &self,
        spec: &CreateSpec,
        host_pid: i32,
        paused: bool,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        let _ = (spec, host_pid, paused);
        Err(RuntimeError::Unsupported(
            "this runtime cannot adopt sandboxes".into(),
        ))
    }

    /// Frees leftovers of `candidates` (runtime resource ids this server made, whose
    /// sandboxes ended) and of anything else this runtime knows it made, except `keep`.
    /// Leftovers that live sandboxes still depend on are taken back under management
    /// instead. Call after every live sandbox was adopted.
    async fn collect_garbage(
        &self,
        keep: &std::collections::HashSet<String>,
        candidates: Vec<String>,
    ) -> Result<GcReport, RuntimeError> {
        let _ = (keep, candidates);
        Ok(GcReport::default())
    }

    /// Frees whatever host resources sandbox `id` may have left behind (processes,
    /// cgroups, file systems) when no instance of it is held, e.g. after a crash.
    async fn cleanup(&self, id: &str) -> Result<(), RuntimeError>;

    /// Deletes named snapshot `snapshot` (runtimes whose snapshots are their own:
    /// [`Capabilities::own_snapshots`]).
    async fn forget_snapshot(&self, snapshot: &str) -> Result<(), RuntimeError> {
        let _ = snapshot;
        Ok(())
    }

    /// Frees what the runtime holds on the host for all its sandboxes together
    /// (network namespaces, mounts), once none runs; one line per thing freed.
    async fn release_host(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
}

/// The host's stores beside the sandboxes: templates, volumes and named snapshots.
/// One runtime keeps them (the jail runtime, on its btrfs pool); every runtime's
/// sandboxes are made from them.
#[async_trait]
pub trait HostStores: Send + Sync + 'static {
    /// What is known of a built template; `None` when it is not built.
    async fn template_info(&self, template: &str) -> Option<TemplateInfo>;

    /// Every built template.
    async fn templates(&self) -> Vec<TemplateInfo>;

    /// Builds a template; on failure nothing of it is left behind.
    async fn build_template(
        &self,
        spec: &TemplateSpec,
        progress: Progress,
    ) -> Result<TemplateInfo, RuntimeError>;

    /// Where an image archive for a template import is received (a directory of the
    /// runtime's, on the storage the template will be on); `None`: this runtime does
    /// not import images.
    fn upload_dir(&self) -> Option<PathBuf> {
        None
    }

    /// The kept build log of a built template.
    async fn template_log(&self, template: &str) -> Option<String>;

    /// Deletes a built template (sandboxes made from it keep their own copy).
    async fn delete_template(&self, template: &str) -> Result<(), RuntimeError>;

    /// Makes the storage of volume `id` with room for `size_mb` MiB.
    async fn create_volume(&self, id: &str, size_mb: u64) -> Result<(), RuntimeError>;

    /// Frees the storage of volume `id` (no sandbox mounts it any more).
    async fn delete_volume(&self, id: &str) -> Result<(), RuntimeError>;

    /// Bytes used in volume `id`, when known.
    async fn volume_used(&self, id: &str) -> Option<u64>;

    /// Hands volume `id` to a runtime that attaches volumes as block devices
    /// ([`Capabilities::volumes_as_devices`]): off the host's own mounts, and, if the
    /// guest may write it (`writable`), never mounted by the host again; its image.
    async fn detach_volume(&self, id: &str, writable: bool) -> Result<PathBuf, RuntimeError>;

    /// Deletes a named snapshot's filesystem.
    async fn delete_snapshot(&self, snapshot: &str) -> Result<(), RuntimeError>;
}

/// One live sandbox of a runtime.
#[async_trait]
pub trait Instance: Send + Sync + 'static {
    /// Host pid of the sandbox's first process, when it has one.
    fn host_pid(&self) -> Option<i32>;

    /// False once the sandbox's agent has died.
    fn is_alive(&self) -> bool;

    /// How many of the sandbox's processes the OOM killer has killed so far.
    fn oom_kills(&self) -> u64;

    /// Runs a command; the stream ends after its `exit` event.
    async fn exec(&self, req: ExecRequest) -> Result<AgentEvents, RuntimeError>;

    /// Runs a cell in the sandbox's persistent REPL kernel for its language.
    async fn run_code(&self, req: RunCodeRequest) -> Result<AgentEvents, RuntimeError>;

    /// Freezes every process of the sandbox (memory kept).
    async fn pause(&self) -> Result<(), RuntimeError>;

    /// Thaws a paused sandbox.
    async fn resume(&self) -> Result<(), RuntimeError>;

    /// The sandbox's own log (its agent's messages), as lines: the last 64 KiB, then
    /// with `follow` new lines while the sandbox lives.
    async fn logs(&self, follow: bool) -> Result<BoxStream<'static, String>, RuntimeError> {
        let _ = follow;
        Err(RuntimeError::Unsupported(
            "this runtime keeps no logs".into(),
        ))
    }

    /// Changes under a directory of the sandbox, as they happen.
    async fn watch(&self, path: &str, recursive: bool) -> Result<WatchEvents, RuntimeError> {
        let _ = (path, recursive);
        Err(RuntimeError::Unsupported(
            "this runtime cannot watch files".into(),
        ))
    }

    /// An interactive terminal: `input` and the answer are `forkbox_types::pty` frames.
    async fn pty(&self, req: PtyRequest, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        let _ = (req, input);
        Err(RuntimeError::Unsupported(
            "this runtime has no terminals".into(),
        ))
    }

    /// A connection to TCP `port` on the sandbox's own loopback: `input` is sent, the
    /// answer is what comes back.
    async fn tcp(&self, port: u16, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        let _ = (port, input);
        Err(RuntimeError::Unsupported(
            "this runtime cannot reach ports in its sandboxes".into(),
        ))
    }

    /// The TCP ports something listens on in the sandbox.
    async fn ports(&self) -> Result<Vec<ListeningPort>, RuntimeError> {
        Err(RuntimeError::Unsupported(
            "this runtime cannot list ports in its sandboxes".into(),
        ))
    }

    /// Starts a command without waiting for it.
    async fn bg_start(&self, req: ExecRequest) -> Result<BgInfo, RuntimeError> {
        let _ = req;
        Err(unsupported())
    }

    /// The sandbox's background commands.
    async fn bg_list(&self) -> Result<Vec<BgInfo>, RuntimeError> {
        Err(unsupported())
    }

    /// Writes to a background command's stdin (`close`: then end it).
    async fn bg_stdin(&self, pid: i32, data: Bytes, close: bool) -> Result<(), RuntimeError> {
        let _ = (pid, data, close);
        Err(unsupported())
    }

    /// Signals a background command's process group.
    async fn bg_signal(&self, pid: i32, signal: i32) -> Result<(), RuntimeError> {
        let _ = (pid, signal);
        Err(unsupported())
    }

    /// Waits for a background command; its exit code.
    async fn bg_wait(&self, pid: i32) -> Result<i32, RuntimeError> {
        let _ = pid;
        Err(unsupported())
    }

    /// A background command's kept output, then (`follow`) its live output.
    async fn bg_output(&self, pid: i32, follow: bool) -> Result<AgentEvents, RuntimeError> {
        let _ = (pid, follow);
        Err(unsupported())
    }

    /// A metadata operation on the sandbox's files.
    async fn file_op(&self, op: FileOp) -> Result<FileOpReply, RuntimeError> {
        let _ = op;
        Err(RuntimeError::Unsupported(
            "this runtime has no file access".into(),
        ))
    }

    /// Reads a file: its size when known and its bytes.
    async fn read_file(&self, path: &str) -> Result<(Option<u64>, ByteStream), RuntimeError> {
        let _ = path;
        Err(RuntimeError::Unsupported(
            "this runtime has no file access".into(),
        ))
    }

    /// Writes a file atomically (parents created) from `data`.
    async fn write_file(&self, path: &str, data: UploadStream) -> Result<WriteReply, RuntimeError> {
        let _ = (path, data);
        Err(RuntimeError::Unsupported(
            "this runtime has no file access".into(),
        ))
    }

    /// Makes one running child per spec, each starting from this sandbox's current
    /// state (see the runtime's docs for what is carried).
    async fn fork(&self, children: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        let _ = children;
        Err(RuntimeError::Unsupported(
            "this runtime cannot fork sandboxes".into(),
        ))
    }

    /// Stops every process and frees every host resource except the filesystem, which
    /// [`Runtime::wake`] starts from again.
    async fn hibernate(&self) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(
            "this runtime cannot hibernate".into(),
        ))
    }

    /// Copies the root filesystem, read-only, as named snapshot `snapshot`; `freeze`:
    /// stop the processes meanwhile so the copy is consistent.
    async fn snapshot(&self, snapshot: &str, freeze: bool) -> Result<(), RuntimeError> {
        let _ = (snapshot, freeze);
        Err(RuntimeError::Unsupported(
            "this runtime has no snapshots".into(),
        ))
    }

    /// Kills everything and frees every host resource. Idempotent.
    async fn destroy(&self) -> Result<(), RuntimeError>;
}

/// Longest line a log reader keeps whole; a longer one goes out cut at this size.
pub const MAX_LOG_LINE: usize = 64 * 1024;

/// The line a log reader puts where it lost lines: it fell a whole file behind a log
/// that is kept to a size (see [`tail_lines`]).
pub const LOG_LINES_LOST: &str = "[lines lost: the log moved on faster than it was read]";

/// The lines of log file `path`: its last 64 KiB (a line cut by that window skipped),
/// then, with `follow`, lines as they are appended while `alive` holds. A log kept to a
/// size is followed across its renames: its full file is renamed `<path>.1` and a new
/// one takes the name (the vm console, `forkbox-vm`'s `console.rs`). A short log's
/// window begins in its `.1`; when `path` names a new file, the old one is read to its
/// end and the new one from its start; a reader that fell a whole file behind says so
/// with [`LOG_LINES_LOST`]. Lines longer than [`MAX_LOG_LINE`] are cut.
pub fn tail_lines(
    path: &std::path::Path,
    follow: bool,
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<BoxStream<'static, String>> {
    use futures_util::StreamExt as _;
    use std::io::{Seek, SeekFrom};
    const WINDOW: u64 = 64 * 1024;
    let path = path.to_path_buf();
    let mut f = std::fs::File::open(&path)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let before = (len < WINDOW)
        .then(|| std::fs::File::open(rotated_log(&path)).ok())
        .flatten();
    let (start, successor) = match before {
        Some(mut b) => {
            let start = b
                .metadata()
                .map(|m| m.len())
                .unwrap_or(0)
                .saturating_sub(WINDOW - len);
            b.seek(SeekFrom::Start(start))?;
            let next = f.metadata().ok().map(file_id);
            f = b;
            (start, next)
        }
        None => {
            let start = len.saturating_sub(WINDOW);
            f.seek(SeekFrom::Start(start))?;
            (start, None)
        }
    };
    let reader = LogReader {
        path,
        f,
        successor,
        partial: Vec::new(),
        taken: 0,
        ready: Default::default(),
        skip_first: start > 0,
    };
    Ok(futures_util::stream::unfold(reader, move |mut r| {
        let alive = alive.clone();
        async move { r.next_line(follow, &alive).await.map(|l| (l, r)) }
    })
    .boxed())
}

/// Where a log kept to a size keeps its full file: `<path>.1`.
pub fn rotated_log(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    name.into()
}

/// A file's device and inode.
fn file_id(m: std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (m.dev(), m.ino())
}

/// The state of one [`tail_lines`] reader.
struct LogReader {
    path: std::path::PathBuf,
    f: std::fs::File,
    /// The file that comes after `f` when `f` was opened as `<path>.1` (what `path`
    /// named then); `None` when `f` was opened as `path` (its successor is whatever
    /// takes `path` when it is renamed `.1`).
    successor: Option<(u64, u64)>,
    /// Bytes read past the last whole line, from `taken` on (at most
    /// [`MAX_LOG_LINE`] and a read).
    partial: Vec<u8>,
    taken: usize,
    ready: std::collections::VecDeque<String>,
    /// The first line is cut by the window: not shown.
    skip_first: bool,
}

impl LogReader {
    async fn next_line(
        &mut self,
        follow: bool,
        alive: &std::sync::atomic::AtomicBool,
    ) -> Option<String> {
        use std::io::Read as _;
        loop {
            if let Some(l) = self.ready.pop_front() {
                return Some(l);
            }
            if self.split() {
                continue;
            }
            // Once per read, what was taken goes (not once per line).
            self.partial.drain(..self.taken);
            self.taken = 0;
            let mut buf = vec![0u8; 16 * 1024];
            let n = match self.f.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if n > 0 {
                self.partial.extend_from_slice(&buf[..n]);
                continue;
            }
            if self.switch() {
                continue;
            }
            if !follow || !alive.load(std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Moves one line (or a cut piece of a long one) from `partial` to `ready`; false
    /// when there is none yet.
    fn split(&mut self) -> bool {
        let rest = &self.partial[self.taken..];
        let (mut line, used) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], i + 1),
            None if rest.len() >= MAX_LOG_LINE => (&rest[..MAX_LOG_LINE], MAX_LOG_LINE),
            None => return false,
        };
        let whole = used == line.len() + 1;
        if whole {
            line = line.strip_suffix(b"\r").unwrap_or(line); // a console's lines end in CR LF
        }
        let text = String::from_utf8_lossy(line).into_owned();
        self.taken += used;
        if self.skip_first {
            // Cut in the middle by the window (a cut piece: still that line).
            self.skip_first = !whole;
            return true;
        }
        self.ready.push_back(text);
        true
    }

    /// When `path` names another file than the one being read: the rest of the old
    /// one, then the file after it — `path`, or `<path>.1` when the reader began in
    /// `.1` and the file that followed has been renamed there since. A reader a whole
    /// file behind says it lost lines. False when there is nothing to switch to.
    fn switch(&mut self) -> bool {
        use std::io::Read as _;
        let (Ok(now), Ok(ours)) = (std::fs::metadata(&self.path), self.f.metadata()) else {
            return false;
        };
        let (now, ours) = (file_id(now), file_id(ours));
        if now == ours {
            return false;
        }
        let before_path = rotated_log(&self.path);
        let before = std::fs::metadata(&before_path).ok().map(file_id);
        // (whether the next file is `.1`, whether a whole file went by unread)
        let (in_before, lost) = match self.successor {
            Some(next) if now == next => (false, false),
            Some(next) if before == Some(next) => (true, false),
            Some(_) => (false, true),
            // `f` was `path`: renamed `.1` since, or `.1` just being replaced (missing,
            // or the same file as `path`), `path` is what follows it.
            None if before.is_none() || before == Some(ours) || before == Some(now) => {
                (false, false)
            }
            None => (false, true),
        };
        let opened = if in_before {
            std::fs::File::open(&before_path)
        } else {
            std::fs::File::open(&self.path)
        };
        let Ok(new) = opened else {
            return false;
        };
        // What reached the old file after the last read (a rename just then).
        let _ = (&mut self.f)
            .take(4 * MAX_LOG_LINE as u64)
            .read_to_end(&mut self.partial);
        if lost {
            while self.split() {}
            self.partial.clear();
            self.taken = 0;
            self.ready.push_back(LOG_LINES_LOST.to_owned());
        }
        self.successor = in_before.then_some(now);
        self.f = new;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory for a log, the log's name in it, and a live flag.
    fn a_log() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        (dir, path, alive)
    }

    /// Reads the next line of `lines` or fails after 5 s.
    async fn next_line(lines: &mut BoxStream<'static, String>) -> Option<String> {
        use futures_util::StreamExt as _;
        tokio::time::timeout(std::time::Duration::from_secs(5), lines.next())
            .await
            .expect("no line in 5 s")
    }

    #[tokio::test]
    async fn a_followed_log_goes_on_in_the_file_that_replaced_it() {
        use std::io::Write as _;
        let (_dir, path, alive) = a_log();
        std::fs::write(&path, "one\r\n").unwrap();
        let mut lines = tail_lines(&path, true, alive.clone()).unwrap();
        assert_eq!(next_line(&mut lines).await.unwrap(), "one");
        // Written to the old file, which is then renamed; the line goes on in the new.
        let mut old = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        old.write_all(b"two\nthr").unwrap();
        std::fs::rename(&path, rotated_log(&path)).unwrap();
        std::fs::write(&path, "ee\nfour\n").unwrap();
        for want in ["two", "three", "four"] {
            assert_eq!(next_line(&mut lines).await.as_deref(), Some(want));
        }
        // A reader a whole file behind says it lost lines, and goes on.
        for text in ["five\n", "six\n"] {
            std::fs::rename(&path, rotated_log(&path)).unwrap();
            std::fs::write(&path, text).unwrap();
        }
        assert_eq!(next_line(&mut lines).await.as_deref(), Some(LOG_LINES_LOST));
        assert_eq!(next_line(&mut lines).await.as_deref(), Some("six"));
        alive.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(next_line(&mut lines).await, None);
    }

    #[tokio::test]
    async fn a_short_log_begins_in_the_one_before() {
        use futures_util::StreamExt as _;
        let (_dir, path, alive) = a_log();
        // The window (64 KiB) takes in the end of the one before, whose first line it
        // cuts (not shown).
        std::fs::write(rotated_log(&path), "a".repeat(70_000) + "\nolder\n").unwrap();
        std::fs::write(&path, "newer\n").unwrap();
        let lines: Vec<String> = tail_lines(&path, false, alive).unwrap().collect().await;
        assert_eq!(lines, ["older", "newer"]);
    }

    #[tokio::test]
    async fn a_reader_that_began_in_the_one_before_reads_what_followed_it_renamed() {
        let (_dir, path, alive) = a_log();
        std::fs::write(rotated_log(&path), "a\n").unwrap();
        std::fs::write(&path, "b\n").unwrap();
        let mut lines = tail_lines(&path, true, alive.clone()).unwrap();
        // Before it read a line, "b"'s file became `.1` and "c"'s took the name.
        std::fs::rename(&path, rotated_log(&path)).unwrap();
        std::fs::write(&path, "c\n").unwrap();
        for want in ["a", "b", "c"] {
            assert_eq!(next_line(&mut lines).await.as_deref(), Some(want));
        }
        alive.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(next_line(&mut lines).await, None);
    }

    #[tokio::test]
    async fn a_line_longer_than_the_limit_is_cut() {
        use std::io::Write as _;
        let (_dir, path, alive) = a_log();
        std::fs::write(&path, "").unwrap();
        let mut lines = tail_lines(&path, true, alive).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        // No newline for longer than a line may be: it goes out in pieces.
        f.write_all(&vec![b'x'; MAX_LOG_LINE + 100]).unwrap();
        f.write_all(b"\nend\n").unwrap();
        assert_eq!(
            next_line(&mut lines).await.unwrap(),
            "x".repeat(MAX_LOG_LINE)
        );
        assert_eq!(next_line(&mut lines).await.unwrap(), "x".repeat(100));
        assert_eq!(next_line(&mut lines).await.unwrap(), "end");
    }

    #[test]
    fn a_refusal_is_read_from_its_kind_and_data_not_its_text() {
        // The pid comes as data; the message is for people.
        match RuntimeError::refused(
            "sbx",
            "call",
            Refusal::NoProcess,
            "gone, sorry".into(),
            Some(7),
        ) {
            RuntimeError::NoProcess(7) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            RuntimeError::refused("sbx", "call", Refusal::Conflict, "exited".into(), None),
            RuntimeError::Conflict(_)
        ));
        assert!(matches!(
            RuntimeError::refused("sbx", "call", Refusal::NoSpace, "not found".into(), None),
            RuntimeError::File {
                kind: FileErrorKind::NoSpace,
                ..
            }
        ));
        assert!(matches!(
            RuntimeError::refused(
                "sbx",
                "call",
                Refusal::FileNotFound,
                "no space".into(),
                None
            ),
            RuntimeError::File {
                kind: FileErrorKind::NotFound,
                ..
            }
        ));
        assert!(matches!(
            RuntimeError::refused("sbx", "call", Refusal::PortClosed, "closed".into(), None),
            RuntimeError::PortClosed(_)
        ));
        assert!(matches!(
            RuntimeError::refused("sbx", "call", Refusal::Invalid, "bad".into(), None),
            RuntimeError::Rejected(_)
        ));
        assert!(matches!(
            RuntimeError::refused("sbx", "call", Refusal::Failed, "boom".into(), None),
            RuntimeError::Host { op: "call", .. }
        ));
    }
}
