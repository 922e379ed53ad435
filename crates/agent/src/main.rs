//! `forkbox-agent`: the first process of every sandbox.
//!
//! Modes:
//! - `forkbox-agent jail-init` — run by the host as root: reads a [`JailInit`] on stdin,
//!   creates the sandbox's namespaces and its first process (which becomes the agent,
//!   PID 1 inside), prints a [`JailInitReply`] and exits.
//! - `forkbox-agent serve --listen-fd N` — serve the agent protocol on an inherited
//!   listening socket.
//! - `forkbox-agent vm-init` — PID 1 of a vm sandbox's guest: serve the agent protocol
//!   on a virtio-serial port (`vm_init.rs`).
//! - `forkbox-agent carry REPL_PID INODE…` — started by the agent for a fork: carries
//!   the Python REPL's copies into the fork children (`carry.rs`).
//! - `forkbox-agent confine [--env K=V]… [--cwd DIR] [--user SPEC] -- CMD…` — run by
//!   the host (through nsenter) inside a template build sandbox: execs CMD with
//!   `no_new_privs`, the sandbox's seccomp filters (`setns` denied too) and only a
//!   container build's capabilities, or as a Dockerfile's `USER` (`confine.rs`).
//!
//! [`JailInit`]: forkbox_types::agent::JailInit
//! [`JailInitReply`]: forkbox_types::agent::JailInitReply

mod bg;
mod carry;
mod confine;
mod deadman;
mod egress;
mod exec;
mod jail_init;
mod kernels;
mod lines;
mod pty;
mod reaper;
mod server;
mod tcp;
mod vm_init;
mod vport;
mod watch;
mod zygote;

// The file resolver lives in the library target (`lib.rs`) so the fuzz targets can link it.
use forkbox_agent::files;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("jail-init") => jail_init::run(false),
        Some("jail-init-nested") => jail_init::run(true),
        Some("jail-helper") => jail_init::helper(),
        Some("serve") => {
            let fd = match args.iter().position(|a| a == "--listen-fd") {
                Some(i) => args.get(i + 1).and_then(|v| v.parse::<i32>().ok()),
                None => Some(3),
            };
            let Some(fd) = fd else {
                eprintln!("forkbox-agent: --listen-fd needs a number");
                return ExitCode::from(2);
            };
            // SAFETY: the caller hands us this fd as our listening socket; we own it now.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            server::run(fd, server::Options::default())
        }
        Some("vm-init") => vm_init::run(),
        Some("confine") => confine::run(&args[1..]),
        Some("carry") => carry::run(&args[1..]),
        Some("--version") => {
            println!("forkbox-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: forkbox-agent jail-init | serve [--listen-fd N] | vm-init | carry REPL_PID INODE… | confine [OPTIONS] -- CMD… | --version"
            );
            ExitCode::from(2)
        }
    }
}
