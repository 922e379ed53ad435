//! `GET /v1/sandboxes/:id/exec/pty?rows=&cols=[&cmd=]`: an interactive terminal over a
//! WebSocket. Client → server: binary messages are keystrokes (raw bytes); text messages
//! are JSON controls, `{"type": "resize", "rows", "cols"}`, `{"type": "input", "data"}` or
//! `{"type": "kill"}` (SIGKILL the terminal's processes; the exit message follows).
//! Server → client: binary messages are terminal output (raw bytes); when the process
//! ends, a text message `{"type": "exit", "code"}`, then the socket closes.

use crate::extract::QueryArgs;
use crate::owned::Sbx;
use crate::{ApiError, AppState};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use forkbox_core::SandboxRef;
use forkbox_types::agent::PtyRequest;
use forkbox_types::pty::{encode, Decoder, Frame};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtyQuery {
    rows: Option<u16>,
    cols: Option<u16>,
    /// A command instead of the login shell.
    cmd: Option<String>,
    /// Accepted for browser clients that cannot set headers (auth comes later).
    #[serde(rename = "access_token")]
    _access_token: Option<String>,
}

/// A WebSocket route's upgrade, or why the request was not one.
pub type Upgrade =
    Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

/// The upgrade, or a 400 saying the route needs one.
pub fn upgrade(ws: Upgrade) -> Result<WebSocketUpgrade, ApiError> {
    ws.map_err(|e| {
        ApiError::BadRequest(format!(
            "this route needs a WebSocket upgrade ({})",
            e.body_text()
        ))
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Control {
    Resize { rows: u16, cols: u16 },
    Input { data: String },
    Kill,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec/pty", tag = "exec", params(("id" = String, Path, description = "Sandbox id"), ("rows" = Option<u16>, Query), ("cols" = Option<u16>, Query), ("cmd" = Option<String>, Query)), responses((status = 101, description = "WebSocket: binary = terminal bytes; text = JSON controls and the exit"), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn pty(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PtyQuery>,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    let ws = upgrade(ws)?;
    let (rows, cols) = (q.rows.unwrap_or(24), q.cols.unwrap_or(80));
    if !(1..=1000).contains(&rows) || !(1..=1000).contains(&cols) {
        return Err(ApiError::BadRequest(
            "rows and cols must be between 1 and 1000".into(),
        ));
    }
    st.manager.check_running(&id).await?;
    let req = PtyRequest {
        cmd: q.cmd,
        rows,
        cols,
        ..Default::default()
    };
    Ok(ws.on_upgrade(move |socket| session(st, id, req, socket)))
}

async fn session(st: AppState, id: SandboxRef, req: PtyRequest, socket: WebSocket) {
    let (mut sink, mut source) = socket.split();
    let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let input = tokio_stream::wrappers::ReceiverStream::new(in_rx).boxed();
    let mut out = match st.manager.pty(&id, req, input).await {
        Ok(o) => o,
        Err(e) => {
            let msg =
                serde_json::json!({"type": "error", "message": ApiError::from(e).to_string()});
            let _ = sink.send(Message::Text(msg.to_string().into())).await;
            let _ = sink.close().await;
            return;
        }
    };
    // Client → terminal.
    let mut reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            let frame = match msg {
                Message::Binary(b) => Frame::Data(b.to_vec()),
                Message::Text(t) => match serde_json::from_str::<Control>(&t) {
                    Ok(Control::Resize { rows, cols }) => Frame::Resize {
                        rows: rows.clamp(1, 1000),
                        cols: cols.clamp(1, 1000),
                    },
                    Ok(Control::Input { data }) => Frame::Data(data.into_bytes()),
                    Ok(Control::Kill) => Frame::Kill,
                    Err(_) => continue,
                },
                Message::Close(_) => break,
                _ => continue,
            };
            if in_tx.send(Ok(Bytes::from(encode(&frame)))).await.is_err() {
                break;
            }
        }
    });
    // Terminal → client, until the process exits or the client leaves.
    let mut dec = Decoder::default();
    loop {
        let chunk = tokio::select! {
            c = out.next() => c,
            _ = &mut reader => break,
        };
        let Some(Ok(bytes)) = chunk else { break };
        dec.push(&bytes);
        let mut done = false;
        while let Ok(Some(frame)) = dec.next_frame() {
            let msg = match frame {
                Frame::Data(d) => Message::Binary(d.into()),
                Frame::Exit(code) => {
                    done = true;
                    Message::Text(
                        serde_json::json!({"type": "exit", "code": code})
                            .to_string()
                            .into(),
                    )
                }
                Frame::Resize { .. } | Frame::Kill => continue,
            };
            if sink.send(msg).await.is_err() {
                done = true;
                break;
            }
        }
        if done {
            break;
        }
    }
    reader.abort();
    let _ = sink.close().await;
}
