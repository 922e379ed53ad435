//! Running one command: spawn with every privilege dropped, stream its output as lines,
//! enforce its timeout, kill its whole tree when asked or when the host goes away.

use crate::lines::LineSplitter;
use crate::reaper::Exit;
use crate::zygote::{self, Spawner, ZygoteError};
use bytes::Bytes;
use forkbox_types::agent::{AgentEvent, ExecRequest};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// How long output is still collected after the command itself exited, for
/// grandchildren that keep the pipes open (e.g. `sleep 100 &`).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(50);

/// While the command's session is still making progress when that time is up (a
/// process of it is runnable, or its processes or their CPU time changed since the last
/// look: a short sleep ended, a child started or exited), collection goes on in steps
/// of this…
pub(crate) const DRAIN_STEP: Duration = Duration::from_millis(10);
/// …for at most this long after the exit in all.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// After the holders of the pipes were killed, how long their end (EOF) is awaited:
/// everything they wrote before they died is still read.
const EOF_AFTER_KILL: Duration = Duration::from_millis(500);

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What every command needs from the agent.
#[derive(Clone)]
pub struct Context {
    pub spawner: Spawner,
    /// The sandbox's environment (replaced by `POST /hostname` with an `env`).
    pub env: Arc<std::sync::RwLock<Arc<BTreeMap<String, String>>>>,
    pub kernels: crate::kernels::Kernels,
    pub bg: crate::bg::Table,
    /// A vm guest's egress listener (`egress.rs`).
    pub egress: crate::egress::Egress,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("working directory {0} does not exist")]
    NoCwd(String),
    #[error("create pipes: {0}")]
    Pipes(std::io::Error),
    #[error(transparent)]
    Zygote(#[from] ZygoteError),
}

/// A started command whose events can be streamed.
pub struct Running {
    pid: i32,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    exit: tokio::sync::oneshot::Receiver<Exit>,
    timeout: Option<Duration>,
    oom: crate::vm_init::OomWatch,
}

/// The environment of a user process: defaults, then the sandbox's, then `extra`.
pub fn command_env(ctx: &Context, extra: &BTreeMap<String, String>) -> Vec<String> {
    let mut env: BTreeMap<&str, &str> = BTreeMap::new();
    env.insert("PATH", DEFAULT_PATH);
    env.insert("HOME", "/root");
    env.insert("LANG", "C.UTF-8");
    let sandbox = ctx.sandbox_env();
    for (k, v) in sandbox.iter().chain(extra.iter()) {
        env.insert(k, v);
    }
    env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

impl Context {
    /// The sandbox's environment now.
    pub fn sandbox_env(&self) -> Arc<BTreeMap<String, String>> {
        match self.env.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the sandbox's environment.
    pub fn set_sandbox_env(&self, env: BTreeMap<String, String>) {
        match self.env.write() {
            Ok(mut g) => *g = Arc::new(env),
            Err(p) => *p.into_inner() = Arc::new(env),
        }
    }
}

pub fn pipe_pair() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Pipes(e.into()))
}

pub async fn spawn(ctx: &Context, req: &ExecRequest) -> Result<Running, SpawnError> {
    spawn_with_stdin(ctx, req, None).await
}

/// Like [`spawn`], with `stdin` as the command's standard input (else /dev/null).
pub async fn spawn_with_stdin(
    ctx: &Context,
    req: &ExecRequest,
    stdin: Option<OwnedFd>,
) -> Result<Running, SpawnError> {
    let cwd = req.cwd.clone().unwrap_or_else(|| "/root".to_owned());
    if !std::path::Path::new(&cwd).is_dir() {
        return Err(SpawnError::NoCwd(cwd));
    }
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    let stdin = match stdin {
        Some(fd) => fd,
        None => OwnedFd::from(std::fs::File::open("/dev/null").map_err(SpawnError::Pipes)?),
    };
    let to_rx = |fd: OwnedFd| pipe::Receiver::from_owned_fd(fd).map_err(SpawnError::Pipes);
    let (stdout, stderr) = (to_rx(out_r)?, to_rx(err_r)?);
    let oom = crate::vm_init::OomWatch::start();
    let (pid, exit) = ctx
        .spawner
        .spawn(zygote::Command {
            argv: vec!["/bin/sh".into(), "-c".into(), req.cmd.clone()],
            env: command_env(ctx, &req.env),
            cwd,
            stdio: [stdin, out_w, err_w],
            extra: None,
            tty: false,
            may_setns: false,
        })
        .await?;
    Ok(Running {
        pid,
        stdout,
        stderr,
        exit,
        timeout: req.timeout_ms.map(Duration::from_millis),
        oom,
    })
}

