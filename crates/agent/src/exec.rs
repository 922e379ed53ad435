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

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What every command needs from the agent.
#[derive(Clone)]
pub struct Context {
    pub spawner: Spawner,
    pub env: Arc<BTreeMap<String, String>>,
    pub kernels: crate::kernels::Kernels,
    pub bg: crate::bg::Table,
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
}

/// The environment of a user process: defaults, then the sandbox's, then `extra`.
pub fn command_env(ctx: &Context, extra: &BTreeMap<String, String>) -> Vec<String> {
    let mut env: BTreeMap<&str, &str> = BTreeMap::new();
    env.insert("PATH", DEFAULT_PATH);
    env.insert("HOME", "/root");
    env.insert("LANG", "C.UTF-8");
    for (k, v) in ctx.env.iter().chain(extra.iter()) {
        env.insert(k, v);
    }
    env.iter().map(|(k, v)| format!("{k}={v}")).collect()
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
    let (pid, exit) = ctx
        .spawner
        .spawn(zygote::Command {
            argv: vec!["/bin/sh".into(), "-c".into(), req.cmd.clone()],
            env: command_env(ctx, &req.env),
            cwd,
            stdio: [stdin, out_w, err_w],
            extra: None,
            tty: false,
        })
        .await?;
    Ok(Running {
        pid,
        stdout,
        stderr,
        exit,
        timeout: req.timeout_ms.map(Duration::from_millis),
    })
}

/// One NDJSON line of the agent protocol.
pub fn line(ev: &AgentEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

impl Running {
    /// The command's pid inside the sandbox.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Streams events into `tx` until the command ends; kills the tree if `tx` closes.
    pub async fn stream(mut self, tx: mpsc::Sender<Bytes>) {
        let mut out_split = LineSplitter::default();
        let mut err_split = LineSplitter::default();
        let (mut out_open, mut err_open) = (true, true);
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut exit: Option<Exit> = None;
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
                r = self.stdout.read(&mut out_buf), if out_open => match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => for l in out_split.push(&out_buf[..n]) {
                        if tx.send(line(&AgentEvent::Stdout { data: l })).await.is_err() {
                            kill_tree(self.pid);
                            return;
                        }
                    },
                },
                r = self.stderr.read(&mut err_buf), if err_open => match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => for l in err_split.push(&err_buf[..n]) {
                        if tx.send(line(&AgentEvent::Stderr { data: l })).await.is_err() {
                            kill_tree(self.pid);
                            return;
                        }
                    },
                },
                e = &mut self.exit, if exit.is_none() => {
                    exit = Some(e.unwrap_or(Exit { code: -1, signal: None }));
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                },
                _ = tokio::time::sleep_until(stop_at) => {
                    if drain_until.is_some() {
                        // The command is gone; stop waiting for whoever holds its pipes.
                        break;
                    }
                    timed_out = true;
                    kill_tree(self.pid);
                },
                _ = tx.closed() => {
                    kill_tree(self.pid);
                    return;
                },
            }
        }
        if exit.is_some() && (out_open || err_open) {
            // Leftover holders of the pipes belong to this command: end them too.
            kill_tree(self.pid);
        }
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
            }))
            .await;
    }
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
