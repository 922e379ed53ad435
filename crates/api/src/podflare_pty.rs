//! Podflare's terminal protocol under `/podflare` (`sandbox.pty.*` of the real client),
//! over [`crate::terminals`]:
//! - `POST /v1/sandboxes/{id}/pty` `{shellCmd | argv, cols, rows, env: [[k, v]…], cwd,
//!   timeout_ms}` opens a session and streams NDJSON for its lifetime: `pty_ready
//!   {session_id}`, `pty_data {seq, data_b64}`, then `pty_exit {data: code}` (preceded by
//!   `pty_error {message}` when the sandbox went away first); leaving the stream does not
//!   end the session;
//! - `…/pty/{pty}/input {data_b64}`, `…/resize {cols, rows}`, `…/kill` (SIGKILL to its
//!   processes; idempotent): 204;
//! - `GET …/pty` lists the sandbox's sessions `[{pty_id, cmd_label, created_at_ms,
//!   exit_code}]`; `GET …/pty/{pty}/attach` replays the kept output (the last MiB) and
//!   goes on live; `POST …/pty/{pty}/read {since_seq, max_bytes, timeout_ms}` is the
//!   long-poll reader (`seq` is a byte offset in the session's output).

use crate::error::ApiError;
use crate::extract::{ndjson, JsonBody, PathArgs};
use crate::owned::Sbx;
use crate::terminals::{Open, Piece, Session};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use forkbox_types::agent::PtyRequest;
use forkbox_types::pty::Frame;
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait of one `read` call.
const READ_WAIT_MAX: Duration = Duration::from_secs(30);
/// Most bytes one `read` call returns.
const READ_MAX: usize = 1 << 20;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/sandboxes/{id}/pty", post(create).get(list))
        .route("/v1/sandboxes/{id}/pty/{pty}/input", post(input))
        .route("/v1/sandboxes/{id}/pty/{pty}/resize", post(resize))
        .route("/v1/sandboxes/{id}/pty/{pty}/kill", post(kill))
        .route("/v1/sandboxes/{id}/pty/{pty}/attach", get(attach))
        .route("/v1/sandboxes/{id}/pty/{pty}/read", post(read))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Env {
    Pairs(Vec<(String, String)>),
    Map(BTreeMap<String, String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// A command line for `bash -c`.
    #[serde(rename = "shellCmd")]
    shell_cmd: Option<String>,
    /// A program and its arguments, run without a shell's interpretation.
    argv: Option<Vec<String>>,
    cols: Option<u16>,
    rows: Option<u16>,
    env: Option<Env>,
    cwd: Option<String>,
    /// Killed after this long (0 or absent: when its process ends or the sandbox does).
    timeout_ms: Option<u64>,
}

/// `argv` as a shell command line that runs exactly it (each word single-quoted; the
/// shell execs a lone command, so the program is the terminal's process).
fn quoted(argv: &[String]) -> String {
    let words: Vec<String> = argv
        .iter()
        .map(|a| forkbox_types::shell::quote(a))
        .collect();
    format!("exec {}", words.join(" "))
}

fn size(v: Option<u16>, default: u16, name: &str) -> Result<u16, ApiError> {
    let v = v.unwrap_or(default);
    if (1..=1000).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::BadRequest(format!(
            "{name} must be between 1 and 1000"
        )))
    }
}

async fn create(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let (cmd, label) = match (b.shell_cmd, b.argv) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give shellCmd or argv, not both".into(),
            ))
        }
        (Some(c), None) => (Some(c.clone()), c),
        (None, Some(a)) if a.is_empty() || a[0].is_empty() => {
            return Err(ApiError::BadRequest("argv must name a program".into()))
        }
        (None, Some(a)) => (Some(quoted(&a)), a.join(" ")),
        (None, None) => (None, "bash -l".into()),
    };
    let env = match b.env {
        None => BTreeMap::new(),
        Some(Env::Map(m)) => m,
        Some(Env::Pairs(p)) => p.into_iter().collect(),
    };
    let req = PtyRequest {
        cmd,
        rows: size(b.rows, 24, "rows")?,
        cols: size(b.cols, 80, "cols")?,
        cwd: b.cwd,
        env,
        pipe: false,
    };
    let session = st
        .terminals
        .open(
            &st.manager,
            &id,
            Open {
                req,
                label,
                timeout: b.timeout_ms.filter(|t| *t > 0).map(Duration::from_millis),
            },
        )
        .await?;
    let ready = json!({"type": "pty_ready", "session_id": session.id});
    let events = futures_util::stream::once(async move { ready })
        .chain(follow(session, 0))
        .boxed();
    Ok(ndjson(events))
}

