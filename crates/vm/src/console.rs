//! The guest's console, kept to a bounded size and rate on the host.
//!
//! QEMU does not write the console to a file (a guest printing without end would fill
//! the host's disk): its serial port is a socket chardev on a listening socket the
//! server made (`console.sock` in the VM's directory, passed to QEMU as a descriptor,
//! `server=on,wait=on`), which the server has already connected to, so QEMU takes the
//! connection before the guest runs and no early line is lost.
//!
//! A thread of the server's per VM ([`Pump`]) appends what arrives to `console.log`
//! and, when that would pass [`CAP`], makes it `console.log.1` (replacing the previous
//! one) and begins a new `console.log`: at most twice [`CAP`] on disk, and
//! `console.log` always exists. It reads at most [`RATE`] bytes a second, at most
//! every [`PERIOD`]: a guest printing more is slowed (QEMU's UART waits for the socket
//! to take the byte, so the guest's writer waits), never the server.
//!
//! While no server reads (between a server's end and the next one's adoption), QEMU
//! drops what the guest prints.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkbox_core::runtime::rotated_log;

/// Largest size of `console.log` (and of `console.log.1`, the one before).
pub(crate) const CAP: u64 = 1 << 20;
/// What the server reads of one console at most, per second (after a first
/// [`BURST`]).
pub(crate) const RATE: u64 = 512 << 10;
/// What a quiet console may print at once before [`RATE`] holds.
const BURST: u64 = 256 << 10;
/// Least time between two reads: what arrives meanwhile is read at once, so a flood
/// of one-byte writes costs the server at most 1000 wakeups a second per VM. (QEMU's
/// UART sends each byte in a message of its own, charged to its socket as ~1 KiB: its
/// ~200 KiB send buffer holds a few hundred bytes, so this also bounds such a guest's
/// console to a few hundred KiB a second.)
pub(crate) const PERIOD: Duration = Duration::from_millis(1);

/// The listening socket QEMU serves the console on, and the server's end, connected.
pub(crate) struct Listening {
    pub(crate) listener: OwnedFd,
    pub(crate) ours: UnixStream,
}

/// Makes `sock` (a stale one is replaced) and connects to it: the connection waits in
/// the backlog until QEMU, given the listener, accepts it at its start.
pub(crate) fn listen(sock: &Path) -> std::io::Result<Listening> {
    match std::fs::remove_file(sock) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(sock)?;
    let ours = UnixStream::connect(sock)?;
    Ok(Listening {
        listener: listener.into(),
        ours,
    })
}

/// The thread copying one QEMU's console into its log.
pub(crate) struct Pump {
    stream: UnixStream,
    stopped: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pump {
    /// Copies what QEMU sends on `stream` into the log at `log` until QEMU closes it
    /// or the pump is stopped. The log exists from now on.
    pub(crate) fn start(stream: UnixStream, log: PathBuf, id: &str) -> std::io::Result<Pump> {
        let reader = stream.try_clone()?;
        open_log(&log)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = stopped.clone();
        let thread = std::thread::Builder::new()
            .name(format!("console {id}"))
            .spawn(move || copy(reader, CappedLog::new(log, CAP), &stop))?;
        Ok(Pump {
            stream,
            stopped,
            thread: Some(thread),
        })
    }

    /// Connects to the console of a QEMU an earlier server started (`sock`) and copies
    /// it into `log`.
    pub(crate) fn attach(sock: &Path, log: PathBuf, id: &str) -> std::io::Result<Pump> {
        Pump::start(UnixStream::connect(sock)?, log, id)
    }
}

impl Drop for Pump {
    /// Stops reading and waits for the thread (at most one write of the log): nothing
    /// of the log is made after this, so the VM's directory can go.
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn copy(mut stream: UnixStream, mut log: CappedLog, stopped: &AtomicBool) {
    let mut bucket = Bucket::new(RATE, BURST, Instant::now());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        // A log that cannot be written (a full disk) loses the text, not the guest's
        // console: reading goes on.
        log.append(&buf[..n]);
        // The rate: no read before this (QEMU's UART waits meanwhile); a stop ends
        // the wait.
        let until = Instant::now() + bucket.take(n as u64, Instant::now()).max(PERIOD);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if stopped.load(Ordering::SeqCst) || left.is_zero() {
                break;
            }
            std::thread::park_timeout(left);
        }
    }
}

