//! `/v1/sandboxes/:id/files…` routes: content streamed both ways (never held whole in
//! memory), metadata as JSON.

use crate::extract::{JsonBody, QueryArgs};
use crate::owned::Sbx;
use crate::{ApiError, AppState};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use forkbox_core::SandboxRef;
use forkbox_types::agent::{FileInfo, FileOp, FileOpReply, WriteReply};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Largest upload (`PUT …/files`, `PUT …/files/raw`).
pub const MAX_UPLOAD: u64 = 500 * 1024 * 1024;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PathArg {
    path: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteArgs {
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameBody {
    from: String,
    to: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Listing {
    path: String,
    entries: Vec<FileInfo>,
}

pub(crate) async fn op(
    st: &AppState,
    id: &SandboxRef,
    op: FileOp,
) -> Result<FileOpReply, ApiError> {
    Ok(st.manager.file_op(id, op).await?)
}

fn unexpected(what: &str) -> ApiError {
    ApiError::Internal(format!(
        "the agent answered a {what} call with the wrong shape"
    ))
}

pub(crate) async fn stat_of(
    st: &AppState,
    id: &SandboxRef,
    path: String,
) -> Result<FileInfo, ApiError> {
    match op(st, id, FileOp::Stat { path }).await? {
        FileOpReply::Info(i) => Ok(i),
        _ => Err(unexpected("stat")),
    }
}

/// `GET …/files?path=` and `GET …/files/raw?path=`: the bytes, streamed.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Path inside the sandbox (absolute, or relative to /root)")), responses((status = 200, description = "The bytes", content_type = "application/octet-stream", body = Vec<u8>), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn read(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathArg>,
) -> Result<Response, ApiError> {
    let (size, stream) = st.manager.read_file(&id, &q.path).await?;
    let body = Body::from_stream(stream.map(|r| r.map_err(std::io::Error::other)));
    let mut resp = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    if let Some(n) = size {
        resp.headers_mut().insert(header::CONTENT_LENGTH, n.into());
    }
    Ok(resp)
}

/// `PUT …/files?path=` and `PUT …/files/raw?path=`: the body, streamed into the file
/// (parents created; the file appears whole or not at all). Up to [`MAX_UPLOAD`] bytes.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Path inside the sandbox (absolute, or relative to /root)")), request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 200, body = forkbox_types::agent::WriteReply), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn write(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathArg>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WriteReply>, ApiError> {
    Ok(Json(write_stream(&st, &id, &q.path, &headers, body).await?))
}

/// Streams `body` into the file at `path` (at most [`MAX_UPLOAD`] bytes, checked
/// against `Content-Length` first and while it arrives).
pub(crate) async fn write_stream(
    st: &AppState,
    id: &SandboxRef,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<WriteReply, ApiError> {
    let (data, over) = bounded(headers, body, MAX_UPLOAD)?;
    match st.manager.write_file(id, path, data).await {
        Ok(r) => Ok(r),
        Err(_) if over.load(Ordering::Relaxed) => Err(ApiError::TooLarge {
            limit: MAX_UPLOAD as usize,
        }),
        Err(e) => Err(e.into()),
    }
}

/// `body` as a stream of at most `limit` bytes: refused up front when its
/// `Content-Length` says more, failing when more arrives (the flag then set: answer
/// [`ApiError::TooLarge`] rather than what the failed stream caused).
pub(crate) fn bounded(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<(forkbox_core::runtime::UploadStream, Arc<AtomicBool>), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge {
            limit: limit as usize,
        });
    }
    let seen = Arc::new(AtomicU64::new(0));
    let over = Arc::new(AtomicBool::new(false));
    let (s, o) = (seen.clone(), over.clone());
    let data = body.into_data_stream().map(move |r| {
        let b = r.map_err(std::io::Error::other)?;
        if s.fetch_add(b.len() as u64, Ordering::Relaxed) + b.len() as u64 > limit {
            o.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other("upload larger than the limit"));
        }
        Ok(b)
    });
    Ok((data.boxed(), over))
}