/// One NDJSON line of the agent protocol.
pub fn line(ev: &AgentEvent) -> Bytes {
    Bytes::from(forkbox_types::ndjson::line(ev))
}

impl Running {
    /// The command's pid inside the sandbox.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Streams events into `tx` until the command ends; kills the tree if `tx` closes.
    ///
    /// The `exit` event goes last, after every byte written to the command's stdout and
    /// stderr was read and sent: when the command exits, collection goes on until both
    /// pipes reach EOF, for [`DRAIN_AFTER_EXIT`] (longer while a process of its session
    /// is runnable, up to [`DRAIN_MAX`]); then whoever still holds them (background
    /// processes of the command) is killed and the pipes are read to EOF, so what they
    /// wrote before they died is delivered too. Reads win over timers whenever both are
    /// ready.
    pub async fn stream(mut self, tx: mpsc::Sender<Bytes>) {
        let mut out = Output::new(&tx, true);
        let mut err = Output::new(&tx, false);
        let (mut out_open, mut err_open) = (true, true);
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut exit: Option<Exit> = None;
        let mut drain: Option<Drain> = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut timed_out = false;
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        loop {
            if !out_open && !err_open && exit.is_some() {
                break;
            }
            let stop_at = match (drain_until, deadline) {
                (Some(d), _) => d,
                (None, Some(d)) if !timed_out => d,
                _ => far,
            };
            tokio::select! {
                biased;
                r = self.stdout.read(&mut out.buf), if out_open => match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => if out.emit(n).await.is_err() {
                        return kill_tree(self.pid);
                    },
                },
                r = self.stderr.read(&mut err.buf), if err_open => match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => if err.emit(n).await.is_err() {
                        return kill_tree(self.pid);
                    },
                },
                e = &mut self.exit, if exit.is_none() => {
                    exit = Some(e.unwrap_or(Exit { code: -1, signal: None }));
                    drain = Some(Drain::new(self.pid));
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                },
                _ = tx.closed() => {
                    kill_tree(self.pid);
                    return;
                },
                _ = tokio::time::sleep_until(stop_at) => {
                    if let Some(d) = &mut drain {
                        // The command is gone; its pipes are still held. Wait on while
                        // its session makes progress, within bounds.
                        if d.more() {
                            drain_until = Some(tokio::time::Instant::now() + DRAIN_STEP);
                            continue;
                        }
                        break;
                    }
                    timed_out = true;
                    kill_tree(self.pid);
                },
            }
        }
        if exit.is_some() && (out_open || err_open) {
            // Leftover holders of the pipes belong to this command: end them, then read
            // what they wrote up to their end.
            kill_tree(self.pid);
            let until = tokio::time::Instant::now() + EOF_AFTER_KILL;
            while out_open || err_open {
                tokio::select! {
                    biased;
                    r = self.stdout.read(&mut out.buf), if out_open => match r {
                        Ok(0) | Err(_) => out_open = false,
                        Ok(n) => if out.emit(n).await.is_err() {
                            return;
                        },
                    },
                    r = self.stderr.read(&mut err.buf), if err_open => match r {
                        Ok(0) | Err(_) => err_open = false,
                        Ok(n) => if err.emit(n).await.is_err() {
                            return;
                        },
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            if out_open || err_open {
                let note = "forkbox: stopped collecting output: a process outside the command's \
                            process tree still holds its stdout or stderr\n";
                let _ = tx
                    .send(line(&AgentEvent::Stderr {
                        data: note.to_owned(),
                    }))
                    .await;
            }
        }
        let (mut out_split, mut err_split) = (out.split, err.split);
        for (rest, is_out) in [(out_split.finish(), true), (err_split.finish(), false)] {
            if let Some(data) = rest {
                let ev = if is_out {
                    AgentEvent::Stdout { data }
                } else {
                    AgentEvent::Stderr { data }
                };
                let _ = tx.send(line(&ev)).await;
            }
        }
        let exit = exit.unwrap_or(Exit {
            code: -1,
            signal: None,
        });
        let _ = tx
            .send(line(&AgentEvent::Exit {
                code: exit.code,
                signal: exit.signal,
                timed_out,
                oom_kills: self.oom.since(),
            }))
            .await;
    }
}

/// The client went away.
struct Gone;

/// One output pipe of a command being split into line events.
struct Output<'a> {
    tx: &'a mpsc::Sender<Bytes>,
    split: LineSplitter,
    buf: Vec<u8>,
    stdout: bool,
}

