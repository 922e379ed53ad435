//! `GET /v1/sandboxes/:id/lsp/:lang[?cwd=]`: the LSP bridge, a WebSocket to a language
//! server started in the sandbox for this socket (python: pylsp, typescript:
//! typescript-language-server, go: gopls, rust: rust-analyzer; the list is the
//! languages file's `[lsp.*]`). One WebSocket text message is one JSON-RPC message,
//! either way (what `vscode-ws-jsonrpc` and Monaco's language client speak); the
//! bridge adds and strips LSP's `Content-Length` framing. The server runs in `cwd`
//! (default `/root`), which is the workspace of an `initialize` that names none; URIs
//! name sandbox paths. The server ends with the socket; when it exits first, the
//! socket closes (code 1000, the exit status in the reason).

use crate::extract::QueryArgs;
use crate::owned::Sbx;
use crate::{ApiError, AppState};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use forkbox_core::runtime::ByteStream;
use forkbox_types::pty::{encode, Decoder, Frame};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LspQuery {
    /// Directory the server runs in and the default workspace (`/root`).
    cwd: Option<String>,
    /// For browser clients that cannot set headers.
    #[serde(rename = "access_token")]
    _access_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/lsp/{lang}", tag = "exec", params(("id" = String, Path, description = "Sandbox id"), ("lang" = String, Path, description = "python, typescript, go, rust (or an alias)"), ("cwd" = Option<String>, Query)), responses((status = 101, description = "WebSocket: one JSON-RPC message per text message, both ways"), (status = "4XX", description = "Unknown language, server not installed, invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn lsp(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    Path(path): Path<(String, String)>,
    QueryArgs(q): QueryArgs<LspQuery>,
    ws: crate::pty::Upgrade,
) -> Result<Response, ApiError> {
    let ws = crate::pty::upgrade(ws)?;
    let lang = path.1;
    let root = q.cwd.clone().unwrap_or_else(|| "/root".to_owned());
    let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let input = tokio_stream::wrappers::ReceiverStream::new(in_rx).boxed();
    // Started (or refused, as a JSON error) before the upgrade.
    let out = st.manager.language_server(&id, &lang, q.cwd, input).await?;
    let max = forkbox_types::lsp::MAX_MESSAGE;
    Ok(ws
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| session(socket, in_tx, out, root)))
}

async fn session(
    socket: WebSocket,
    in_tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    mut out: ByteStream,
    root: String,
) {
    let (mut sink, mut source) = socket.split();
    // Client → server: each message framed for the server's stdin.
    let mut reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            let body: Bytes = match msg {
                Message::Text(t) => Bytes::from(t),
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            let framed =
                forkbox_types::lsp::encode(&forkbox_core::lsp::client_message(&body, &root));
            // The agent takes data frames of up to 1 MiB; its stdin is one byte stream.
            for chunk in framed.chunks(forkbox_types::pty::MAX_FRAME) {
                let frame = encode(&Frame::Data(chunk.to_vec()));
                if in_tx.send(Ok(Bytes::from(frame))).await.is_err() {
                    return;
                }
            }
        }
    });
    // Server → client, until the server exits or the client leaves.
    let (mut frames, mut lsp) = (Decoder::default(), forkbox_types::lsp::Decoder::default());
    let close = 'outer: loop {
        let chunk = tokio::select! {
            c = out.next() => c,
            _ = &mut reader => break None,
        };
        let Some(Ok(bytes)) = chunk else {
            break Some((1011, "the sandbox connection ended".to_owned()));
        };
        frames.push(&bytes);
        let mut exited = None;
        loop {
            match frames.next_frame() {
                Ok(Some(Frame::Data(d))) => lsp.push(&d),
                Ok(Some(Frame::Exit(code))) => {
                    exited = Some(code);
                    break;
                }
                Ok(Some(Frame::Resize { .. } | Frame::Kill)) => {}
                Ok(None) => break,
                Err(e) => break 'outer Some((1011, format!("sandbox connection: {e}"))),
            }
        }
        // Every whole message before the close, the last ones of an exiting server too.
        loop {
            let msg = match lsp.next_message() {
                Ok(Some(body)) => match String::from_utf8(body) {
                    Ok(text) => Message::Text(text.into()),
                    Err(e) => Message::Binary(e.into_bytes().into()),
                },
                Ok(None) => break,
                Err(e) => break 'outer Some((1011, format!("language server output: {e}"))),
            };
            if sink.send(msg).await.is_err() {
                break 'outer None;
            }
        }
        if let Some(code) = exited {
            break Some((1000, format!("language server exited (code {code})")));
        }
    };
    reader.abort();
    // Dropping the answer ends the server (the agent kills its process tree).
    drop(out);
    if let Some((code, reason)) = close {
        let mut reason = reason;
        reason.truncate(120);
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
    let _ = sink.close().await;
}