/// `GET …/files/raw?path=`: the same as `GET …/files` (the binary endpoint).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/raw", tag = "files", params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Path inside the sandbox (absolute, or relative to /root)")), responses((status = 200, description = "The bytes", content_type = "application/octet-stream", body = Vec<u8>), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn read_raw(
    st: State<AppState>,
    id: Sbx,
    q: QueryArgs<PathArg>,
) -> Result<Response, ApiError> {
    read(st, id, q).await
}

/// `PUT …/files/raw?path=`: the same as `PUT …/files` (up to 500 MiB, streamed).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files/raw", tag = "files", params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Path inside the sandbox (absolute, or relative to /root)")), request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 200, body = forkbox_types::agent::WriteReply), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn write_raw(
    st: State<AppState>,
    id: Sbx,
    q: QueryArgs<PathArg>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WriteReply>, ApiError> {
    write(st, id, q, headers, body).await
}

/// `DELETE …/files?path=[&recursive=true]`.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Path inside the sandbox (absolute, or relative to /root)"), ("recursive" = Option<bool>, Query)), responses((status = 204, description = "Removed"), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn delete(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<DeleteArgs>,
) -> Result<StatusCode, ApiError> {
    op(
        &st,
        &id,
        FileOp::Delete {
            path: q.path,
            recursive: q.recursive,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchArgs {
    path: String,
    recursive: Option<String>,
}

/// `GET …/files/watch?path=[&recursive=1]`: changes as Server-Sent Events (`event:`
/// create, modify, delete, overflow, dropped; `data:` the change as JSON).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/watch", tag = "files", params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Path inside the sandbox (absolute, or relative to /root)"), ("recursive" = Option<String>, Query)), responses((status = 200, description = "Server-Sent Events of changes", content_type = "text/event-stream", body = String), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn watch(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<WatchArgs>,
) -> Result<Response, ApiError> {
    let recursive = crate::extract::flag(q.recursive.as_deref(), "recursive")?;
    let events = st.manager.watch(&id, &q.path, recursive).await?;
    let sse = events
        .take_while(|r| futures_util::future::ready(r.is_ok()))
        .filter_map(|r| futures_util::future::ready(r.ok()))
        .map(|ev| {
            Ok::<_, std::convert::Infallible>(
                axum::response::sse::Event::default()
                    .event(ev.kind.clone())
                    .data(serde_json::to_string(&ev).unwrap_or_default()),
            )
        });
    Ok(axum::response::sse::Sse::new(sse)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

/// `GET …/files/ls?path=`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/ls", tag = "files", params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Path inside the sandbox (absolute, or relative to /root)")), responses((status = 200, body = Listing), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn ls(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathArg>,
) -> Result<Json<Listing>, ApiError> {
    match op(
        &st,
        &id,
        FileOp::Ls {
            path: q.path.clone(),
        },
    )
    .await?
    {
        FileOpReply::Entries { entries } => Ok(Json(Listing {
            path: q.path,
            entries,
        })),
        _ => Err(unexpected("ls")),
    }
}

/// `GET …/files/stat?path=`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", tag = "files", params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Path inside the sandbox (absolute, or relative to /root)")), responses((status = 200, body = forkbox_types::agent::FileInfo), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn stat(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathArg>,
) -> Result<Json<FileInfo>, ApiError> {
    Ok(Json(stat_of(&st, &id, q.path).await?))
}

/// `POST …/files/mkdir {"path"}`: `mkdir -p`; answers the directory's metadata.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files", params(("id" = String, Path, description = "Sandbox id")), request_body = PathArg, responses((status = 200, body = forkbox_types::agent::FileInfo), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn mkdir(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<PathArg>,
) -> Result<Json<FileInfo>, ApiError> {
    op(
        &st,
        &id,
        FileOp::Mkdir {
            path: b.path.clone(),
        },
    )
    .await?;
    Ok(Json(stat_of(&st, &id, b.path).await?))
}

/// `POST …/files/rename {"from", "to"}`: answers the moved file's metadata.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/rename", tag = "files", params(("id" = String, Path, description = "Sandbox id")), request_body = RenameBody, responses((status = 200, body = forkbox_types::agent::FileInfo), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn rename(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<RenameBody>,
) -> Result<Json<FileInfo>, ApiError> {
    op(
        &st,
        &id,
        FileOp::Rename {
            from: b.from,
            to: b.to.clone(),
        },
    )
    .await?;
    Ok(Json(stat_of(&st, &id, b.to).await?))
}
