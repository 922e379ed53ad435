//! Background commands: started without waiting, listed, fed stdin, signalled, waited
//! for, and their output replayed to whoever reconnects.
//!
//! Each command's output (NDJSON event lines, as for `/exec`) is kept in a buffer capped
//! at [`KEEP_BYTES`]; older lines are dropped (and counted) first. Live readers follow a
//! broadcast that drops lines for readers that fall behind rather than buffering more,
//! and are told how many they missed.

use crate::exec::{self, line, Context};
use bytes::Bytes;
use forkbox_types::agent::{AgentEvent, BgInfo, ExecRequest};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, mpsc, watch};

/// Output kept per command for replay.
pub const KEEP_BYTES: usize = 1 << 20;
/// Background commands tracked at once (finished ones are forgotten first).
pub const MAX_TRACKED: usize = 256;

struct Output {
    lines: VecDeque<Bytes>,
    bytes: usize,
    dropped_lines: u64,
}

pub struct Proc {
    info: Mutex<BgInfo>,
    stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    output: Mutex<Output>,
    live: broadcast::Sender<Bytes>,
    exit: watch::Receiver<Option<i32>>,
}

#[derive(Clone, Default)]
pub struct Table {
    procs: Arc<Mutex<HashMap<i32, Arc<Proc>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum BgError {
    #[error("no background command with pid {0}")]
    NoSuchPid(i32),
    #[error("too many background commands ({MAX_TRACKED} running)")]
    TooMany,
    #[error("command {0} has exited")]
    Exited(i32),
    #[error("stdin of command {0} is closed")]
    StdinClosed(i32),
    #[error("{0}")]
    Spawn(#[from] exec::SpawnError),
    #[error("{0}")]
    Io(std::io::Error),
}

impl Table {
    fn get(&self, pid: i32) -> Result<Arc<Proc>, BgError> {
        lock(&self.procs)
            .get(&pid)
            .cloned()
            .ok_or(BgError::NoSuchPid(pid))
    }

    /// Starts `req` in the background; returns its pid.
    pub async fn start(&self, ctx: &Context, req: &ExecRequest) -> Result<BgInfo, BgError> {
        {
            let mut procs = lock(&self.procs);
            if procs.len() >= MAX_TRACKED {
                // Forget the oldest finished one, if any.
                let done = procs
                    .iter()
                    .filter(|(_, p)| lock(&p.info).exit_code.is_some())
                    .min_by_key(|(_, p)| lock(&p.info).started_ms)
                    .map(|(pid, _)| *pid);
                match done {
                    Some(pid) => {
                        procs.remove(&pid);
                    }
                    None => return Err(BgError::TooMany),
                }
            }
        }
        let (stdin_r, stdin_w) = exec::pipe_pair()?;
        let running = exec::spawn_with_stdin(ctx, req, Some(stdin_r)).await?;
        let pid = running.pid();
        let info = BgInfo {
            pid,
            cmd: req.cmd.clone(),
            started_ms: now_ms(),
            exit_code: None,
        };
        let (live, _) = broadcast::channel(1024);
        let (exit_tx, exit_rx) = watch::channel(None);
        let proc = Arc::new(Proc {
            info: Mutex::new(info.clone()),
            stdin: tokio::sync::Mutex::new(pipe::Sender::from_owned_fd(stdin_w).ok()),
            output: Mutex::new(Output {
                lines: VecDeque::new(),
                bytes: 0,
                dropped_lines: 0,
            }),
            live,
            exit: exit_rx,
        });
        lock(&self.procs).insert(pid, proc.clone());
        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(running.stream(tx));
        tokio::spawn(async move {
            while let Some(l) = rx.recv().await {
                let code = match serde_json::from_slice::<AgentEvent>(&l) {
                    Ok(AgentEvent::Exit { code, .. }) => Some(code),
                    _ => None,
                };
                {
                    let mut out = lock(&proc.output);
                    out.bytes += l.len();
                    out.lines.push_back(l.clone());
                    while out.bytes > KEEP_BYTES && out.lines.len() > 1 {
                        if let Some(old) = out.lines.pop_front() {
                            out.bytes -= old.len();
                            out.dropped_lines += 1;
                        }
                    }
                    // Sent under the lock, so a reader that snapshots the buffer and
                    // subscribes under it sees every line exactly once.
                    let _ = proc.live.send(l);
                }
                if let Some(c) = code {
                    lock(&proc.info).exit_code = Some(c);
                    *proc.stdin.lock().await = None;
                    let _ = exit_tx.send(Some(c));
                }
            }
        });
        Ok(info)
    }

    /// Every tracked command, by pid.
    pub fn list(&self) -> Vec<BgInfo> {
        let mut v: Vec<BgInfo> = lock(&self.procs)
            .values()
            .map(|p| lock(&p.info).clone())
            .collect();
        v.sort_by_key(|i| i.pid);
        v
    }

    /// Writes `data` to the command's stdin; `close` then closes it (EOF).
    pub async fn stdin(&self, pid: i32, data: &[u8], close: bool) -> Result<(), BgError> {
        let p = self.get(pid)?;
        let mut g = p.stdin.lock().await;
        let Some(w) = g.as_mut() else {
            return Err(if lock(&p.info).exit_code.is_some() {
                BgError::Exited(pid)
            } else {
                BgError::StdinClosed(pid)
            });
        };
        if !data.is_empty() {
            w.write_all(data).await.map_err(BgError::Io)?;
        }
        if close {
            *g = None;
        }
        Ok(())
    }

    /// Sends `signal` to the command's process group.
    pub fn signal(&self, pid: i32, signal: i32) -> Result<(), BgError> {
        let p = self.get(pid)?;
        if lock(&p.info).exit_code.is_some() {
            return Err(BgError::Exited(pid));
        }
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|e| BgError::Io(std::io::Error::from(e)))?;
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| BgError::Io(std::io::Error::from(e)))
    }

    /// Waits until the command exits; its exit code.
    pub async fn wait(&self, pid: i32) -> Result<i32, BgError> {
        let p = self.get(pid)?;
        let mut rx = p.exit.clone();
        loop {
            if let Some(c) = *rx.borrow_and_update() {
                return Ok(c);
            }
            if rx.changed().await.is_err() {
                return Ok(-1);
            }
        }
    }

    /// The kept output, then (with `follow`) live output until the exit event, into
    /// `tx` as NDJSON event lines.
    pub async fn output(
        &self,
        pid: i32,
        follow: bool,
        tx: mpsc::Sender<Bytes>,
    ) -> Result<(), BgError> {
        let p = self.get(pid)?;
        tokio::spawn(async move {
            let (past, dropped, mut live) = {
                let out = lock(&p.output);
                (
                    out.lines.iter().cloned().collect::<Vec<_>>(),
                    out.dropped_lines,
                    p.live.subscribe(),
                )
            };
            if dropped > 0 {
                let note = AgentEvent::Stderr {
                    data: format!("forkbox: {dropped} earlier output lines were not kept\n"),
                };
                if tx.send(line(&note)).await.is_err() {
                    return;
                }
            }
            let mut ended = false;
            for l in past {
                ended = l.starts_with(br#"{"type":"exit""#);
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            if ended || !follow {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(l) => {
                        let end = l.starts_with(br#"{"type":"exit""#);
                        if tx.send(l).await.is_err() || end {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let note = AgentEvent::Stderr {
                            data: format!("forkbox: {n} output lines dropped (reader too slow)\n"),
                        };
                        if tx.send(line(&note)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(())
    }
}
