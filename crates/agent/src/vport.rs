//! The agent protocol over a virtio-serial port (the vm runtime's guest agent).
//!
//! A port is one byte stream with no accept: the host side is a Unix socket chardev of
//! QEMU that a host process connects to and may leave and reconnect. The guest kernel
//! says "no host" by returning EOF from `read` (and `EPOLLHUP`, which tokio's readiness
//! tracking treats as final), so the port is driven by two plain threads with `poll(2)`
//! timeouts and bridged to hyper through an in-memory duplex pipe, one HTTP/2
//! connection per host session. The port stays open across sessions: closing it would
//! discard what the host already sent. A read that starts with the HTTP/2 client
//! preface also starts a new session (a restored guest may never see its old host go).

use crate::server::Shared;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long to wait before looking again at a port with no host behind it.
const IDLE: Duration = Duration::from_millis(20);

/// What every new HTTP/2 client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes buffered between the port threads and hyper.
const PIPE: usize = 256 * 1024;

enum Up {
    Data(Vec<u8>),
    /// The host went away after a session had started.
    Hangup,
}

/// Serves the protocol on the port at `path` forever.
pub(crate) async fn serve(path: &Path, shared: Shared) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let fd = Arc::new(OwnedFd::from(file));
    let generation = Arc::new(AtomicU64::new(0));
    let (up_tx, mut up_rx) = tokio::sync::mpsc::channel::<Up>(16);
    let (down_tx, down_rx) = std::sync::mpsc::channel::<(u64, Vec<u8>)>();
    {
        let fd = fd.clone();
        std::thread::Builder::new()
            .name("vport-read".into())
            .spawn(move || read_port(&fd, &up_tx))?;
    }
    // A host counts as present from its first bytes to its hangup.
    let mut visit = None;
    {
        let fd = fd.clone();
        let generation = generation.clone();
        std::thread::Builder::new()
            .name("vport-write".into())
            .spawn(move || write_port(&fd, &down_rx, &generation))?;
    }
    loop {
        let gen = generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (ours, hypers) = tokio::io::duplex(PIPE);
        let (mut from_hyper, mut to_hyper) = tokio::io::split(ours);
        let mut conn = tokio::spawn(crate::server::serve_connection(shared.clone(), hypers));
        let down_tx = down_tx.clone();
        let down = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from_hyper.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if down_tx.send((gen, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        loop {
            tokio::select! {
                _ = &mut conn => break,
                m = up_rx.recv() => match m {
                    Some(Up::Data(d)) => {
                        if visit.is_none() {
                            visit = Some(shared.presence.visit());
                        }
                        if to_hyper.write_all(&d).await.is_err() {
                            break;
                        }
                    }
                    Some(Up::Hangup) => {
                        visit = None;
                        break;
                    }
                    None => {
                        conn.abort();
                        down.abort();
                        return Err(std::io::Error::other("the port reader stopped"));
                    }
                },
            }
        }
        conn.abort();
        down.abort();
    }
}

fn poll_for(fd: &OwnedFd, what: PollFlags, wait: Duration) {
    let mut fds = [PollFd::new(fd.as_fd(), what)];
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    let _ = nix::poll::poll(&mut fds, PollTimeout::from(ms));
}

/// Reads the port forever, passing data up and a hangup when the host leaves.
fn read_port(fd: &OwnedFd, up: &tokio::sync::mpsc::Sender<Up>) {
    use std::os::fd::AsRawFd as _;
    let mut buf = vec![0u8; 64 * 1024];
    let mut session = false;
    loop {
        poll_for(fd, PollFlags::POLLIN, Duration::from_secs(1));
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => {
                // No host connected (the guest's view of a closed chardev).
                if std::mem::take(&mut session) && up.blocking_send(Up::Hangup).is_err() {
                    return;
                }
                std::thread::sleep(IDLE);
            }
            Ok(n) => {
                // A new host (e.g. the QEMU a hibernated or snapshotted guest was restored
                // in) may arrive without the guest ever seeing the old one leave: its
                // preface ends the old session rather than being read as garbage by it.
                if std::mem::replace(&mut session, true)
                    && buf[..n].starts_with(PREFACE)
                    && up.blocking_send(Up::Hangup).is_err()
                {
                    return;
                }
                if up.blocking_send(Up::Data(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("forkbox-agent: read port: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Writes what hyper sends, dropping what belongs to an ended session.
fn write_port(
    fd: &OwnedFd,
    down: &std::sync::mpsc::Receiver<(u64, Vec<u8>)>,
    generation: &AtomicU64,
) {
    while let Ok((gen, data)) = down.recv() {
        let mut off = 0;
        while off < data.len() && generation.load(Ordering::SeqCst) == gen {
            match nix::unistd::write(fd, &data[off..]) {
                Ok(n) => off += n,
                Err(Errno::EAGAIN) => poll_for(fd, PollFlags::POLLOUT, IDLE),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    eprintln!("forkbox-agent: write port: {e}");
                    std::thread::sleep(IDLE);
                    break;
                }
            }
        }
    }
}
