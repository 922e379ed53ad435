//! The agent protocol server: HTTP/2 over the inherited listening socket, one task per
//! connection, one stream per call (see `forkbox_types::agent`).

use crate::exec::{self, Context};
use bytes::Bytes;
use forkbox_types::agent::{ExecRequest, Health, RunCodeRequest, PROTOCOL_VERSION};
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

/// Runs the agent until the process is killed. Must be called single-threaded: it
/// forks the zygote before starting the async runtime.
pub fn run(listener: OwnedFd, env: BTreeMap<String, String>) -> ExitCode {
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
    match rt.block_on(serve(listener, zygote, env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkbox-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    listener: OwnedFd,
    zygote: OwnedFd,
    env: BTreeMap<String, String>,
) -> std::io::Result<()> {
    // PID 1 reaps orphans; commands are the zygote's children and reaped there.
    crate::reaper::start()?;
    let ctx = Context {
        spawner: crate::zygote::Spawner::new(zygote)?,
        env: Arc::new(env),
        kernels: Default::default(),
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
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(ctx, req).await) }
            });
            if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("forkbox-agent: connection: {e}");
            }
        });
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    full(
        status,
        serde_json::json!({ "error": msg }).to_string().into_bytes(),
    )
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(error(StatusCode::BAD_REQUEST, "unreadable request body")),
    }
}

/// A streamed NDJSON response fed by `rx`.
fn ndjson(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

async fn handle(ctx: Context, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => {
            let h = Health {
                protocol: PROTOCOL_VERSION,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
            };
            full(StatusCode::OK, serde_json::to_vec(&h).unwrap_or_default())
        }
        (&Method::POST, "/run_code") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let rc: RunCodeRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("invalid run_code request: {e}"),
                    )
                }
            };
            if rc.code.contains('\0') {
                return error(StatusCode::BAD_REQUEST, "code must not contain NUL");
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
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let er: ExecRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("invalid exec request: {e}"),
                    )
                }
            };
            let running = match exec::spawn(&ctx, &er).await {
                Ok(r) => r,
                Err(e @ exec::SpawnError::NoCwd(_)) => {
                    return error(StatusCode::BAD_REQUEST, &e.to_string())
                }
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
            tokio::spawn(running.stream(tx));
            ndjson(rx)
        }
        _ => error(StatusCode::NOT_FOUND, "no such agent route"),
    }
}
