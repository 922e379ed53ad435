//! An interactive terminal session (`POST /pty`): a command on a fresh pseudo-terminal
//! of the sandbox's own devpts, its output and exit status streamed back as frames, the
//! request body's frames written to it (input, window sizes). The session ends, and the
//! process tree is killed, when either side goes away.
//!
//! With `pipe`, the same session on plain pipes (the LSP bridge: JSON-RPC must pass
//! byte for byte, which a terminal's line discipline would not): input goes to the
//! command's stdin, which closes when the input ends; output is its stdout.

use crate::exec::{command_env, kill_tree, Context};
use crate::zygote;
use bytes::Bytes;
use forkbox_types::agent::PtyRequest;
use forkbox_types::pty::{encode, Decoder, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_size(fd: &OwnedFd, rows: u16, cols: u16) {
    let ws = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives on the stack.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        eprintln!(
            "forkbox-agent pty: resize to {rows}x{cols}: {}",
            std::io::Error::last_os_error()
        );
    }
}

type Shared = std::sync::Arc<AsyncFd<OwnedFd>>;

/// The host's ends of a session (input, output: the same terminal master, or the
/// command's stdin and stdout pipes) and the command's stdin, stdout and stderr.
struct Ends {
    input: Shared,
    output: Shared,
    child: [OwnedFd; 3],
}

fn nonblocking(fd: OwnedFd) -> std::io::Result<Shared> {
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd for its whole lifetime.
    Ok(std::sync::Arc::new(unsafe { AsyncFd::register(fd) }?))
}

impl Ends {
    fn terminal(rows: u16, cols: u16) -> std::io::Result<Ends> {
        let pty = nix::pty::openpty(Some(&winsize(rows, cols)), None)?;
        let (master, slave) = (pty.master, pty.slave);
        let child = [slave.try_clone()?, slave.try_clone()?, slave];
        let master = nonblocking(master)?;
        Ok(Ends {
            input: master.clone(),
            output: master,
            child,
        })
    }

    fn pipes() -> std::io::Result<Ends> {
        let (stdin_r, stdin_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (stdout_r, stdout_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")?
            .into();
        Ok(Ends {
            input: nonblocking(stdin_w)?,
            output: nonblocking(stdout_r)?,
            child: [stdin_r, stdout_w, null],
        })
    }
}

/// Starts the session; output frames go to `out` (bounded: a slow reader slows the
/// terminal down, it does not grow memory).
pub async fn start(
    ctx: &Context,
    req: &PtyRequest,
    input: Incoming,
    out: mpsc::Sender<Bytes>,
) -> Result<(), String> {
    // bash where there is one: it execs a lone command and, unlike dash, does not kill
    // itself with SIGINT after a foreground program handled a Ctrl-C.
    let shell = if std::path::Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let argv: Vec<String> = match &req.cmd {
        Some(c) => vec![shell.into(), "-c".into(), c.clone()],
        None => vec![shell.into(), "-l".into()],
    };
    let mut extra = std::collections::BTreeMap::new();
    if !req.pipe {
        extra.insert("TERM".to_owned(), "xterm-256color".to_owned());
    }
    extra.extend(req.env.clone());
    let ends = if req.pipe {
        Ends::pipes()
    } else {
        Ends::terminal(req.rows, req.cols)
    }
    .map_err(|e| e.to_string())?;
    let (pid, exit) = ctx
        .spawner
        .spawn(zygote::Command {
            argv,
            env: command_env(ctx, &extra),
            cwd: req.cwd.clone().unwrap_or_else(|| "/root".into()),
            stdio: ends.child,
            extra: None,
            may_setns: false,
            tty: !req.pipe,
        })
        .await
        .map_err(|e| e.to_string())?;
    let (writer, master) = (ends.input, ends.output);
    // Input: frames from the host, until its side closes.
    // (With pipes, the writer is the command's stdin alone: dropped when the input
    // ends, so the command reads end-of-file.)
    let terminal = !req.pipe;
    let input_task = tokio::spawn(async move {
        let mut body = input;
        let mut dec = Decoder::default();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            dec.push(&data);
            loop {
                match dec.next_frame() {
                    Ok(Some(Frame::Data(bytes))) => {
                        let mut rest: &[u8] = &bytes;
                        while !rest.is_empty() {
                            let Ok(mut guard) = writer.writable().await else {
                                return;
                            };
                            match guard.try_io(|fd| {
                                nix::unistd::write(fd.get_ref(), rest).map_err(std::io::Error::from)
                            }) {
                                Ok(Ok(n)) => rest = &rest[n..],
                                Ok(Err(_)) => return,
                                Err(_would_block) => continue,
                            }
                        }
                    }
                    Ok(Some(Frame::Resize { rows, cols })) => {
                        if terminal {
                            set_size(writer.get_ref(), rows, cols)
                        }
                    }
                    Ok(Some(Frame::Kill)) => kill_tree(pid),
                    Ok(Some(Frame::Exit(_))) | Err(_) => return,
                    Ok(None) => break,
                }
            }
        }
    });
    // Output: terminal bytes until the terminal closes, then the exit status.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut exit = exit;
        let mut exited = None;
        let mut drain: Option<crate::exec::Drain> = None;
        // After the process exits, output still buffered (or written by children that
        // keep the terminal) is collected until the terminal is quiet for a moment.
        let quiet = std::time::Duration::from_millis(100);
        let mut deadline =
            tokio::time::Instant::now() + std::time::Duration::from_secs(86400 * 365);
        loop {
            tokio::select! {
                // Output first whenever it and a timer are both ready.
                biased;
                r = master.readable() => {
                    let Ok(mut guard) = r else { break };
                    match guard.try_io(|fd| {
                        nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf)
                            .map_err(std::io::Error::from)
                    }) {
                        Ok(Ok(0)) | Ok(Err(_)) => break, // EIO: every slave side closed
                        Ok(Ok(n)) => {
                            if out.send(Bytes::from(encode(&Frame::Data(buf[..n].to_vec())))).await.is_err() {
                                kill_tree(pid);
                                input_task.abort();
                                return;
                            }
                            if exited.is_some() {
                                deadline = tokio::time::Instant::now() + quiet;
                            }
                        }
                        Err(_would_block) => continue,
                    }
                }
                e = &mut exit, if exited.is_none() => {
                    exited = Some(e.map(|e| e.code).unwrap_or(-1));
                    drain = Some(crate::exec::Drain::new(pid));
                    deadline = tokio::time::Instant::now() + quiet;
                }
                _ = out.closed() => {
                    kill_tree(pid);
                    input_task.abort();
                    return;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // Quiet: wait on while the command's session makes progress (a
                    // child about to write under load), as exec does.
                    if drain.as_mut().is_some_and(|d| d.more()) {
                        deadline = tokio::time::Instant::now() + crate::exec::DRAIN_STEP;
                        continue;
                    }
                    break;
                }
            }
        }
        kill_tree(pid);
        // What is still in the terminal (written before the kill) goes out too: plain
        // non-blocking reads until it is empty or every slave side is closed (EIO).
        loop {
            match nix::unistd::read(master.get_ref().as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => {
                    if out
                        .send(Bytes::from(encode(&Frame::Data(buf[..n].to_vec()))))
                        .await
                        .is_err()
                    {
                        input_task.abort();
                        return;
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                _ => break,
            }
        }
        let code = match exited {
            Some(c) => c,
            None => exit.await.map(|e| e.code).unwrap_or(-1),
        };
        input_task.abort();
        let _ = out.send(Bytes::from(encode(&Frame::Exit(code)))).await;
    });
    Ok(())
}
