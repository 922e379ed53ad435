//! Persistent REPL kernels, one per language, started on first use through the zygote
//! (so they run exactly as unprivileged as commands).
//!
//! A kernel is an interpreter running a small driver (`kernels/*`) that reads cells,
//! NUL-terminated, from its fd 3 (a socketpair with the agent) and answers each with
//! `"<status>\n"` once the cell is done and its output flushed. Output flows through the
//! kernel's own stdout/stderr pipes; everything in them when the status arrives belongs
//! to that cell. One cell runs at a time per kernel; other calls wait their turn.
//!
//! The Python driver also forks (see `fork`): its messages start with a kind byte, `c`
//! for a cell and `f` for a fork, and a fork child's agent adopts the copy that arrives
//! on its adopt socket (`adopt`).

use crate::exec::{command_env, line, pipe_pair, Context};
use crate::lines::LineSplitter;
use crate::reaper::Exit;
use crate::zygote;
use bytes::Bytes;
use forkbox_types::agent::{AgentEvent, ForkChild, ForkReply, Language};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

const PYTHON: &str = include_str!("../kernels/python.py");
const JAVASCRIPT: &str = include_str!("../kernels/javascript.js");
const BASH: &str = include_str!("../kernels/bash.sh");

/// How long an interrupted cell may take to stop before its kernel is restarted.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

fn argv(lang: Language) -> Vec<String> {
    let v: &[&str] = match lang {
        Language::Python => &["/usr/bin/python3", "-u", "-c", PYTHON],
        Language::Javascript => &["/usr/bin/node", "-e", JAVASCRIPT],
        Language::Bash => &["/bin/bash", "--norc", "--noprofile", "-c", BASH],
    };
    v.iter().map(|s| s.to_string()).collect()
}

pub struct Kernel {
    pid: i32,
    ctl: tokio::net::UnixStream,
    out: pipe::Receiver,
    err: pipe::Receiver,
    exit: tokio::sync::oneshot::Receiver<Exit>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Kernel>>>;

/// Exclusive hold on one language's kernel slot.
pub type SlotGuard = tokio::sync::OwnedMutexGuard<Option<Kernel>>;

/// The carry helper (`forkbox-agent carry`, carry.rs) of one fork, started and holding
/// the REPL before the REPL is asked to fork.
struct CarryHelper {
    pid: i32,
    lines: mpsc::UnboundedReceiver<String>,
}

impl CarryHelper {
    async fn start(repl: i32, blob_ino: u64, inos: &[u64]) -> Result<CarryHelper, String> {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new("/proc/self/exe")
            .arg("carry")
            .arg(repl.to_string())
            .arg(blob_ino.to_string())
            .args(inos.iter().map(u64::to_string))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("start the carry helper: {e}"))?;
        let pid = child.id() as i32;
        let out = child
            .stdout
            .take()
            .ok_or("the carry helper has no stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        // Not waited for: PID 1's reaper collects it.
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut helper = CarryHelper { pid, lines };
        match tokio::time::timeout(Duration::from_secs(10), helper.lines.recv()).await {
            Ok(Some(l)) if l == "ready" => Ok(helper),
            Ok(Some(l)) => {
                helper.kill();
                Err(format!("carry helper: {l}"))
            }
            _ => {
                helper.kill();
                Err("the carry helper did not start".into())
            }
        }
    }

    /// Its verdict per child (`None`: carried), once it is done.
    async fn verdicts(mut self, n: usize) -> Vec<Option<String>> {
        let mut v = vec![Some("the carry helper stopped early".to_owned()); n];
        while let Ok(Some(l)) =
            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
        {
            if l == "done" {
                break;
            }
            let mut parts = l.splitn(3, ' ');
            let (Some(i), Some(what)) = (
                parts.next().and_then(|i| i.parse::<usize>().ok()),
                parts.next(),
            ) else {
                continue;
            };
            if let Some(slot) = v.get_mut(i) {
                *slot = match what {
                    "ok" => None,
                    _ => Some(parts.next().unwrap_or("carry failed").to_owned()),
                };
            }
        }
        v
    }

    /// Ends it (its traced copies die with it).
    fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// How long the parent's kernel may take to fork into every child.
const FORK_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Default)]
pub struct Kernels {
    slots: Arc<Mutex<HashMap<Language, Slot>>>,
}

