//! Terminal sessions that outlive the request that opened them, for clients whose
//! terminal protocol is a series of HTTP calls rather than one WebSocket (Podflare's:
//! a long-lived NDJSON stream, then input, resize, kill, read and attach calls that
//! name the session).
//!
//! A session is a terminal of [`forkbox_core::Manager::pty`] whose output a pump task
//! keeps in a ring of the last [`RING`] bytes, addressed by byte offset (`seq`); any
//! number of readers follow it from an offset, and a reader that falls more than the
//! ring behind skips ahead (told how much it missed). The session ends when its process
//! exits, is killed, or the sandbox goes; an ended session keeps its output and exit
//! code until its room is needed. At most [`MAX_SESSIONS`] sessions (live or ended) are
//! kept by the server, at most [`MAX_LIVE_PER_SANDBOX`] live per sandbox; a live one
//! keeps its sandbox from idling out, as forkbox's own terminal does.

use bytes::Bytes;
use forkbox_core::{ByteStream, CoreError, Manager, SandboxRef};
use forkbox_types::agent::PtyRequest;
use forkbox_types::pty::{encode, Decoder, Frame};
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Output kept per session (the most recent bytes).
pub const RING: usize = 1 << 20;
/// Sessions (live or ended) kept by the server.
pub const MAX_SESSIONS: usize = 256;
/// Live sessions per sandbox.
pub const MAX_LIVE_PER_SANDBOX: usize = 16;
/// Largest piece a follower is handed at once.
const PIECE: usize = 64 * 1024;

/// Every session of the server, by id.
#[derive(Clone, Default)]
pub struct Terminals {
    inner: Arc<Mutex<HashMap<String, Arc<Session>>>>,
}

/// How a terminal is opened.
pub struct Open {
    pub req: PtyRequest,
    /// What `list` shows as the session's command.
    pub label: String,
    /// Killed after this long, when set.
    pub timeout: Option<Duration>,
}

pub struct Session {
    pub id: String,
    pub sandbox: String,
    pub label: String,
    pub created_at_ms: u64,
    input: mpsc::Sender<Result<Bytes, std::io::Error>>,
    out: Mutex<Output>,
    /// Bumped on every change of `out` (followers wait on it).
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Output {
    ring: VecDeque<u8>,
    /// Offset of `ring[0]` in everything the terminal wrote.
    start: u64,
    exit: Option<i32>,
    /// Why the session ended without its process's exit status.
    lost: Option<String>,
}

impl Output {
    fn end(&self) -> u64 {
        self.start + self.ring.len() as u64
    }
}

/// What a reader gets from `from` on.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of `data[0]` (past `from` when the ring no longer had it).
    pub seq: u64,
    pub data: Vec<u8>,
    /// Offset after `data`: where the next read starts.
    pub next: u64,
    /// Bytes between `from` and `seq` that were dropped from the ring.
    pub skipped: u64,
    /// The exit status, once the session ended and `next` is its end.
    pub exit: Option<i32>,
    pub lost: Option<String>,
}

/// One item of a follower's stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Data {
        seq: u64,
        data: Vec<u8>,
    },
    /// The follower was this many bytes behind the ring; they are gone.
    Skipped(u64),
    /// The last item: the process's exit status (-1 if unknown, then `lost` says why).
    End {
        exit: i32,
        lost: Option<String>,
    },
}

impl Terminals {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a terminal in a running sandbox and starts keeping its output.
    pub async fn open(
        &self,
        manager: &Manager,
        sandbox: &SandboxRef,
        open: Open,
    ) -> Result<Arc<Session>, CoreError> {
        let sid = sandbox.id().to_owned();
        self.make_room(&sid)?;
        let (tx, rx) = mpsc::channel(16);
        let input = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
        let out = manager.pty(sandbox, open.req, input).await?;
        let session = Arc::new(Session {
            id: forkbox_core::ids::new("pty"),
            sandbox: sid,
            label: open.label,
            created_at_ms: now_ms(),
            input: tx,
            out: Mutex::new(Output::default()),
            changed: watch::channel(0).0,
        });
        self.lock().insert(session.id.clone(), session.clone());
        tokio::spawn(pump(session.clone(), out));
        if let Some(t) = open.timeout {
            let s = Arc::downgrade(&session);
            tokio::spawn(async move {
                tokio::time::sleep(t).await;
                if let Some(s) = s.upgrade() {
                    let _ = s.send(Frame::Kill).await;
                }
            });
        }
        Ok(session)
    }

