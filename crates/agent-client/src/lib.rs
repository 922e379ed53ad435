//! Host side of the agent protocol (see `forkbox_types::agent`): one HTTP/2 connection
//! per sandbox over any byte stream, every call a stream of its own on it.

use bytes::Bytes;
use forkbox_types::agent::{
    AdoptReply, AdoptRequest, AgentEvent, BgInfo, BgSignal, ExecRequest, FileOp, FileOpReply,
    ForkReply, ForkRequest, Health, PtyRequest, Refusal, RunCodeRequest, WatchEvent, WriteReply,
    PROTOCOL_VERSION,
};
use forkbox_types::ndjson::Decoder;
use futures_util::Stream;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connect to agent: {0}")]
    Connect(std::io::Error),
    #[error("agent handshake: {0}")]
    Handshake(hyper::Error),
    #[error("agent request: {0}")]
    Request(hyper::Error),
    #[error("agent speaks protocol {got}, expected {want}")]
    Protocol { got: u32, want: u32 },
    #[error("agent answered {status}: {message}")]
    Status {
        status: StatusCode,
        /// What kind of refusal, as the agent said (from the status when it did not).
        kind: Refusal,
        message: String,
        /// The background command a refusal is about, when the agent said.
        pid: Option<i32>,
    },
    #[error("agent sent an undecodable message: {0}")]
    Decode(serde_json::Error),
    #[error("agent did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request bodies: whole (JSON) or streamed (file uploads).
type ReqBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn whole(b: Bytes) -> ReqBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// A cheap-to-clone handle on one agent connection.
#[derive(Clone)]
pub struct AgentClient {
    tx: SendRequest<ReqBody>,
}