async fn start(ctx: &Context, lang: Language) -> Result<Kernel, String> {
    let (out_r, out_w) = pipe_pair().map_err(|e| e.to_string())?;
    let (err_r, err_w) = pipe_pair().map_err(|e| e.to_string())?;
    let (mine, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    mine.set_nonblocking(true).map_err(|e| e.to_string())?;
    let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
    let to_rx = |fd: OwnedFd| pipe::Receiver::from_owned_fd(fd).map_err(|e| e.to_string());
    let (out, err) = (to_rx(out_r)?, to_rx(err_r)?);
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("PYTHONUNBUFFERED".to_owned(), "1".to_owned());
    if lang == Language::Python {
        // malloc'd memory on transparent huge pages where the host allows them: a
        // fork (of the REPL, for fork children) then copies a few hundred page-table
        // entries instead of one per 4 KiB page (~2.5 ms instead of ~18 ms for a
        // 200 MB heap here); copy-on-write still copies only the 4 KiB pages written.
        extra.insert(
            "GLIBC_TUNABLES".to_owned(),
            "glibc.malloc.hugetlb=1".to_owned(),
        );
    }
    let (pid, exit) = ctx
        .spawner
        .spawn(zygote::Command {
            argv: argv(lang),
            env: command_env(ctx, &extra),
            cwd: "/root".into(),
            stdio: [OwnedFd::from(null), out_w, err_w],
            extra: Some(OwnedFd::from(theirs)),
            tty: false,
            // The Python driver's fork copies join fork children's namespaces, by the
            // hand of the carry helper (carry.rs, fork-design.md).
            may_setns: lang == Language::Python,
        })
        .await
        .map_err(|e| e.to_string())?;
    let ctl = tokio::net::UnixStream::from_std(mine).map_err(|e| e.to_string())?;
    Ok(Kernel {
        pid,
        ctl,
        out,
        err,
        exit,
    })
}

/// The Python driver's fork reply: per child `x` + its error as hex UTF-8 (`x` alone
/// for success), comma-separated (kernels/python.py imports no json).
fn parse_fork_reply(line: &[u8]) -> Result<Vec<String>, String> {
    let bad = || {
        format!(
            "bad fork reply from the Python kernel: {:?}",
            String::from_utf8_lossy(line)
        )
    };
    if line.is_empty() {
        return Ok(Vec::new());
    }
    line.split(|b| *b == b',')
        .map(|item| {
            let hex = item.strip_prefix(b"x").ok_or_else(bad)?;
            if hex.len() % 2 != 0 {
                return Err(bad());
            }
            let bytes = hex
                .chunks(2)
                .map(|p| {
                    std::str::from_utf8(p)
                        .ok()
                        .and_then(|p| u8::from_str_radix(p, 16).ok())
                        .ok_or_else(bad)
                })
                .collect::<Result<Vec<u8>, String>>()?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
        .collect()
}

/// Accepts the REPL copy of a fork on the adopt socket: it must present `token`; it gets
/// fresh stdout, stderr and control fds and becomes this sandbox's Python kernel.
pub fn adopt(listener: &std::os::unix::net::UnixListener, token: &str) -> Result<Kernel, String> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::io::Read;
    use std::os::fd::AsRawFd;
    loop {
        let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while got.len() <= token.len() {
            match conn.read(&mut b) {
                Ok(1) if b[0] != b'\n' => got.push(b[0]),
                _ => break,
            }
        }
        if got != token.as_bytes() {
            // Not our REPL copy; whoever it was learns nothing.
            continue;
        }
        let pid = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(|e| format!("peer credentials: {e}"))?
            .pid();
        let (out_r, out_w) = pipe_pair().map_err(|e| e.to_string())?;
        let (err_r, err_w) = pipe_pair().map_err(|e| e.to_string())?;
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
        let raw = [out_w.as_raw_fd(), err_w.as_raw_fd(), theirs.as_raw_fd()];
        let iov = [std::io::IoSlice::new(b"ok\n")];
        sendmsg::<()>(
            conn.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| format!("hand fds to the REPL copy: {e}"))?;
        drop((out_w, err_w, theirs));
        mine.set_nonblocking(true).map_err(|e| e.to_string())?;
        return Ok(Kernel {
            pid,
            ctl: tokio::net::UnixStream::from_std(mine).map_err(|e| e.to_string())?,
            out: pipe::Receiver::from_owned_fd(out_r).map_err(|e| e.to_string())?,
            err: pipe::Receiver::from_owned_fd(err_r).map_err(|e| e.to_string())?,
            exit: watch_exit(pid)?,
        });
    }
}

/// Exit notice for a process that is not our child (its code is unknown to us).
fn watch_exit(pid: i32) -> Result<tokio::sync::oneshot::Receiver<Exit>, String> {
    let fd = forkbox_sys::pidfd::open(pid).map_err(|e| format!("pidfd_open {pid}: {e}"))?;
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd for its whole lifetime.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.to_string())?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = afd.readable().await;
        let _ = tx.send(Exit {
            code: 1,
            signal: None,
        });
    });
    Ok(rx)
}