impl<'a> Output<'a> {
    fn new(tx: &'a mpsc::Sender<Bytes>, stdout: bool) -> Output<'a> {
        Output {
            tx,
            split: LineSplitter::default(),
            buf: vec![0u8; 16 * 1024],
            stdout,
        }
    }

    /// Sends the complete lines of the `n` bytes just read into `buf`.
    ///
    /// Reading and sending are apart on purpose: only the read (cancel-safe) races
    /// the other branches of `Running::stream`'s `select!`. A future that had read
    /// bytes and then waited to send them (the channel full under a flood of the other
    /// stream) lost them when another branch won.
    async fn emit(&mut self, n: usize) -> Result<(), Gone> {
        for data in self.split.push(&self.buf[..n]) {
            let ev = if self.stdout {
                AgentEvent::Stdout { data }
            } else {
                AgentEvent::Stderr { data }
            };
            self.tx.send(line(&ev)).await.map_err(|_| Gone)?;
        }
        Ok(())
    }
}

/// After a command exited while others still hold its output: whether to keep
/// collecting, i.e. its session still makes progress (a process of it runnable, or
/// its processes or their CPU time changed since the last look), for at most
/// [`DRAIN_MAX`] after the exit.
pub(crate) struct Drain {
    sid: i32,
    exited: tokio::time::Instant,
    last: Option<Vec<(i32, char, u64)>>,
}

impl Drain {
    /// For the session `sid` of a command that exited now.
    pub(crate) fn new(sid: i32) -> Drain {
        Drain {
            sid,
            exited: tokio::time::Instant::now(),
            last: None,
        }
    }

    /// Whether to look again in [`DRAIN_STEP`].
    pub(crate) fn more(&mut self) -> bool {
        let look = session_processes(self.sid);
        let busy = look.iter().any(|(_, st, _)| matches!(st, 'R' | 'D'))
            || self.last.as_ref() != Some(&look);
        let more = self.exited.elapsed() < DRAIN_MAX && busy && !look.is_empty();
        self.last = Some(look);
        more
    }
}

/// The processes of session `sid` (a command and what it started), as (pid, state,
/// CPU ticks used), sorted: what [`Running::stream`] compares to tell whether the
/// session still makes progress. Zombies are left out.
fn session_processes(sid: i32) -> Vec<(i32, char, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<(i32, char, u64)> = dir
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command name (which may hold spaces and parentheses): state,
            // ppid, pgrp, session, …, utime (the 12th), stime (the 13th).
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().take(13).collect();
            let state = f.first()?.chars().next()?;
            if f.get(3)?.parse::<i32>().ok()? != sid || state == 'Z' {
                return None;
            }
            let cpu = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some((pid, state, cpu))
        })
        .collect();
    out.sort_unstable();
    out
}

/// SIGKILLs `pid`, its process group and every descendant found in /proc.
pub fn kill_tree(pid: i32) {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::Pid;
    let mut victims = descendants(pid);
    victims.push(pid);
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    for v in victims {
        let _ = kill(Pid::from_raw(v), Signal::SIGKILL);
    }
}

/// Every process whose ancestry leads to `root`.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // The command name may contain spaces and parentheses: parse after the last ')'.
                if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) {
                    if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
                    {
                        parent_of.push((pid, ppid));
                    }
                }
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        for &(c, pp) in &parent_of {
            if pp == p && !found.contains(&c) {
                found.push(c);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}