impl AgentClient {
    /// Performs the HTTP/2 handshake over `io` and drives the connection in the background.
    pub async fn handshake<S>(io: S) -> Result<AgentClient, AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(AgentError::Handshake)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(AgentClient { tx })
    }

    /// Connects to an agent listening on a Unix socket.
    pub async fn connect_unix(path: &std::path::Path) -> Result<AgentClient, AgentError> {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(AgentError::Connect)?;
        Self::handshake(s).await
    }

    /// False once the connection has failed or closed.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
        self.call_with(method, path, whole(body)).await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://agent{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| AgentError::Status {
                status: StatusCode::BAD_REQUEST,
                kind: Refusal::Invalid,
                message: e.to_string(),
                pid: None,
            })?;
        let mut tx = self.tx.clone();
        tx.ready().await.map_err(AgentError::Request)?;
        let resp = tx.send_request(req).await.map_err(AgentError::Request)?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let (kind, message, pid) =
                match serde_json::from_slice::<forkbox_types::agent::ErrorBody>(&body) {
                    Ok(b) => (b.kind, b.error, b.pid),
                    Err(_) => (None, String::from_utf8_lossy(&body).into_owned(), None),
                };
            return Err(AgentError::Status {
                status,
                kind: kind.unwrap_or_else(|| Refusal::from_status(status.as_u16())),
                message,
                pid,
            });
        }
        Ok(resp)
    }

    /// `GET /health`, checking the protocol version.
    pub async fn health(&self) -> Result<Health, AgentError> {
        let h: Health = self.get_json("/health").await?;
        if h.protocol != PROTOCOL_VERSION {
            return Err(AgentError::Protocol {
                got: h.protocol,
                want: PROTOCOL_VERSION,
            });
        }
        Ok(h)
    }

    /// A JSON request answered by one JSON body.
    async fn json<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, AgentError> {
        let body = serde_json::to_vec(req).map_err(AgentError::Decode)?;
        let resp = self.call(Method::POST, path, body.into()).await?;
        decode(resp).await
    }

    /// A GET answered by one JSON body.
    async fn get_json<Resp: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Resp, AgentError> {
        let resp = self.call(Method::GET, path, Bytes::new()).await?;
        decode(resp).await
    }

    /// `POST /bg/start`: a command started without waiting for it.
    pub async fn bg_start(&self, req: &ExecRequest) -> Result<BgInfo, AgentError> {
        self.json("/bg/start", req).await
    }

    /// `GET /bg/list`.
    pub async fn bg_list(&self) -> Result<Vec<BgInfo>, AgentError> {
        self.get_json("/bg/list").await
    }

    /// `POST /bg/stdin?pid=&close=`.
    pub async fn bg_stdin(&self, pid: i32, data: Bytes, close: bool) -> Result<(), AgentError> {
        let path = format!("/bg/stdin?pid={pid}&close={}", u8::from(close));
        self.call(Method::POST, &path, data).await.map(|_| ())
    }

    /// `POST /bg/signal`.
    pub async fn bg_signal(&self, pid: i32, signal: i32) -> Result<(), AgentError> {
        self.json::<_, serde_json::Value>("/bg/signal", &BgSignal { pid, signal })
            .await
            .map(|_| ())
    }

    /// `POST /hostname`: the sandbox's host name and what else `req` sets.
    pub async fn set_hostname(
        &self,
        req: &forkbox_types::agent::HostnameRequest,
    ) -> Result<(), AgentError> {
        self.json::<_, serde_json::Value>("/hostname", req)
            .await
            .map(|_| ())
    }

    /// `GET /bg/wait?pid=`: the exit code, once the command has exited.
    pub async fn bg_wait(&self, pid: i32) -> Result<i32, AgentError> {
        let v: serde_json::Value = self.get_json(&format!("/bg/wait?pid={pid}")).await?;
        Ok(v.get("exit_code")
            .and_then(|c| c.as_i64())
            .map(|c| c as i32)
            .unwrap_or(-1))
    }

    /// `GET /bg/output?pid=&follow=`: kept output, then (with `follow`) live output up
    /// to the exit event.
    pub async fn bg_output(&self, pid: i32, follow: bool) -> Result<EventStream, AgentError> {
        let path = format!("/bg/output?pid={pid}&follow={}", u8::from(follow));
        let resp = self.call(Method::GET, &path, Bytes::new()).await?;
        Ok(EventStream::new(resp.into_body()))
    }

    /// `POST /pty`: an interactive terminal; `input` and the answer are
    /// `forkbox_types::pty` frames.
    pub async fn pty<S>(&self, req: &PtyRequest, input: S) -> Result<ByteStream, AgentError>
    where
        S: Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
    {
        use futures_util::StreamExt;
        let query = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("rows", &req.rows.to_string());
            q.append_pair("cols", &req.cols.to_string());
            if let Some(c) = &req.cmd {
                q.append_pair("cmd", c);
            }
            if let Some(c) = &req.cwd {
                q.append_pair("cwd", c);
            }
            for (k, v) in &req.env {
                q.append_pair("env", &format!("{k}={v}"));
            }
            if req.pipe {
                q.append_pair("pipe", "1");
            }
            q.finish()
        };
        let body = http_body_util::StreamBody::new(input.map(|r| r.map(hyper::body::Frame::data)))
            .boxed_unsync();
        let resp = self
            .call_with(Method::POST, &format!("/pty?{query}"), body)
            .await?;
        Ok(ByteStream {
            body: resp.into_body(),
        })
    }

    /// `POST /tcp?port=`: a connection to the sandbox's own `port` (the request body is
    /// what is sent, the answer what comes back; see the agent's `tcp` module).
    pub async fn tcp<S>(&self, port: u16, input: S) -> Result<ByteStream, AgentError>
    where
        S: Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
    {
        use futures_util::StreamExt;
        let body = http_body_util::StreamBody::new(input.map(|r| r.map(hyper::body::Frame::data)))
            .boxed_unsync();
        let resp = self
            .call_with(Method::POST, &format!("/tcp?port={port}"), body)
            .await?;
        Ok(ByteStream {
            body: resp.into_body(),
        })
    }

    /// `POST /volumes/release`: a vm guest about to be stopped ends its processes and
    /// unmounts its volumes.
    pub async fn release_volumes(&self) -> Result<(), AgentError> {
        self.json::<_, serde_json::Value>("/volumes/release", &serde_json::json!({}))
            .await
            .map(|_| ())
    }

    /// `POST /disk/grow`: a vm guest grows its root file system to fill its disk, once
    /// that is `bytes` big.
    pub async fn grow_disk(&self, bytes: u64) -> Result<(), AgentError> {
        self.json::<_, serde_json::Value>(
            "/disk/grow",
            &forkbox_types::agent::GrowRequest { bytes },
        )
        .await
        .map(|_| ())
    }

    /// `POST /egress/listen`: a vm guest starts taking its programs' connections to
    /// the proxy address.
    pub async fn egress_listen(&self) -> Result<(), AgentError> {
        self.json::<_, serde_json::Value>("/egress/listen", &serde_json::json!({}))
            .await
            .map(|_| ())
    }

    /// `POST /egress/accept`: answers once a program in the guest connects to the
    /// proxy address; `input` is sent to it, the stream is what it sends.
    pub async fn egress_accept<S>(&self, input: S) -> Result<ByteStream, AgentError>
    where
        S: Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
    {
        use futures_util::StreamExt;
        let body = http_body_util::StreamBody::new(input.map(|r| r.map(hyper::body::Frame::data)))
            .boxed_unsync();
        let resp = self.call_with(Method::POST, "/egress/accept", body).await?;
        Ok(ByteStream {
            body: resp.into_body(),
        })
    }

    /// `GET /ports`: the TCP ports something listens on in the sandbox.
    pub async fn ports(&self) -> Result<Vec<forkbox_types::agent::ListeningPort>, AgentError> {
        self.get_json("/ports").await
    }

    /// `GET /files/watch?path=&recursive=`: changes as they happen.
    pub async fn watch(&self, path: &str, recursive: bool) -> Result<WatchStream, AgentError> {
        let p = format!(
            "/files/watch?{}&recursive={}",
            query(path),
            u8::from(recursive)
        );
        let resp = self.call(Method::GET, &p, Bytes::new()).await?;
        Ok(WatchStream::new(resp.into_body()))
    }

    /// `POST /files/op`.
    pub async fn file_op(&self, op: &FileOp) -> Result<FileOpReply, AgentError> {
        self.json("/files/op", op).await
    }

    /// `GET /files/read?path=`: the file's size and its bytes as they come.
    pub async fn read_file(&self, path: &str) -> Result<(Option<u64>, ByteStream), AgentError> {
        let resp = self
            .call(
                Method::GET,
                &format!("/files/read?{}", query(path)),
                Bytes::new(),
            )
            .await?;
        let size = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((
            size,
            ByteStream {
                body: resp.into_body(),
            },
        ))
    }

    /// `PUT /files/write?path=` with `data` streamed as the body. If `data` yields an
    /// error the agent discards the partial file.
    pub async fn write_file<S>(&self, path: &str, data: S) -> Result<WriteReply, AgentError>
    where
        S: Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
    {
        use futures_util::StreamExt;
        let body = http_body_util::StreamBody::new(data.map(|r| r.map(hyper::body::Frame::data)))
            .boxed_unsync();
        let resp = self
            .call_with(Method::PUT, &format!("/files/write?{}", query(path)), body)
            .await?;
        decode(resp).await
    }

    /// `POST /fork`: the parent's Python kernel (if any) forks into each child.
    pub async fn fork(&self, req: &ForkRequest) -> Result<ForkReply, AgentError> {
        self.json("/fork", req).await
    }

    /// `POST /adopt`: waits until a fork child has its Python kernel (or is told none is
    /// coming, `expect: false`).
    pub async fn adopt(&self, req: &AdoptRequest) -> Result<AdoptReply, AgentError> {
        self.json("/adopt", req).await
    }

    /// `POST /exec`: the command's events as they come. Dropping the stream cancels the
    /// call, and the agent kills the command's process tree.
    pub async fn exec(&self, req: &ExecRequest) -> Result<EventStream, AgentError> {
        self.stream(
            "/exec",
            serde_json::to_vec(req).map_err(AgentError::Decode)?,
        )
        .await
    }

    /// `POST /run_code`: a cell in the sandbox's persistent REPL kernel. Dropping the
    /// stream interrupts the cell; the kernel keeps its state.
    pub async fn run_code(&self, req: &RunCodeRequest) -> Result<EventStream, AgentError> {
        self.stream(
            "/run_code",
            serde_json::to_vec(req).map_err(AgentError::Decode)?,
        )
        .await
    }

    async fn stream(&self, path: &str, body: Vec<u8>) -> Result<EventStream, AgentError> {
        let resp = self.call(Method::POST, path, body.into()).await?;
        Ok(EventStream::new(resp.into_body()))
    }
}

