//! PID 1 duty: reap every process that is reparented to us (orphans of user commands,
//! and the zygote should it die). Commands themselves are the zygote's children and
//! are reaped there, with their status reported back.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Exit status in shell convention: the code, or 128 + signal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
}

/// Starts the SIGCHLD loop on the current runtime.
pub fn start() -> std::io::Result<()> {
    let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                if s == WaitStatus::StillAlive {
                    break;
                }
            }
            if sig.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(())
}