/// The session's output from `from` on as Podflare's events.
fn follow(session: Arc<Session>, from: u64) -> futures_util::stream::BoxStream<'static, Value> {
    session
        .follow(from)
        .flat_map(|p| {
            let evs = match p {
                Piece::Data { seq, data } => vec![json!({
                    "type": "pty_data",
                    "seq": seq,
                    "data_b64": base64::engine::general_purpose::STANDARD.encode(data),
                })],
                Piece::Skipped(n) => vec![json!({"type": "pty_gap", "bytes": n})],
                Piece::End { exit, lost } => {
                    let mut v = Vec::new();
                    if let Some(m) = lost {
                        v.push(json!({"type": "pty_error", "message": m}));
                    }
                    v.push(json!({"type": "pty_exit", "data": exit}));
                    v
                }
            };
            futures_util::stream::iter(evs)
        })
        .boxed()
}

/// `{pty}` of the route as a session of the caller's sandbox `{id}` (checked by
/// [`Sbx`]); another sandbox's session is not found.
struct Term(Arc<Session>);

impl axum::extract::FromRequestParts<AppState> for Term {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &AppState,
    ) -> Result<Self, ApiError> {
        let Sbx(id) = Sbx::from_request_parts(parts, st).await?;
        let PathArgs(p) =
            PathArgs::<HashMap<String, String>>::from_request_parts(parts, st).await?;
        let pty = p.get("pty").map(String::as_str).unwrap_or_default();
        st.terminals
            .get(&id, pty)
            .map(Term)
            .ok_or_else(|| ApiError::NotFound(format!("no terminal session {pty} in this sandbox")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputBody {
    data_b64: String,
}

async fn input(Term(s): Term, JsonBody(b): JsonBody<InputBody>) -> Result<StatusCode, ApiError> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(b.data_b64.as_bytes())
        .map_err(|e| ApiError::BadRequest(format!("data_b64 is not base64: {e}")))?;
    s.send(Frame::Data(data)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeBody {
    cols: u16,
    rows: u16,
}

async fn resize(Term(s): Term, JsonBody(b): JsonBody<ResizeBody>) -> Result<StatusCode, ApiError> {
    let (rows, cols) = (
        size(Some(b.rows), 24, "rows")?,
        size(Some(b.cols), 80, "cols")?,
    );
    s.send(Frame::Resize { rows, cols }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn kill(Term(s): Term) -> Result<StatusCode, ApiError> {
    // Killing an ended session is done already.
    if !s.ended() {
        let _ = s.send(Frame::Kill).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list(State(st): State<AppState>, Sbx(id): Sbx) -> Json<Vec<Value>> {
    Json(
        st.terminals
            .list(&id)
            .iter()
            .map(|s| {
                json!({
                    "pty_id": s.id,
                    "cmd_label": s.label,
                    "created_at_ms": s.created_at_ms,
                    "exit_code": s.exit_code(),
                })
            })
            .collect(),
    )
}

async fn attach(Term(s): Term) -> Result<Response, ApiError> {
    // From the oldest byte still kept.
    let from = s.read(0, 0).seq;
    Ok(ndjson(follow(s, from)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    #[serde(default)]
    since_seq: u64,
    max_bytes: Option<usize>,
    timeout_ms: Option<u64>,
}

async fn read(Term(s): Term, JsonBody(b): JsonBody<ReadBody>) -> Result<Json<Value>, ApiError> {
    let max = b.max_bytes.unwrap_or(64 * 1024).clamp(1, READ_MAX);
    let wait = Duration::from_millis(b.timeout_ms.unwrap_or(10_000)).min(READ_WAIT_MAX);
    let c = s.read_wait(b.since_seq, max, wait).await;
    Ok(Json(json!({
        "session_id": s.id,
        "seq": c.seq,
        "data_b64": base64::engine::general_purpose::STANDARD.encode(&c.data),
        "next_seq": c.next,
        "skipped": c.skipped,
        "exited": c.exit.is_some(),
        "exit_code": c.exit,
        "error": c.lost,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_quoted_so_the_shell_runs_it_verbatim() {
        let a = vec![
            "printf".to_owned(),
            "%s|".into(),
            "it's $HOME".into(),
            "".into(),
        ];
        assert_eq!(quoted(&a), r#"exec 'printf' '%s|' 'it'\''s $HOME' ''"#);
    }
}