/// A token bucket: `rate` bytes a second, at most `burst` saved up.
struct Bucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: u64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst as f64,
            at: now,
        }
    }

    /// Takes `n` bytes' worth; how long to wait before the next read.
    fn take(&mut self, n: u64, now: Instant) -> Duration {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate as f64;
        self.tokens = (self.tokens + refill).min(self.burst as f64) - n as f64;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// An append-only file of at most `cap` bytes, the one before it `<path>.1`.
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
                let f = open_log(&self.path)?;
                let len = f.metadata()?.len();
                (f, len)
            }
        };
        let (mut file, len) = if len > 0 && len + bytes.len() as u64 > self.cap {
            (self.rotate()?, 0)
        } else {
            (file, len)
        };
        // A chunk over the cap by itself keeps its end.
        let keep = &bytes[bytes.len().saturating_sub(self.cap as usize)..];
        file.write_all(keep)?;
        self.file = Some((file, len + keep.len() as u64));
        Ok(())
    }

    /// Makes the full log `<path>.1` and an empty one its name, with no moment at which
    /// the name is missing (a reader opening it meanwhile finds one or the other).
    fn rotate(&self) -> std::io::Result<std::fs::File> {
        let old = rotated_log(&self.path);
        let mut new = self.path.as_os_str().to_owned();
        new.push(".new");
        let new = PathBuf::from(new);
        match std::fs::remove_file(&old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::hard_link(&self.path, &old)?;
        let _ = std::fs::remove_file(&new);
        let file = open_log(&new)?;
        std::fs::rename(&new, &self.path)?;
        Ok(file)
    }
}

/// The last `max` bytes of the log at `path`, the one before it included when the
/// current one is shorter.
pub(crate) fn tail(path: &Path, max: u64) -> Vec<u8> {
    let last = |p: &Path, max: u64| -> Vec<u8> {
        let read = || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(p)?;
            let len = f.metadata()?.len();
            f.seek(std::io::SeekFrom::Start(len.saturating_sub(max)))?;
            let mut buf = Vec::new();
            f.take(max).read_to_end(&mut buf)?;
            Ok(buf)
        };
        read().unwrap_or_default()
    };
    let now = last(path, max);
    let mut text = match max.checked_sub(now.len() as u64) {
        Some(room) if room > 0 => last(&rotated_log(path), room),
        _ => Vec::new(),
    };
    text.extend_from_slice(&now);
    text
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
        let before = std::fs::read_to_string(rotated_log(&path)).unwrap();
        assert!(now.len() <= 1000 && before.len() <= 1000);
        assert!(now.ends_with("line 00499\n"), "{now}");
        // Nothing lost between the two files.
        let both = before.clone() + &now;
        let first: usize = before[5..10].parse().unwrap();
        let all: Vec<&str> = both.lines().collect();
        let want: Vec<String> = (first..500).map(|i| format!("line {i:05}")).collect();
        assert_eq!(all, want);
        // Only those two files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // The tail reads across both.
        let t = String::from_utf8(tail(&path, 1500)).unwrap();
        assert_eq!(t, both[both.len().saturating_sub(1500)..]);
        assert_eq!(
            String::from_utf8(tail(&path, 10)).unwrap(),
            "line 00499\n"[1..]
        );
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
        assert_eq!(
            std::fs::read_to_string(rotated_log(&path)).unwrap().len(),
            996
        );
        // One chunk larger than the cap keeps its end.
        log.append(&[b'y'; 2500]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'y'; 1000]);
    }

    #[test]
    fn the_bucket_holds_the_rate_after_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 500, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO);
        // 250 bytes over: a quarter of a second.
        assert_eq!(b.take(250, t0), Duration::from_millis(250));
        // After that wait, even again.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(b.take(0, t1), Duration::ZERO);
        // A long quiet saves up no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.take(500, t2), Duration::ZERO);
        assert!(b.take(1, t2) > Duration::ZERO);
    }

    #[test]
    fn what_the_listener_side_sends_reaches_the_log_and_a_stopped_pump_makes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let path = dir.path().join("console.log");
        let l = listen(&sock).unwrap();
        let listener = std::os::unix::net::UnixListener::from(l.listener);
        let pump = Pump::start(l.ours, path.clone(), "t").unwrap();
        // The log is there before anything was said.
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        // QEMU's side: accepts the connection that waits in the backlog.
        let (mut qemu, _) = listener.accept().unwrap();
        qemu.write_all(b"[    0.000000] Linux version\n").unwrap();
        let wait_for = |want: &str| {
            for _ in 0..200 {
                if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(want)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("{want:?} not in the log");
        };
        wait_for("Linux version");
        // Stopped (the VM going away): the thread is gone, the log made no more.
        drop(pump);
        std::fs::remove_file(&path).unwrap();
        let _ = qemu.write_all(b"after the stop\n");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!path.exists());
        drop(qemu);
        // A later server attaches by the socket's name.
        let pump = Pump::attach(&sock, path.clone(), "t").unwrap();
        let (mut qemu, _) = listener.accept().unwrap();
        qemu.write_all(b"again\n").unwrap();
        wait_for("again");
        // QEMU gone: the thread ends by itself.
        drop(qemu);
        let t = std::time::Instant::now();
        drop(pump);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
