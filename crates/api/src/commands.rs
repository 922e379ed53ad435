//! Background commands: `/v1/sandboxes/:id/commands…` (start one with
//! `POST …/exec {"cmd", "background": true}`).

use crate::extract::{JsonBody, PathArgs, QueryArgs};
use crate::owned::Sbx;
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use forkbox_types::agent::BgInfo;
use serde::{Deserialize, Serialize};

fn parse_pid(s: &str) -> Result<i32, ApiError> {
    s.parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("{s} is not a pid")))
}

/// A background command as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CommandView {
    pid: i32,
    cmd: String,
    running: bool,
    exit_code: Option<i32>,
    started_at: String,
}

impl From<BgInfo> for CommandView {
    fn from(b: BgInfo) -> Self {
        let started =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(b.started_ms) * 1_000_000)
                .map(crate::sandboxes::rfc3339)
                .unwrap_or_default();
        CommandView {
            pid: b.pid,
            cmd: b.cmd,
            running: b.exit_code.is_none(),
            exit_code: b.exit_code,
            started_at: started,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CommandList {
    commands: Vec<CommandView>,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands", tag = "commands", params(("id" = String, Path, description = "Sandbox id")), responses((status = 200, body = CommandList), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn list(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<CommandList>, ApiError> {
    Ok(Json(CommandList {
        commands: st
            .manager
            .commands(&id)
            .await?
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinBody {
    /// Text to write (UTF-8).
    #[serde(default)]
    data: String,
    /// Close stdin afterwards (the command sees end of file).
    #[serde(default)]
    close: bool,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands/{pid}/stdin", tag = "commands", params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Pid of the background command inside the sandbox")), request_body = StdinBody, responses((status = 204, description = "Written"), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn stdin(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs(ids): PathArgs<(String, String)>,
    JsonBody(b): JsonBody<StdinBody>,
) -> Result<StatusCode, ApiError> {
    let pid = parse_pid(&ids.1)?;
    st.manager
        .command_stdin(&id, pid, b.data.into_bytes().into(), b.close)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum SignalArg {
    Number(i32),
    Name(String),
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A number or a name (`SIGTERM`, `TERM`, `KILL`, …); default SIGTERM.
    signal: Option<SignalArg>,
}

fn signal_number(s: &SignalArg) -> Result<i32, ApiError> {
    let n = match s {
        SignalArg::Number(n) => *n,
        SignalArg::Name(name) => {
            let upper = name.to_ascii_uppercase();
            let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
            match bare {
                "HUP" => 1,
                "INT" => 2,
                "QUIT" => 3,
                "KILL" => 9,
                "USR1" => 10,
                "USR2" => 12,
                "TERM" => 15,
                "CONT" => 18,
                "STOP" => 19,
                _ => return Err(ApiError::BadRequest(format!("unknown signal {name}"))),
            }
        }
    };
    if !(1..=64).contains(&n) {
        return Err(ApiError::BadRequest(
            "signal must be between 1 and 64".into(),
        ));
    }
    Ok(n)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands/{pid}/signal", tag = "commands", params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Pid of the background command inside the sandbox")), request_body = SignalBody, responses((status = 204, description = "Sent"), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn signal(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs(ids): PathArgs<(String, String)>,
    JsonBody(b): JsonBody<SignalBody>,
) -> Result<StatusCode, ApiError> {
    let pid = parse_pid(&ids.1)?;
    let n = match &b.signal {
        Some(s) => signal_number(s)?,
        None => 15,
    };
    st.manager.command_signal(&id, pid, n).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE …/commands/:pid`: SIGKILL to the command's process group.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/commands/{pid}", tag = "commands", params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Pid of the background command inside the sandbox")), responses((status = 204, description = "Killed"), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn kill(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs(ids): PathArgs<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let pid = parse_pid(&ids.1)?;
    st.manager.command_signal(&id, pid, 9).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct WaitView {
    pid: i32,
    exit_code: i32,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands/{pid}/wait", tag = "commands", params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Pid of the background command inside the sandbox")), responses((status = 200, body = WaitView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn wait(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs(ids): PathArgs<(String, String)>,
) -> Result<Json<WaitView>, ApiError> {
    let pid = parse_pid(&ids.1)?;
    let exit_code = st.manager.command_wait(&id, pid).await?;
    Ok(Json(WaitView { pid, exit_code }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    follow: Option<String>,
}

/// `GET …/commands/:pid/output[?follow=1]`: the kept output (the last MiB), then with
/// `follow` the live output up to the exit event; NDJSON, as exec.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands/{pid}/output", tag = "commands", params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Pid of the background command inside the sandbox"), ("follow" = Option<String>, Query)), responses((status = 200, description = "NDJSON events", content_type = "application/x-ndjson", body = String), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn output(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs(ids): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<OutputQuery>,
) -> Result<Response, ApiError> {
    let pid = parse_pid(&ids.1)?;
    let follow = crate::extract::flag(q.follow.as_deref(), "follow")?;
    let events = st.manager.command_output(&id, pid, follow).await?;
    Ok(crate::extract::ndjson(events))
}
