//! PID 1 duties: reap every child (orphans included) and hand exit statuses to whoever
//! waits for a particular pid.
//!
//! Spawning and registering a waiter happen under the same lock as reaping, so an exit
//! can never be reaped before its waiter exists, and a reused pid can never be confused
//! with an old one.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// Exit status in shell convention: the code, or 128 + signal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
}

#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, oneshot::Sender<Exit>>>>,
}

impl Reaper {
    /// Starts the SIGCHLD loop on the current runtime.
    pub fn start() -> std::io::Result<Reaper> {
        let r = Reaper::default();
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let me = r.clone();
        tokio::spawn(async move {
            loop {
                me.reap_all();
                if sig.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(r)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<Exit>>> {
        match self.waiters.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit { code, signal: None }),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (
                    pid,
                    Exit {
                        code: 128 + sig as i32,
                        signal: Some(sig as i32),
                    },
                ),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            // Orphans reparented to us have no waiter: reaped and forgotten.
            if let Some(tx) = waiters.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
        }
    }

    /// Spawns a child with `spawn` and registers for its exit atomically.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> std::io::Result<(i32, T)>,
    ) -> std::io::Result<(T, oneshot::Receiver<Exit>)> {
        let mut waiters = self.lock();
        let (pid, value) = spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        Ok((value, rx))
    }
}
