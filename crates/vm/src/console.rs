//! The guest's console, kept to a bounded size and rate on the host.
//!
//! QEMU does not write the console to a file (a guest printing without end would fill
//! the host's disk): its serial port writes to a FIFO in the VM's directory
//! (`console.fifo`, QEMU's `file` chardev, which QEMU makes non-blocking and which has
//! no input side), whose read end the server opened before QEMU starts, so no early
//! line is lost.
//!
//! A thread of the server's per VM ([`Pump`]) appends what arrives to `console.log`
//! and, when that would pass [`CAP`], makes it `console.log.1` (replacing the previous
//! one) and begins a new `console.log`: at most twice [`CAP`] on disk, and
//! `console.log` always exists. It reads at most [`RATE`] bytes a second, at most
//! every [`PERIOD`]: a guest printing more is slowed (the FIFO fills, QEMU's UART waits
//! for it to take the byte, so the guest's writer waits), never the server.
//!
//! While no server reads (between a server's end and the next one's adoption), QEMU's
//! writes fail (`EPIPE`; QEMU ignores `SIGPIPE`) and the UART drops what the guest
//! prints. (A socket chardev was tried first: its UART made every restore of a copy
//! ~40 ms slower under TCG, measured; a write-only file chardev costs nothing.)

use std::io::{Read as _, Seek as _, Write as _};
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
/// Least time between two reads: what arrives meanwhile is read at once (the FIFO
/// holds 64 KiB), so a flood costs the server at most 1000 wakeups a second per VM.
pub(crate) const PERIOD: Duration = Duration::from_millis(1);

/// Makes the FIFO at `fifo` (a stale one is replaced) and opens its read end
/// (non-blocking: no writer yet), for QEMU to open for writing at its start.
pub(crate) fn make_fifo(fifo: &Path) -> std::io::Result<std::fs::File> {
    match std::fs::remove_file(fifo) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)?;
    open_fifo(fifo)
}

fn open_fifo(fifo: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(fifo)?;
    if !f.metadata()?.file_type().is_fifo() {
        return Err(std::io::Error::other(format!(
            "{} is no FIFO",
            fifo.display()
        )));
    }
    Ok(f)
}

/// The thread copying one QEMU's console into its log.
pub(crate) struct Pump {
    stopped: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pump {
    /// Copies what QEMU writes into `fifo` (its read end) into the log at `log` until
    /// the pump is dropped. The log exists from now on.
    pub(crate) fn start(fifo: std::fs::File, log: PathBuf, id: &str) -> std::io::Result<Pump> {
        open_log(&log)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = stopped.clone();
        let thread = std::thread::Builder::new()
            .name(format!("console {id}"))
            .spawn(move || copy(fifo, CappedLog::new(log, CAP), &stop))?;
        Ok(Pump {
            stopped,
            thread: Some(thread),
        })
    }

    /// Reads the console of a QEMU an earlier server started (its FIFO, `fifo`) into
    /// `log`.
    pub(crate) fn attach(fifo: &Path, log: PathBuf, id: &str) -> std::io::Result<Pump> {
        Pump::start(open_fifo(fifo)?, log, id)
    }
}

impl Drop for Pump {
    /// Stops reading and waits for the thread (at most one write of the log): nothing
    /// of the log is made after this, so the VM's directory can go.
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// How long the thread waits while no QEMU holds the FIFO open (before QEMU opened
/// it, after it ended): a read then finds the end at once.
const NO_WRITER: Duration = Duration::from_millis(50);

fn copy(mut fifo: std::fs::File, mut log: CappedLog, stopped: &AtomicBool) {
    use std::os::fd::AsFd as _;
    let mut bucket = Bucket::new(RATE, BURST, Instant::now());
    let mut buf = vec![0u8; 64 * 1024];
    while !stopped.load(Ordering::SeqCst) {
        // Wait for bytes (or a writer's end) a while, then look at `stopped` again.
        let mut fds = [nix::poll::PollFd::new(
            fifo.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
        let wait = match fifo.read(&mut buf) {
            // No writer: QEMU has not opened it yet, or it is gone.
            Ok(0) => NO_WRITER,
            Ok(n) => {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                // A log that cannot be written (a full disk) loses the text, not the
                // guest's console: reading goes on.
                log.append(&buf[..n]);
                // The rate: no read before this (QEMU's UART waits meanwhile).
                bucket.take(n as u64, Instant::now()).max(PERIOD)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Duration::ZERO,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Duration::ZERO,
            Err(_) => return,
        };
        // A stop ends the wait.
        let until = Instant::now() + wait;
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
    fn what_qemu_writes_reaches_the_log_and_a_stopped_pump_makes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("console.fifo");
        let path = dir.path().join("console.log");
        let pump = Pump::start(make_fifo(&fifo).unwrap(), path.clone(), "t").unwrap();
        // The log is there before anything was said.
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        // QEMU's side: opens the FIFO for writing at its start.
        let qemu = || std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let mut q = qemu();
        q.write_all(b"[    0.000000] Linux version\n").unwrap();
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
        // QEMU gone and back (a reader sees the end meanwhile, and goes on).
        drop(q);
        std::thread::sleep(Duration::from_millis(120));
        let mut q = qemu();
        q.write_all(b"back\n").unwrap();
        wait_for("back");
        // Stopped (the VM going away): the thread is gone at once, the log made no
        // more.
        let t = Instant::now();
        drop(pump);
        assert!(t.elapsed() < Duration::from_millis(500));
        std::fs::remove_file(&path).unwrap();
        let _ = q.write_all(b"after the stop\n");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!path.exists());
        // A later server attaches by the FIFO's name, while QEMU still has it open.
        let _pump = Pump::attach(&fifo, path.clone(), "t").unwrap();
        q.write_all(b"again\n").unwrap();
        wait_for("again");
        // Only a FIFO is taken.
        std::fs::write(dir.path().join("plain"), b"").unwrap();
        assert!(Pump::attach(&dir.path().join("plain"), path, "t").is_err());
    }
}