    /// Refuses a sixteenth-plus live session of a sandbox; evicts the oldest ended
    /// session when the server keeps its maximum.
    fn make_room(&self, sandbox: &str) -> Result<(), CoreError> {
        let mut map = self.lock();
        let live = map
            .values()
            .filter(|s| s.sandbox == sandbox && !s.ended())
            .count();
        if live >= MAX_LIVE_PER_SANDBOX {
            return Err(CoreError::Quota(format!(
                "a sandbox has at most {MAX_LIVE_PER_SANDBOX} open terminals; kill one first"
            )));
        }
        while map.len() >= MAX_SESSIONS {
            let oldest = map
                .values()
                .filter(|s| s.ended())
                .min_by_key(|s| s.created_at_ms)
                .map(|s| s.id.clone());
            match oldest {
                Some(id) => {
                    map.remove(&id);
                }
                None => {
                    return Err(CoreError::Quota(format!(
                        "this server keeps at most {MAX_SESSIONS} open terminals"
                    )))
                }
            }
        }
        Ok(())
    }

    /// The session `id` of `sandbox`.
    pub fn get(&self, sandbox: &SandboxRef, id: &str) -> Option<Arc<Session>> {
        self.lock()
            .get(id)
            .filter(|s| s.sandbox == sandbox.id())
            .cloned()
    }

    /// The sessions of `sandbox`, oldest first.
    pub fn list(&self, sandbox: &SandboxRef) -> Vec<Arc<Session>> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .filter(|s| s.sandbox == sandbox.id())
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        v
    }
}