fn signal_group(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
}

/// Reads whatever is already in a pipe without waiting. A plain non-blocking read(2),
/// not tokio's `try_read`, which answers "would block" without reading while the
/// reactor has not yet seen the pipe become readable: bytes the kernel wrote before
/// its status would be left for the next cell.
fn drain(rx: &pipe::Receiver, split: &mut LineSplitter) -> Vec<String> {
    use std::os::fd::AsRawFd as _;
    let mut lines = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match nix::unistd::read(rx.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => lines.extend(split.push(&buf[..n])),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    lines
}

enum End {
    Done(i32),
    Died(Exit),
    Stuck,
}

impl Kernels {
    /// Ends every running kernel (their state is lost); the next cell of a language
    /// starts a new one.
    pub async fn end_all(&self) {
        let slots: Vec<Slot> = match self.slots.lock() {
            Ok(g) => g.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        for slot in slots {
            if let Some(k) = slot.lock().await.take() {
                signal_group(k.pid(), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Waits for and holds the slot of `lang` (a fork child holds Python's until its
    /// kernel has been adopted).
    pub async fn hold(&self, lang: Language) -> SlotGuard {
        self.slot(lang).lock_owned().await
    }

    /// Forks the Python kernel, if one runs, once per child into that child's
    /// namespaces. Waits for a running cell to end first.
    pub async fn fork(&self, children: &[ForkChild]) -> Result<ForkReply, String> {
        let mut guard = self.hold(Language::Python).await;
        let Some(k) = guard.as_mut() else {
            return Ok(ForkReply {
                python: false,
                errors: Vec::new(),
            });
        };
        let mut msg = vec![b'f'];
        for (i, c) in children.iter().enumerate() {
            // The driver splits them by line and reads up to the NUL.
            if c.token.is_empty() || c.token.bytes().any(|b| b == b'\n' || b == 0) {
                return Err("a fork child's adopt token must be one non-empty line".to_owned());
            }
            if i > 0 {
                msg.push(b'\n');
            }
            msg.extend_from_slice(c.token.as_bytes());
        }
        msg.push(0);
        // The kernel cannot open another sandbox's namespace files (its agent is
        // undumpable); we can, and pass them along, in the order the driver joins them.
        let mut ns_fds: Vec<std::fs::File> =
            Vec::with_capacity(children.len() * crate::carry::NAMESPACES.len());
        let mut inos = Vec::with_capacity(ns_fds.capacity());
        for c in children {
            for (ns, _) in crate::carry::NAMESPACES {
                let f = std::fs::File::open(format!("/proc/{}/ns/{ns}", c.pid))
                    .map_err(|e| format!("open {ns} namespace of pid {}: {e}", c.pid))?;
                inos.push(std::os::unix::fs::MetadataExt::ino(
                    &f.metadata()
                        .map_err(|e| format!("stat {ns} namespace: {e}"))?,
                ));
                ns_fds.push(f);
            }
        }
        // And the sealed code that empties a copy's bounding set in one go.
        let blob = crate::carry::blob_file().map_err(|e| format!("carry code: {e}"))?;
        let blob_ino = std::os::unix::fs::MetadataExt::ino(
            &blob
                .metadata()
                .map_err(|e| format!("stat carry code: {e}"))?,
        );
        ns_fds.push(blob);
        // The REPL cannot join them itself (seccomp); the helper executes the joins in
        // each copy it forks.
        let helper = CarryHelper::start(k.pid, blob_ino, &inos).await?;
        let exchange = async {
            let raw: Vec<i32> = ns_fds.iter().map(|f| f.as_raw_fd()).collect();
            let first = k
                .ctl
                .async_io(tokio::io::Interest::WRITABLE, || {
                    let iov = [std::io::IoSlice::new(&msg)];
                    nix::sys::socket::sendmsg::<()>(
                        k.ctl.as_raw_fd(),
                        &iov,
                        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
                        nix::sys::socket::MsgFlags::empty(),
                        None,
                    )
                    .map_err(std::io::Error::from)
                })
                .await
                .map_err(|e| e.to_string())?;
            k.ctl
                .write_all(&msg[first..])
                .await
                .map_err(|e| e.to_string())?;
            let mut reply = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = k.ctl.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("the Python kernel exited while forking".to_owned());
                }
                reply.extend_from_slice(&buf[..n]);
                if let Some(i) = reply.iter().position(|b| *b == b'\n') {
                    return parse_fork_reply(&reply[..i]);
                }
            }
        };
        let outcome = tokio::time::timeout(FORK_DEADLINE, exchange).await;
        if outcome.is_err() {
            helper.kill();
        }
        let verdicts = helper.verdicts(children.len()).await;
        match outcome {
            Ok(Ok(mut errors)) => {
                // The helper's reason, where it killed a copy, says more than the REPL's
                // "exited with status 9".
                for (e, v) in errors.iter_mut().zip(verdicts) {
                    if let Some(why) = v {
                        *e = format!("carry the REPL: {why}");
                    }
                }
                Ok(ForkReply {
                    python: true,
                    errors,
                })
            }
            Ok(Err(e)) => {
                *guard = None;
                Err(e)
            }
            Err(_) => {
                signal_group(k.pid, nix::sys::signal::Signal::SIGKILL);
                *guard = None;
                Err("the Python kernel did not finish forking in time and was stopped".into())
            }
        }
    }

    fn slot(&self, lang: Language) -> Slot {
        let mut m = match self.slots.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        m.entry(lang).or_default().clone()
    }

    /// Runs one cell, streaming its events into `tx`; always ends with an `exit` event.
    pub async fn run(
        &self,
        ctx: &Context,
        lang: Language,
        code: String,
        timeout: Option<Duration>,
        tx: mpsc::Sender<Bytes>,
    ) {
        let send = |ev: AgentEvent| {
            let tx = tx.clone();
            async move { tx.send(line(&ev)).await.is_ok() }
        };
        let slot = self.slot(lang);
        let mut guard = slot.lock().await;
        if guard.is_none() {
            match start(ctx, lang).await {
                Ok(k) => *guard = Some(k),
                Err(e) => {
                    send(AgentEvent::Stderr {
                        data: format!(
                            "forkbox: could not start the {} kernel: {e}\n",
                            lang.as_str()
                        ),
                    })
                    .await;
                    send(AgentEvent::Exit {
                        code: 127,
                        signal: None,
                        timed_out: false,
                        oom_kills: None,
                    })
                    .await;
                    return;
                }
            }
        }
        let Some(k) = guard.as_mut() else { return };
        let mut cell = Vec::with_capacity(code.len() + 2);
        if lang == Language::Python {
            cell.push(b'c');
        }
        cell.extend_from_slice(code.as_bytes());
        cell.push(0);
        if k.ctl.write_all(&cell).await.is_err() {
            // The kernel is gone; the next call starts a new one.
            *guard = None;
            send(AgentEvent::Stderr {
                data: format!(
                    "forkbox: the {} kernel had exited; its state is lost, run the cell again\n",
                    lang.as_str()
                ),
            })
            .await;
            send(AgentEvent::Exit {
                code: 1,
                signal: None,
                timed_out: false,
                oom_kills: None,
            })
            .await;
            return;
        }
        let (mut out_split, mut err_split) = (LineSplitter::default(), LineSplitter::default());
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        let mut status = Vec::new();
        let mut ctl_buf = [0u8; 64];
        let oom = crate::vm_init::OomWatch::start();
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let mut deadline = timeout
            .map(|t| tokio::time::Instant::now() + t)
            .unwrap_or(far);
        let mut interrupted = false;
        let mut client_gone = false;
        let end = loop {
            tokio::select! {
                r = k.out.read(&mut out_buf) => if let Ok(n @ 1..) = r {
                    for l in out_split.push(&out_buf[..n]) {
                        if !client_gone && !send(AgentEvent::Stdout { data: l }).await { client_gone = true; }
                    }
                },
                r = k.err.read(&mut err_buf) => if let Ok(n @ 1..) = r {
                    for l in err_split.push(&err_buf[..n]) {
                        if !client_gone && !send(AgentEvent::Stderr { data: l }).await { client_gone = true; }
                    }
                },
                r = k.ctl.read(&mut ctl_buf) => match r {
                    Ok(0) | Err(_) => {
                        // The driver closed its end: the kernel is exiting.
                        let exit = tokio::time::timeout(INTERRUPT_GRACE, &mut k.exit).await;
                        break End::Died(match exit { Ok(Ok(e)) => e, _ => Exit { code: 1, signal: None } });
                    }
                    Ok(n) => {
                        status.extend_from_slice(&ctl_buf[..n]);
                        if let Some(i) = status.iter().position(|b| *b == b'\n') {
                            let code = std::str::from_utf8(&status[..i]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1);
                            break End::Done(code);
                        }
                    }
                },
                e = &mut k.exit => break End::Died(e.unwrap_or(Exit { code: 1, signal: None })),
                _ = tokio::time::sleep_until(deadline) => {
                    if interrupted {
                        break End::Stuck;
                    }
                    interrupted = true;
                    signal_group(k.pid, nix::sys::signal::Signal::SIGINT);
                    deadline = tokio::time::Instant::now() + INTERRUPT_GRACE;
                },
                _ = tx.closed(), if !client_gone => {
                    client_gone = true;
                    if !interrupted {
                        interrupted = true;
                        signal_group(k.pid, nix::sys::signal::Signal::SIGINT);
                        deadline = tokio::time::Instant::now() + INTERRUPT_GRACE;
                    }
                },
            }
        };
        // Everything the cell wrote before it finished is already in the pipes.
        let mut tail: Vec<AgentEvent> = Vec::new();
        tail.extend(
            drain(&k.out, &mut out_split)
                .into_iter()
                .map(|data| AgentEvent::Stdout { data }),
        );
        tail.extend(out_split.finish().map(|data| AgentEvent::Stdout { data }));
        tail.extend(
            drain(&k.err, &mut err_split)
                .into_iter()
                .map(|data| AgentEvent::Stderr { data }),
        );
        tail.extend(err_split.finish().map(|data| AgentEvent::Stderr { data }));
        let timed_out = interrupted && timeout.is_some() && !client_gone;
        let code = match end {
            End::Done(code) => code,
            End::Died(exit) => {
                *guard = None;
                tail.push(AgentEvent::Stderr {
                    data: format!(
                        "forkbox: the {} kernel exited ({}); a new one starts on the next call, its state is lost\n",
                        lang.as_str(),
                        match exit.signal { Some(s) => format!("signal {s}"), None => format!("code {}", exit.code) }
                    ),
                });
                exit.code
            }
            End::Stuck => {
                signal_group(k.pid, nix::sys::signal::Signal::SIGKILL);
                *guard = None;
                tail.push(AgentEvent::Stderr {
                    data: format!(
                        "forkbox: the {} kernel did not stop when interrupted and was restarted; its state is lost\n",
                        lang.as_str()
                    ),
                });
                137
            }
        };
        if client_gone {
            return;
        }
        for ev in tail {
            send(ev).await;
        }
        send(AgentEvent::Exit {
            code,
            signal: None,
            timed_out,
            oom_kills: oom.since(),
        })
        .await;
    }
}

impl Kernel {
    /// The kernel's pid in this sandbox.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;

    #[test]
    fn fork_replies_are_read_per_child() {
        assert_eq!(parse_fork_reply(b"x,x").unwrap(), vec!["", ""]);
        assert_eq!(
            parse_fork_reply(b"x,x6e6f20c3a9").unwrap(),
            vec!["".to_owned(), "no é".to_owned()]
        );
        assert!(parse_fork_reply(b"").unwrap().is_empty());
        for bad in [&b"[\"\"]"[..], b"x6", b"xzz", b"x,6e"] {
            assert!(parse_fork_reply(bad).is_err(), "{bad:?}");
        }
    }

    /// The driver, run by the host's python3 with fd 3 a socket as the agent gives it:
    /// a cell's last expression is shown, an exception's traceback goes to stderr
    /// without the driver's frame, and it imports none of the Python modules it used
    /// to (each is memory in every warm REPL).
    #[test]
    fn the_python_driver_runs_cells_and_imports_little() {
        let Ok(py) = which_python() else {
            eprintln!("no python3 on this host; skipped");
            return;
        };
        let (mut mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(py);
        cmd.args(["-u", "-c", PYTHON])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: dup2 is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(theirs);
        let mut status = |cell: &str| {
            mine.write_all(format!("c{cell}\0").as_bytes()).unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while b[0] != b'\n' {
                mine.read_exact(&mut b).unwrap();
                got.push(b[0]);
            }
            String::from_utf8(got).unwrap()
        };
        assert_eq!(status("x = 20\nx + 22"), "0\n");
        assert_eq!(status("1 / 0"), "1\n");
        assert_eq!(
            status("import sys\nprint([m for m in ('ast', 'json', 'socket', 'traceback') if m in sys.modules])"),
            "0\n"
        );
        assert_eq!(status("raise SystemExit(3)"), "3\n");
        drop(mine);
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(stdout, "42\n[]\n", "stderr: {stderr}");
        assert!(
            stderr.starts_with("Traceback (most recent call last):\n  File \"<cell>\", line 1")
                && stderr
                    .trim_end()
                    .ends_with("ZeroDivisionError: division by zero")
                && !stderr.contains("_forkbox_main"),
            "{stderr}"
        );
    }

    fn which_python() -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("python3"))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
