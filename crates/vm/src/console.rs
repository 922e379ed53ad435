//! The guest's console, kept to a bounded size and rate on the host.
//!
//! QEMU does not write the console to a file (a guest printing without end would fill
//! the host's disk): its serial port writes to a FIFO in the VM's directory
//! (`console.fifo`; QEMU's `file` chardev, which has no input side, on the FIFO's write
//! end the server opened and hands QEMU with `-add-fd`), whose read end the server
//! holds from before QEMU starts, so no early line is lost.
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

use std::io::{Read as _, Write as _};
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
/// holds 64 KiB, 6.4 MB a second at this pace, far over [`RATE`]), so a flood costs
/// the server at most 100 wakeups a second per VM.
pub(crate) const PERIOD: Duration = Duration::from_millis(10);

/// A console FIFO: the server's read end, and the write end QEMU is given.
pub(crate) struct Fifo {
    pub(crate) read: std::fs::File,
    pub(crate) write: std::os::fd::OwnedFd,
}

/// Makes the FIFO at `fifo` (a stale one is replaced) and opens both its ends (both
/// non-blocking): QEMU gets the write end as a descriptor (`-add-fd`), so it opens no
/// path and never waits for a reader.
pub(crate) fn make_fifo(fifo: &Path) -> std::io::Result<Fifo> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::remove_file(fifo) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)?;
    let read = open_fifo(fifo)?;
    let write = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(fifo)?
        .into();
    Ok(Fifo { read, write })
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
    /// Closed to wake the thread (its other end is in the thread's poll).
    wake: Option<std::os::fd::OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pump {
    /// Copies what is written into the FIFO whose read end is `fifo` into the log at
    /// `log`, until every writer closed it (QEMU ended) or the pump is dropped. The
    /// log exists from now on.
    pub(crate) fn start(fifo: std::fs::File, log: PathBuf, id: &str) -> std::io::Result<Pump> {
        open_log(&log)?;
        let (woken, wake) = nix::unistd::pipe().map_err(std::io::Error::from)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = stopped.clone();
        let thread = std::thread::Builder::new()
            .name(format!("console {id}"))
            .spawn(move || copy(fifo, woken, CappedLog::new(log, CAP), &stop))?;
        Ok(Pump {
            stopped,
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Reads the console of a QEMU an earlier server started (its FIFO, `fifo`) into
    /// `log`.
    pub(crate) fn attach(fifo: &Path, log: PathBuf, id: &str) -> std::io::Result<Pump> {
        Pump::start(open_fifo(fifo)?, log, id)
    }

    /// Whether the thread has ended (its QEMU closed the FIFO).
    #[cfg(test)]
    fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Pump {
    /// Stops reading and waits for the thread (at most one write of the log, it is
    /// woken at once): nothing of the log is made after this, so the VM's directory
    /// can go.
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn copy(
    mut fifo: std::fs::File,
    woken: std::os::fd::OwnedFd,
    mut log: CappedLog,
    stopped: &AtomicBool,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd as _;
    let mut bucket = Bucket::new(RATE, BURST, Instant::now());
    let mut buf = vec![0u8; 64 * 1024];
    while !stopped.load(Ordering::SeqCst) {
        // Bytes, QEMU's end or a stop (the wake pipe closed).
        let mut fds = [
            PollFd::new(fifo.as_fd(), PollFlags::POLLIN),
            PollFd::new(woken.as_fd(), PollFlags::POLLIN),
        ];
        let _ = nix::poll::poll(&mut fds, PollTimeout::NONE);
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        let n = match fifo.read(&mut buf) {
            // Every writer gone: QEMU ended (a new QEMU gets a new FIFO).
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        // A log that cannot be written (a full disk) loses the text, not the guest's
        // console: reading goes on.
        log.append(&buf[..n]);
        // The rate: no read before this (the FIFO fills, QEMU's UART waits); a stop
        // ends the wait.
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
        let ends = make_fifo(&fifo).unwrap();
        let pump = Pump::start(ends.read, path.clone(), "t").unwrap();
        // The log is there before anything was said; a quiet FIFO keeps the thread.
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        std::thread::sleep(Duration::from_millis(150));
        assert!(!pump.ended());
        // QEMU's side: the write end it was given.
        let mut qemu = std::fs::File::from(ends.write);
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
        // Stopped (the VM going away) while QEMU is quiet: at once, and the log is made
        // no more.
        let t = Instant::now();
        drop(pump);
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        std::fs::remove_file(&path).unwrap();
        let _ = qemu.write_all(b"after the stop\n");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!path.exists());
        // A later server opens the FIFO again while QEMU still has its end.
        let pump = Pump::attach(&fifo, path.clone(), "t").unwrap();
        qemu.write_all(b"again\n").unwrap();
        wait_for("again");
        // QEMU gone: the thread ends by itself.
        drop(qemu);
        for _ in 0..100 {
            if pump.ended() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(pump.ended());
        // Only a FIFO is taken.
        std::fs::write(dir.path().join("plain"), b"").unwrap();
        assert!(Pump::attach(&dir.path().join("plain"), path, "t").is_err());
    }
}