impl Session {
    fn out(&self) -> MutexGuard<'_, Output> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ended(&self) -> bool {
        let o = self.out();
        o.exit.is_some() || o.lost.is_some()
    }

    /// The exit status once the process ended.
    pub fn exit_code(&self) -> Option<i32> {
        self.out().exit
    }

    /// Writes a frame (keystrokes, a window size, a kill) to the terminal.
    pub async fn send(&self, frame: Frame) -> Result<(), CoreError> {
        let gone = || CoreError::Conflict("the terminal's process has ended".into());
        if self.ended() {
            return Err(gone());
        }
        self.input
            .send(Ok(Bytes::from(encode(&frame))))
            .await
            .map_err(|_| gone())
    }

    /// Up to `max` bytes from offset `from` on.
    pub fn read(&self, from: u64, max: usize) -> Chunk {
        let o = self.out();
        let end = o.end();
        let seq = from.clamp(o.start, end);
        let skipped = seq.saturating_sub(from);
        let at = (seq - o.start) as usize;
        let n = max.min(o.ring.len() - at);
        let data: Vec<u8> = o.ring.range(at..at + n).copied().collect();
        let next = seq + n as u64;
        let done = next == end;
        Chunk {
            seq,
            data,
            next,
            skipped,
            exit: if done {
                o.exit.or(o.lost.as_ref().map(|_| -1))
            } else {
                None
            },
            lost: if done { o.lost.clone() } else { None },
        }
    }

    /// Like [`Session::read`], waiting up to `wait` for something past `from` (or the
    /// end) when there is nothing yet.
    pub async fn read_wait(&self, from: u64, max: usize, wait: Duration) -> Chunk {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut rx = self.changed.subscribe();
            let c = self.read(from, max);
            if !c.data.is_empty() || c.exit.is_some() || c.skipped > 0 {
                return c;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return c;
            }
        }
    }

    /// Everything from offset `from` on, live, until the session ends.
    pub fn follow(self: Arc<Self>, from: u64) -> BoxStream<'static, Piece> {
        futures_util::stream::unfold((self, from, false), |(s, pos, done)| async move {
            if done {
                return None;
            }
            loop {
                let mut rx = s.changed.subscribe();
                let c = s.read(pos, PIECE);
                if c.skipped > 0 {
                    return Some((Piece::Skipped(c.skipped), (s, c.seq, false)));
                }
                if !c.data.is_empty() {
                    let next = c.next;
                    let piece = Piece::Data {
                        seq: c.seq,
                        data: c.data,
                    };
                    return Some((piece, (s, next, false)));
                }
                if let Some(exit) = c.exit {
                    return Some((Piece::End { exit, lost: c.lost }, (s, pos, true)));
                }
                // The session holds the sender, and the follower holds the session.
                let _ = rx.changed().await;
            }
        })
        .boxed()
    }

    fn append(&self, data: &[u8]) {
        let mut o = self.out();
        o.ring.extend(data);
        let over = o.ring.len().saturating_sub(RING);
        if over > 0 {
            o.ring.drain(..over);
            o.start += over as u64;
        }
        drop(o);
        self.changed.send_modify(|v| *v += 1);
    }

    fn finish(&self, exit: Option<i32>, lost: Option<String>) {
        let mut o = self.out();
        if o.exit.is_none() && o.lost.is_none() {
            o.exit = exit;
            o.lost = lost;
        }
        drop(o);
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Keeps the terminal's output until its exit frame (or the end of the stream).
async fn pump(session: Arc<Session>, mut out: ByteStream) {
    let mut dec = Decoder::default();
    while let Some(Ok(bytes)) = out.next().await {
        dec.push(&bytes);
        loop {
            match dec.next_frame() {
                Ok(Some(Frame::Data(d))) => session.append(&d),
                Ok(Some(Frame::Exit(code))) => return session.finish(Some(code), None),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    return session.finish(None, Some(format!("the terminal's stream broke: {e}")))
                }
            }
        }
    }
    session.finish(
        None,
        Some("the terminal's connection to the sandbox ended (the sandbox ended, was paused, or its agent was lost)".into()),
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Arc<Session> {
        let (tx, _rx) = mpsc::channel(1);
        Arc::new(Session {
            id: "pty-x".into(),
            sandbox: "sbx-x".into(),
            label: "bash".into(),
            created_at_ms: 0,
            input: tx,
            out: Mutex::new(Output::default()),
            changed: watch::channel(0).0,
        })
    }

    #[test]
    fn reads_address_output_by_offset_and_skip_what_the_ring_dropped() {
        let s = session();
        s.append(b"hello ");
        s.append(b"world");
        let c = s.read(0, 100);
        assert_eq!(
            (c.seq, &c.data[..], c.next, c.skipped),
            (0, &b"hello world"[..], 11, 0)
        );
        assert_eq!(c.exit, None);
        assert_eq!(s.read(6, 3).data, b"wor");
        // Past the end reads nothing from the end.
        let c = s.read(99, 10);
        assert_eq!((c.seq, c.data.len()), (11, 0));
        s.append(&vec![b'x'; RING]);
        let c = s.read(0, 4);
        assert_eq!((c.seq, c.skipped, &c.data[..]), (11, 11, &b"xxxx"[..]));
        s.finish(Some(3), None);
        let end = 11 + RING as u64;
        assert_eq!(s.read(end, 10).exit, Some(3));
        assert_eq!(s.read(end - 1, 10).exit, Some(3));
        assert_eq!(s.read(end - 2, 1).exit, None, "not at the end yet");
        assert!(s.ended());
    }

    #[tokio::test]
    async fn a_follower_gets_every_byte_live_then_the_end() {
        let s = session();
        s.append(b"a");
        let mut f = s.clone().follow(0);
        assert_eq!(
            f.next().await,
            Some(Piece::Data {
                seq: 0,
                data: b"a".to_vec()
            })
        );
        let s2 = s.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            s2.append(b"bc");
            s2.finish(None, Some("gone".into()));
        });
        assert_eq!(
            f.next().await,
            Some(Piece::Data {
                seq: 1,
                data: b"bc".to_vec()
            })
        );
        assert_eq!(
            f.next().await,
            Some(Piece::End {
                exit: -1,
                lost: Some("gone".into())
            })
        );
        assert_eq!(f.next().await, None);
        writer.await.unwrap();
        // A late waiter returns at once with the end; an early one waits for data.
        let c = s.read_wait(3, 10, Duration::from_secs(5)).await;
        assert_eq!(c.exit, Some(-1));
    }

    #[tokio::test]
    async fn read_wait_returns_empty_after_its_wait() {
        let s = session();
        let c = s.read_wait(0, 10, Duration::from_millis(30)).await;
        assert_eq!((c.data.len(), c.exit), (0, None));
    }

    #[tokio::test]
    async fn an_ended_session_takes_no_input() {
        let s = session();
        s.finish(Some(0), None);
        assert!(matches!(
            s.send(Frame::Data(b"x".to_vec())).await,
            Err(CoreError::Conflict(_))
        ));
    }
}
