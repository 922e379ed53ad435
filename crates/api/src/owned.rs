//! Path extractors that turn the `{id}` of a route into a sandbox or snapshot the
//! caller owns ([`forkbox_core::access`]): the handler never sees a bare id, so it
//! cannot act on one it did not check. The id is percent-decoded first (as every other
//! path parameter), then checked in core.

use crate::{ApiError, AppState};
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use forkbox_core::auth::Principal;
use forkbox_core::{CoreError, SandboxRef, SnapshotRef};
use std::collections::HashMap;

/// The calling principal (set by the auth middleware on every routed request).
fn caller(parts: &Parts) -> Result<Principal, ApiError> {
    parts
        .extensions
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthorized("no caller".into()))
}

/// The route's path parameters, decoded; a parameter that does not decode is no id
/// of anything.
async fn params(parts: &mut Parts, st: &AppState) -> Result<HashMap<String, String>, ApiError> {
    match Path::<HashMap<String, String>>::from_request_parts(parts, st).await {
        Ok(Path(p)) => Ok(p),
        Err(_) => Err(CoreError::NotFound("(undecodable id)".into()).into()),
    }
}

/// `{id}` as a sandbox of the caller's workspace.
pub struct Sbx(pub SandboxRef);

impl FromRequestParts<AppState> for Sbx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let p = params(parts, st).await?;
        let id = p.get("id").map(String::as_str).unwrap_or_default();
        Ok(Sbx(st.manager.sandbox_ref(&caller(parts)?, id).await?))
    }
}

/// `{id}` and `{winner}` (`/v1/sandboxes/{id}/merge_into/{winner}`) as sandboxes of the
/// caller's workspace.
pub struct SbxPair(pub SandboxRef, pub SandboxRef);

impl FromRequestParts<AppState> for SbxPair {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let p = params(parts, st).await?;
        let who = caller(parts)?;
        let get = |k: &str| p.get(k).map(String::as_str).unwrap_or_default().to_owned();
        let id = st.manager.sandbox_ref(&who, &get("id")).await?;
        let winner = st.manager.sandbox_ref(&who, &get("winner")).await?;
        Ok(SbxPair(id, winner))
    }
}

/// `{id}` as a snapshot of the caller's workspace.
pub struct Snap(pub SnapshotRef);

impl FromRequestParts<AppState> for Snap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let p = params(parts, st).await?;
        let id = p.get("id").map(String::as_str).unwrap_or_default();
        Ok(Snap(st.manager.snapshot_ref(&caller(parts)?, id).await?))
    }
}