/// A whole response body decoded as JSON.
async fn decode<T: serde::de::DeserializeOwned>(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<T, AgentError> {
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(AgentError::Request)?
        .to_bytes();
    serde_json::from_slice(&body).map_err(AgentError::Decode)
}

fn query(path: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("path", path)
        .finish()
}

/// A response body's bytes.
pub struct ByteStream {
    body: hyper::body::Incoming,
}

impl Stream for ByteStream {
    type Item = Result<Bytes, AgentError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(AgentError::Request(e)))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
            }
        }
    }
}

/// NDJSON lines decoded as `T` from a response body.
pub struct NdjsonStream<T> {
    body: hyper::body::Incoming,
    dec: Decoder<T>,
    done: bool,
}

/// [`AgentEvent`]s of an exec or cell.
pub type EventStream = NdjsonStream<AgentEvent>;
/// [`WatchEvent`]s of a file watch.
pub type WatchStream = NdjsonStream<WatchEvent>;

impl<T> NdjsonStream<T> {
    fn new(body: hyper::body::Incoming) -> Self {
        NdjsonStream {
            body,
            dec: Decoder::default(),
            done: false,
        }
    }
}

impl<T: serde::de::DeserializeOwned> Stream for NdjsonStream<T> {
    type Item = Result<T, AgentError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(item) = self.dec.next_item() {
                return Poll::Ready(Some(item.map_err(AgentError::Decode)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.done = true,
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(AgentError::Request(e))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.dec.push(&data);
                    }
                }
            }
        }
    }
}
