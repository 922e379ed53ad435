//! The agent protocol server: HTTP/2 over the inherited listening socket, one task per
//! connection, one stream per call (see `forkbox_types::agent`).

use crate::exec::{self, Context};
use bytes::Bytes;
use forkbox_types::agent::{
    AdoptReply, AdoptRequest, ErrorBody, ExecRequest, ForkRequest, Health, Language, PtyRequest,
    Refusal, RunCodeRequest, PROTOCOL_VERSION,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

type Body = BoxBody<Bytes, Infallible>;

/// Largest request body the agent accepts.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Abstract socket name (in the sandbox's network namespace) a fork child's agent
/// receives its Python kernel on.
pub const ADOPT_SOCKET: &[u8] = b"forkbox-adopt";

/// How long a fork child's agent waits for its REPL copy before giving up on it.
const ADOPT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// A fork child's adopt socket and the token its REPL copy must present.
pub struct Adopt {
    pub listener: std::os::unix::net::UnixListener,
    pub token: String,
}

/// Where a fork child stands with its REPL copy: `None` while waiting, then the kernel's
/// pid (or `None` inside when it never came).
type AdoptState = tokio::sync::watch::Receiver<Option<Option<i32>>>;

#[derive(Clone)]
pub(crate) struct Shared {
    ctx: Context,
    adopt: Option<(AdoptState, Arc<tokio::sync::Notify>)>,
    /// Open server connections (the dead-man's switch, `deadman.rs`).
    pub(crate) presence: crate::deadman::Presence,
}

/// How the agent runs, besides where it listens.
#[derive(Default)]
pub struct Options {
    /// Environment every command starts with.
    pub env: BTreeMap<String, String>,
    /// A fork child's REPL copy to adopt.
    pub adopt: Option<Adopt>,
    /// End the sandbox after this long without a server connection (`None`: never).
    pub orphan_grace: Option<std::time::Duration>,
}

/// Where the agent serves the protocol.
pub enum Endpoint {
    /// An inherited listening Unix socket (jail): one connection per accept.
    Unix(OwnedFd),
    /// A virtio-serial port device (vm): one connection at a time over the port, a new
    /// one whenever the host reconnects.
    Port(std::path::PathBuf),
}

/// Runs the agent until the process is killed. Must be called single-threaded: it
/// forks the zygote before starting the async runtime.
pub fn run(listener: OwnedFd, opts: Options) -> ExitCode {
    run_on(Endpoint::Unix(listener), opts)
}

/// [`run`] on any endpoint.
pub fn run_on(endpoint: Endpoint, opts: Options) -> ExitCode {
    let zygote = match forkbox_sys::seccomp::compile()
        .map_err(|e| e.to_string())
        .and_then(|f| crate::zygote::fork_zygote(&f).map_err(|e| e.to_string()))
    {
        Ok(z) => z,
        Err(e) => {
            eprintln!("forkbox-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("forkbox-agent: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(endpoint, zygote, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkbox-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(endpoint: Endpoint, zygote: OwnedFd, opts: Options) -> std::io::Result<()> {
    // PID 1 reaps orphans; commands are the zygote's children and reaped there.
    crate::reaper::start()?;
    let ctx = Context {
        spawner: crate::zygote::Spawner::new(zygote)?,
        env: Arc::new(std::sync::RwLock::new(Arc::new(opts.env))),
        kernels: Default::default(),
        bg: Default::default(),
        egress: Default::default(),
    };
    let adopt = match opts.adopt {
        Some(a) => Some(start_adopt(&ctx, a).await),
        None => None,
    };
    let presence = crate::deadman::Presence::new();
    let vm = matches!(endpoint, Endpoint::Port(_));
    if let Some(grace) = opts.orphan_grace {
        let p = presence.clone();
        tokio::spawn(async move {
            p.abandoned(grace).await;
            crate::deadman::end_sandbox(grace, vm);
        });
    }
    let shared = Shared {
        ctx,
        adopt,
        presence,
    };
    eprintln!(
        "forkbox-agent {}: ready (pid {}, protocol {PROTOCOL_VERSION})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    let listener = match endpoint {
        Endpoint::Unix(fd) => fd,
        Endpoint::Port(path) => return crate::vport::serve(&path, shared).await,
    };
    let std_listener = std::os::unix::net::UnixListener::from(listener);
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(std_listener)?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("forkbox-agent: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let visit = shared.presence.visit();
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(shared, stream).await;
            drop(visit);
        });
    }
}

/// Serves the protocol on one connection until it ends.
pub(crate) async fn serve_connection<S>(shared: Shared, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        eprintln!("forkbox-agent: connection: {e}");
    }
}

/// Holds the Python slot (so no fresh kernel starts) until the REPL copy is adopted,
/// the host says none is coming, or patience runs out.
async fn start_adopt(ctx: &Context, a: Adopt) -> (AdoptState, Arc<tokio::sync::Notify>) {
    let mut guard = ctx.kernels.hold(Language::Python).await;
    let (tx, rx) = tokio::sync::watch::channel(None);
    let cancel = Arc::new(tokio::sync::Notify::new());
    let stop = cancel.clone();
    tokio::spawn(async move {
        let Adopt { listener, token } = a;
        let accept = tokio::task::spawn_blocking(move || crate::kernels::adopt(&listener, &token));
        let outcome = tokio::select! {
            r = accept => match r {
                Ok(Ok(k)) => {
                    let pid = k.pid();
                    *guard = Some(k);
                    Some(pid)
                }
                Ok(Err(e)) => {
                    eprintln!("forkbox-agent: adopting the REPL copy: {e}");
                    None
                }
                Err(_) => None,
            },
            _ = stop.notified() => None,
            _ = tokio::time::sleep(ADOPT_PATIENCE) => None,
        };
        drop(guard);
        let _ = tx.send(Some(outcome));
    });
    (rx, cancel)
}

/// A command line as the log shows it: one line, at most 200 characters.
fn loggable(cmd: &str) -> String {
    let one: String = cmd
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    if cmd.chars().count() > 200 {
        format!("{one}…")
    } else {
        one
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

/// A refusal of `kind`: its status and an [`ErrorBody`] saying why.
fn refuse(kind: Refusal, msg: &str) -> Response<Body> {
    refuse_about(kind, msg, None)
}

/// A refusal about background command `pid`.
fn refuse_about(kind: Refusal, msg: &str, pid: Option<i32>) -> Response<Body> {
    let body = ErrorBody {
        error: msg.to_owned(),
        kind: Some(kind),
        pid,
    };
    full(
        StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// A write that failed with `e`: a full disk is the sandbox's, anything else the agent's.
fn write_refusal(e: &std::io::Error) -> Refusal {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Refusal::NoSpace,
        _ => Refusal::Failed,
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(refuse(Refusal::Invalid, "unreadable request body")),
    }
}

/// The request body as JSON of type `T`, or the 400 answer saying why not.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    what: &str,
) -> Result<T, Response<Body>> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body).map_err(|e| refuse(Refusal::Invalid, &format!("{what}: {e}")))
}

/// A streamed NDJSON response fed by `rx`, coalesced (see [`Coalesce`]).
fn ndjson(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = Coalesce { rx, done: false }.map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Largest body chunk [`Coalesce`] builds from several ready event lines.
const COALESCE_MAX: usize = 64 * 1024;
/// Smallest body chunk: HTTP/2 peers (the host's h2 among them) treat a flood of DATA
/// frames under 256 bytes as abuse and close the connection, so shorter chunks are padded
/// with blank lines, which NDJSON readers skip.
const MIN_CHUNK: usize = 256;

/// Turns a channel of NDJSON lines into body chunks: every line already waiting is joined
/// into one chunk (up to [`COALESCE_MAX`]), and a chunk is never shorter than
/// [`MIN_CHUNK`]. A fast producer behind a slow reader thus sends few large frames
/// instead of one tiny frame per output line; a lone line still goes out at once.
struct Coalesce {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    done: bool,
}

impl tokio_stream::Stream for Coalesce {
    type Item = Bytes;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let first = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(b)) => b,
        };
        let mut chunk: Option<bytes::BytesMut> = None;
        let mut len = first.len();
        while len < COALESCE_MAX {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => {
                    let c = chunk.get_or_insert_with(|| bytes::BytesMut::from(&first[..]));
                    c.extend_from_slice(&b);
                    len = c.len();
                }
                Poll::Ready(None) => {
                    self.done = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        let out = match chunk {
            Some(c) => c,
            None if first.len() >= MIN_CHUNK => return Poll::Ready(Some(first)),
            None => bytes::BytesMut::from(&first[..]),
        };
        Poll::Ready(Some(pad(out)))
    }
}

/// `chunk`, padded with newlines up to [`MIN_CHUNK`] bytes.
fn pad(mut chunk: bytes::BytesMut) -> Bytes {
    if chunk.len() < MIN_CHUNK {
        chunk.resize(MIN_CHUNK, b'\n');
    }
    chunk.freeze()
}

fn json_reply<T: serde::Serialize>(v: &T) -> Response<Body> {
    full(StatusCode::OK, serde_json::to_vec(v).unwrap_or_default())
}

/// The `path` query parameter.
fn query_path(req: &Request<Incoming>) -> Option<String> {
    query_arg(req, "path")
}

fn file_error(e: &crate::files::FileError) -> Response<Body> {
    refuse(e.refusal(), &e.to_string())
}

/// A query parameter.
fn query_arg(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn bg_error(e: &crate::bg::BgError) -> Response<Body> {
    use crate::bg::BgError;
    match e {
        BgError::NoSuchPid(pid) => refuse_about(Refusal::NoProcess, &e.to_string(), Some(*pid)),
        BgError::Exited(_) | BgError::StdinClosed(_) | BgError::TooMany => {
            refuse(Refusal::Conflict, &e.to_string())
        }
        BgError::Spawn(crate::exec::SpawnError::NoCwd(_)) => {
            refuse(Refusal::Invalid, &e.to_string())
        }
        BgError::Spawn(_) | BgError::Io(_) => refuse(Refusal::Failed, &e.to_string()),
    }
}

/// Background command routes (`/bg/...`).
async fn background(ctx: Context, req: Request<Incoming>) -> Response<Body> {
    let pid = query_arg(&req, "pid").and_then(|p| p.parse::<i32>().ok());
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/bg/start") => {
            let er: ExecRequest = match json_body(req, "invalid exec request").await {
                Ok(v) => v,
                Err(r) => return r,
            };
            match ctx.bg.start(&ctx, &er).await {
                Ok(info) => json_reply(&info),
                Err(e) => bg_error(&e),
            }
        }
        (Method::GET, "/bg/list") => json_reply(&ctx.bg.list()),
        (Method::POST, "/bg/signal") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match serde_json::from_slice::<forkbox_types::agent::BgSignal>(&body) {
                Ok(s) => match ctx.bg.signal(s.pid, s.signal) {
                    Ok(()) => json_reply(&serde_json::json!({})),
                    Err(e) => bg_error(&e),
                },
                Err(e) => refuse(Refusal::Invalid, &format!("invalid signal request: {e}")),
            }
        }
        (_, _) if pid.is_none() => refuse(Refusal::Invalid, "missing or bad pid"),
        (Method::POST, "/bg/stdin") => {
            let close = query_arg(&req, "close").is_some_and(|v| v == "1" || v == "true");
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match ctx.bg.stdin(pid.unwrap_or_default(), &body, close).await {
                Ok(()) => json_reply(&serde_json::json!({})),
                Err(e) => bg_error(&e),
            }
        }
        (Method::GET, "/bg/wait") => {
            let pid = pid.unwrap_or_default();
            match ctx.bg.wait(pid).await {
                Ok(code) => json_reply(&serde_json::json!({"pid": pid, "exit_code": code})),
                Err(e) => bg_error(&e),
            }
        }
        (Method::GET, "/bg/output") => {
            let follow = query_arg(&req, "follow").is_some_and(|v| v == "1" || v == "true");
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
            match ctx.bg.output(pid.unwrap_or_default(), follow, tx).await {
                Ok(()) => ndjson(rx),
                Err(e) => bg_error(&e),
            }
        }
        _ => refuse(Refusal::Invalid, "no such agent route"),
    }
}

/// `GET /files/read?path=`: the file's bytes, streamed in 256 KiB chunks.
async fn read_file(req: Request<Incoming>) -> Response<Body> {
    let Some(path) = query_path(&req) else {
        return refuse(Refusal::FileInvalid, "missing path");
    };
    let opened = tokio::task::spawn_blocking(move || crate::files::open_read(&path)).await;
    let (file, size) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return file_error(&e),
        Err(e) => return refuse(Refusal::Failed, &e.to_string()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut f = tokio::fs::File::from_std(file);
        loop {
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Bytes::from(buf)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(size));
    r
}

/// `PUT /files/write?path=`: the body, streamed into a temporary sibling that is
/// renamed into place once the body ended cleanly.
async fn write_file(req: Request<Incoming>) -> Response<Body> {
    use tokio::io::AsyncWriteExt;
    let Some(path) = query_path(&req) else {
        return refuse(Refusal::FileInvalid, "missing path");
    };
    let begun = tokio::task::spawn_blocking(move || crate::files::begin_write(&path)).await;
    let up = match begun {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return file_error(&e),
        Err(e) => return refuse(Refusal::Failed, &e.to_string()),
    };
    let mut f = match up.file.try_clone() {
        Ok(f) => tokio::fs::File::from_std(f),
        Err(e) => {
            up.abort();
            return refuse(Refusal::Failed, &e.to_string());
        }
    };
    let mut body = req.into_body();
    let mut size = 0u64;
    let failed = loop {
        match body.frame().await {
            None => break None,
            Some(Err(e)) => break Some((Refusal::Invalid, format!("upload interrupted: {e}"))),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                size += data.len() as u64;
                if let Err(e) = f.write_all(&data).await {
                    break Some((write_refusal(&e), format!("write: {e}")));
                }
            }
        }
    };
    if failed.is_none() {
        if let Err(e) = f.flush().await {
            up.abort();
            return refuse(write_refusal(&e), &format!("write: {e}"));
        }
    }
    drop(f);
    if let Some((kind, msg)) = failed {
        up.abort();
        return refuse(kind, &msg);
    }
    match tokio::task::spawn_blocking(move || up.commit(size)).await {
        Ok(Ok(reply)) => json_reply(&reply),
        Ok(Err(e)) => file_error(&e),
        Err(e) => refuse(Refusal::Failed, &e.to_string()),
    }
}

async fn handle(shared: Shared, req: Request<Incoming>) -> Response<Body> {
    let ctx = shared.ctx.clone();
    if req.uri().path().starts_with("/bg/") {
        return background(ctx, req).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/pty") => {
            let q = |k| query_arg(&req, k);
            let env = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .filter(|(k, _)| k == "env")
                .filter_map(|(_, v)| v.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect();
            let pr = PtyRequest {
                cmd: q("cmd"),
                rows: q("rows").and_then(|v| v.parse().ok()).unwrap_or(24),
                cols: q("cols").and_then(|v| v.parse().ok()).unwrap_or(80),
                cwd: q("cwd"),
                env,
                pipe: q("pipe").as_deref() == Some("1"),
            };
            if pr.cmd.as_deref().is_some_and(|c| c.contains('\0')) {
                return refuse(Refusal::Invalid, "cmd must not contain NUL");
            }
            if let Some(cwd) = pr.cwd.as_deref() {
                if !std::path::Path::new(cwd).is_dir() {
                    return refuse(
                        Refusal::Invalid,
                        &format!("cwd {cwd} is not a directory in the sandbox"),
                    );
                }
            }
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
            match crate::pty::start(&ctx, &pr, req.into_body(), tx).await {
                Ok(()) => {
                    let stream =
                        ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
                    Response::new(BodyExt::boxed(StreamBody::new(stream)))
                }
                Err(e) => refuse(Refusal::Failed, &e),
            }
        }
        (&Method::POST, "/tcp") => {
            let Some(port) = query_arg(&req, "port")
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p > 0)
            else {
                return refuse(Refusal::Invalid, "port must be 1-65535");
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
            match crate::tcp::start(port, req.into_body(), tx).await {
                Ok(()) => {
                    let stream =
                        ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
                    Response::new(BodyExt::boxed(StreamBody::new(stream)))
                }
                Err(e) => refuse(Refusal::PortClosed, &e),
            }
        }
        (&Method::GET, "/ports") => json_reply(&crate::tcp::listening()),
        (&Method::POST, "/volumes/release") => {
            match tokio::task::spawn_blocking(crate::vm_init::release_volumes).await {
                Ok(Ok(())) => json_reply(&serde_json::json!({})),
                Ok(Err(e)) => refuse(Refusal::Failed, &e),
                Err(e) => refuse(Refusal::Failed, &e.to_string()),
            }
        }
        (&Method::POST, "/disk/grow") => {
            let gr: forkbox_types::agent::GrowRequest =
                match json_body(req, "invalid grow request").await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
            match tokio::task::spawn_blocking(move || crate::vm_init::grow_root(gr.bytes)).await {
                Ok(Ok(())) => json_reply(&serde_json::json!({})),
                Ok(Err(e)) => refuse(Refusal::Failed, &e),
                Err(e) => refuse(Refusal::Failed, &e.to_string()),
            }
        }
        (&Method::POST, "/egress/listen") => match ctx.egress.listen().await {
            Ok(()) => json_reply(&serde_json::json!({})),
            Err(e) => refuse(Refusal::Failed, &e),
        },
        (&Method::POST, "/egress/accept") => {
            let Some(conn) = ctx.egress.next().await else {
                return refuse(Refusal::Invalid, "egress is not listening");
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
            crate::tcp::carry(conn, req.into_body(), tx);
            let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        (&Method::GET, "/files/read") => read_file(req).await,
        (&Method::GET, "/files/watch") => {
            let Some(path) = query_path(&req) else {
                return refuse(Refusal::FileInvalid, "missing path");
            };
            let recursive = query_arg(&req, "recursive").is_some_and(|v| v == "1" || v == "true");
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
            match crate::watch::start(&path, recursive, tx) {
                Ok(()) => ndjson(rx),
                Err(e) => file_error(&e),
            }
        }
        (&Method::PUT, "/files/write") => write_file(req).await,
        (&Method::POST, "/files/op") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let op: forkbox_types::agent::FileOp = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return refuse(Refusal::Invalid, &format!("invalid file op: {e}")),
            };
            match tokio::task::spawn_blocking(move || crate::files::op(op)).await {
                Ok(Ok(reply)) => json_reply(&reply),
                Ok(Err(e)) => file_error(&e),
                Err(e) => refuse(Refusal::Failed, &e.to_string()),
            }
        }
        (&Method::POST, "/fork") => {
            let fr: ForkRequest = match json_body(req, "invalid fork request").await {
                Ok(v) => v,
                Err(r) => return r,
            };
            match ctx.kernels.fork(&fr.children).await {
                Ok(reply) => json_reply(&reply),
                Err(e) => refuse(Refusal::Failed, &e),
            }
        }
        (&Method::POST, "/hostname") => {
            let hr: forkbox_types::agent::HostnameRequest =
                match json_body(req, "invalid hostname request").await {
                    Ok(v) => v,
                    Err(r) => return r,
                };
            let h = hr.hostname.as_str();
            let valid = !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !valid {
                return refuse(
                    Refusal::Invalid,
                    "hostname must be 1-64 of a-z, 0-9, '-', '.'",
                );
            }
            if let Err(e) = nix::unistd::sethostname(h) {
                return refuse(Refusal::Failed, &format!("sethostname: {e}"));
            }
            if let Some(hex) = &hr.entropy_hex {
                if let Err(e) = crate::vm_init::reseed(hex) {
                    return refuse(Refusal::Failed, &e);
                }
            }
            if let Some(ns) = hr.now_unix_ns {
                let ts = libc::timespec {
                    tv_sec: (ns / 1_000_000_000) as libc::time_t,
                    tv_nsec: (ns % 1_000_000_000) as libc::c_long,
                };
                // SAFETY: clock_settime reads the timespec it is given.
                if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
                    let e = std::io::Error::last_os_error();
                    return refuse(Refusal::Failed, &format!("set the clock: {e}"));
                }
            }
            if let Some(env) = hr.env {
                if *ctx.sandbox_env() != env {
                    ctx.set_sandbox_env(env);
                    // Kernels hold the environment they started with.
                    ctx.kernels.end_all().await;
                }
            }
            json_reply(&serde_json::json!({}))
        }
        (&Method::POST, "/adopt") => {
            let ar: AdoptRequest = match json_body(req, "invalid adopt request").await {
                Ok(v) => v,
                Err(r) => return r,
            };
            let Some((mut state, cancel)) = shared.adopt.clone() else {
                return json_reply(&AdoptReply { pid: None });
            };
            if !ar.expect {
                cancel.notify_one();
            }
            let pid = match state.wait_for(Option::is_some).await {
                Ok(v) => v.flatten(),
                Err(_) => None,
            };
            json_reply(&AdoptReply { pid })
        }
        (&Method::GET, "/health") => {
            let h = Health {
                protocol: PROTOCOL_VERSION,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
            };
            full(StatusCode::OK, serde_json::to_vec(&h).unwrap_or_default())
        }
        (&Method::POST, "/run_code") => {
            let rc: RunCodeRequest = match json_body(req, "invalid run_code request").await {
                Ok(v) => v,
                Err(r) => return r,
            };
            if rc.code.contains('\0') {
                return refuse(Refusal::Invalid, "code must not contain NUL");
            }
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
            tokio::spawn(async move {
                let timeout = rc.timeout_ms.map(std::time::Duration::from_millis);
                ctx.kernels
                    .clone()
                    .run(&ctx, rc.language, rc.code, timeout, tx)
                    .await;
            });
            ndjson(rx)
        }
        (&Method::POST, "/exec") => {
            let er: ExecRequest = match json_body(req, "invalid exec request").await {
                Ok(v) => v,
                Err(r) => return r,
            };
            let running = match exec::spawn(&ctx, &er).await {
                Ok(r) => {
                    eprintln!("forkbox-agent: exec pid {}: {}", r.pid(), loggable(&er.cmd));
                    r
                }
                Err(e @ exec::SpawnError::NoCwd(_)) => {
                    return refuse(Refusal::Invalid, &e.to_string())
                }
                Err(e) => return refuse(Refusal::Failed, &e.to_string()),
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
            tokio::spawn(running.stream(tx));
            ndjson(rx)
        }
        _ => refuse(Refusal::Invalid, "no such agent route"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn coalesce_joins_waiting_lines_and_pads_short_chunks() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let mut c = Coalesce { rx, done: false };
        for l in ["{\"a\":1}\n", "{\"a\":2}\n"] {
            tx.send(Bytes::from_static(l.as_bytes())).await.unwrap();
        }
        let chunk = c.next().await.unwrap();
        assert_eq!(chunk.len(), MIN_CHUNK);
        let text = std::str::from_utf8(&chunk).unwrap();
        assert!(text.starts_with("{\"a\":1}\n{\"a\":2}\n\n"));
        assert!(text.trim_end_matches('\n').ends_with('}'));

        let big = Bytes::from(vec![b'x'; MIN_CHUNK + 1]);
        tx.send(big.clone()).await.unwrap();
        assert_eq!(c.next().await.unwrap(), big);
        drop(tx);
        assert!(c.next().await.is_none());
    }

    #[tokio::test]
    async fn coalesce_caps_a_chunk() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let mut c = Coalesce { rx, done: false };
        for _ in 0..40 {
            tx.send(Bytes::from(vec![b'y'; 4096])).await.unwrap();
        }
        drop(tx);
        let mut sizes = Vec::new();
        while let Some(chunk) = c.next().await {
            sizes.push(chunk.len());
        }
        assert_eq!(sizes, [COALESCE_MAX, COALESCE_MAX, 8 * 4096]);
    }
}
