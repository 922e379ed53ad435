//! The guest's console, kept to a bounded size on the host.
//!
//! QEMU does not write the console to a file (a guest printing without end would fill
//! the host's disk): its serial port is a socket chardev on a listening socket the
//! server made (`console.sock` in the VM's directory, passed to QEMU as a descriptor,
//! `server=on,wait=on`), which the server has already connected to, so QEMU takes the
//! connection before the guest runs and no early line is lost. The server appends what
//! arrives to `console.log` and, when that reaches [`CAP`], renames it `console.log.1`
//! (replacing the previous one) and starts a new one: at most twice [`CAP`] on disk.
//!
//! While no server is connected (between a server's end and the next one's adoption),
//! QEMU drops what the guest prints, and a slow reader slows only the guest's console
//! (QEMU's UART retries a few times, then drops a byte); the guest never blocks on it.

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt as _;

/// Largest size of `console.log` (and of `console.log.1`, the one before).
pub(crate) const CAP: u64 = 1 << 20;

/// The listening socket QEMU serves the console on, and the server's end, connected.
pub(crate) struct Listening {
    pub(crate) listener: OwnedFd,
    pub(crate) ours: std::os::unix::net::UnixStream,
}

/// Makes `sock` (a stale one is replaced) and connects to it: the connection waits in
/// the backlog until QEMU, given the listener, accepts it at its start.
pub(crate) fn listen(sock: &Path) -> std::io::Result<Listening> {
    match std::fs::remove_file(sock) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(sock)?;
    let ours = std::os::unix::net::UnixStream::connect(sock)?;
    Ok(Listening {
        listener: listener.into(),
        ours,
    })
}

/// Copies what QEMU sends on `stream` into the log at `path` until QEMU closes it.
pub(crate) fn pump(stream: std::os::unix::net::UnixStream, path: PathBuf) {
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "console not read");
            return;
        }
    };
    tokio::spawn(async move {
        let mut stream = stream;
        let mut log = CappedLog::new(path, CAP);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                // A log that cannot be written (a full disk) loses the text, not the
                // guest's console: reading goes on.
                Ok(n) => log.append(&buf[..n]),
            }
        }
    });
}

/// Connects to the console of a QEMU an earlier server started (`sock`) and copies it
/// into `log`, as [`pump`] does.
pub(crate) async fn attach(sock: &Path, log: PathBuf) {
    match tokio::net::UnixStream::connect(sock)
        .await
        .and_then(|s| s.into_std())
    {
        Ok(s) => pump(s, log),
        Err(e) => tracing::warn!(sock = %sock.display(), error = %e, "console not attached"),
    }
}

/// An append-only file of at most `cap` bytes, the one before it renamed `<path>.1`.
struct CappedLog {
    path: PathBuf,
    cap: u64,
    file: Option<(std::fs::File, u64)>,
}

impl CappedLog {
    fn new(path: PathBuf, cap: u64) -> CappedLog {
        CappedLog {
            path,
            cap,
            file: None,
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_append(bytes) {
            tracing::debug!(path = %self.path.display(), error = %e, "console text lost");
            self.file = None;
        }
    }

    fn try_append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let (file, len) = match self.file.take() {
            Some(open) => open,
            None => {
                let f = self.open()?;
                let len = f.metadata()?.len();
                (f, len)
            }
        };
        let (mut file, len) = if len > 0 && len + bytes.len() as u64 > self.cap {
            std::fs::rename(&self.path, rotated(&self.path))?;
            (self.open()?, 0)
        } else {
            (file, len)
        };
        // A chunk over the cap by itself keeps its end.
        let keep = &bytes[bytes.len().saturating_sub(self.cap as usize)..];
        file.write_all(keep)?;
        self.file = Some((file, len + keep.len() as u64));
        Ok(())
    }

    fn open(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
    }
}

/// The name a full log is renamed to.
pub(crate) fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_never_grows_past_its_cap_and_keeps_the_newest_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::new(path.clone(), 1000);
        for i in 0..500 {
            log.append(format!("line {i:05}\n").as_bytes());
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(rotated(&path)).unwrap();
        assert!(now.len() <= 1000 && before.len() <= 1000);
        assert!(now.ends_with("line 00499\n"), "{now}");
        // Nothing lost between the two files.
        let first: usize = before[5..10].parse().unwrap();
        let all: Vec<String> = (before + &now).lines().map(str::to_owned).collect();
        let want: Vec<String> = (first..500).map(|i| format!("line {i:05}")).collect();
        assert_eq!(all, want);
        // Only those two files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_log_left_by_an_earlier_server_is_continued_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "x".repeat(990)).unwrap();
        let mut log = CappedLog::new(path.clone(), 1000);
        log.append(b"short\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap().len(), 996);
        log.append(b"over the cap\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "over the cap\n");
        assert_eq!(std::fs::read_to_string(rotated(&path)).unwrap().len(), 996);
        // One chunk larger than the cap keeps its end.
        log.append(&[b'y'; 2500]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'y'; 1000]);
    }

    #[tokio::test]
    async fn what_the_listener_side_sends_reaches_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let path = dir.path().join("console.log");
        let l = listen(&sock).unwrap();
        let listener = std::os::unix::net::UnixListener::from(l.listener);
        pump(l.ours, path.clone());
        // QEMU's side: accepts the connection that waits in the backlog.
        let (mut qemu, _) = listener.accept().unwrap();
        qemu.write_all(b"[    0.000000] Linux version\n").unwrap();
        drop(qemu);
        for _ in 0..200 {
            if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("Linux version")) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "[    0.000000] Linux version\n"
        );
        // A later server attaches by the socket's name.
        attach(&sock, path.clone()).await;
        let (mut qemu, _) = listener.accept().unwrap();
        qemu.write_all(b"again\n").unwrap();
        drop(qemu);
        for _ in 0..200 {
            if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("again")) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("again\n"));
    }
}
