//! `/v1/volumes`: persistent directories with a size limit, mounted at create.

use crate::extract::{JsonBody, PathArgs};
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use forkbox_core::auth::Principal;
use forkbox_core::Volume;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeBody {
    name: String,
    /// Size limit in MiB (16 – 1048576); writes past it fail with ENOSPC inside.
    size_mb: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VolumeView {
    id: String,
    name: String,
    size_mb: u64,
    /// Bytes in use (when the volume is mounted on the host).
    used_bytes: Option<u64>,
    created_at: String,
}

async fn view(st: &AppState, v: Volume) -> VolumeView {
    VolumeView {
        used_bytes: st.manager.volume_used(&v.id).await,
        created_at: crate::sandboxes::rfc3339(v.created_at),
        id: v.id,
        name: v.name,
        size_mb: v.size_mb,
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VolumeList {
    volumes: Vec<VolumeView>,
}

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = CreateVolumeBody, responses((status = 201, body = VolumeView), (status = "4XX", description = "Invalid request", body = crate::error::ErrorBody), (status = "5XX", description = "Server failure", body = crate::error::ErrorBody)))]
pub async fn create(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    JsonBody(b): JsonBody<CreateVolumeBody>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let v = st
        .manager
        .create_volume(&p.workspace, &b.name, b.size_mb)
        .await?;
    Ok((StatusCode::CREATED, Json(view(&st, v).await)))
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", responses((status = 200, body = VolumeList)))]
pub async fn list(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<VolumeList>, ApiError> {
    let mut volumes = Vec::new();
    for v in st.manager.volumes(&p.workspace).await? {
        volumes.push(view(&st, v).await);
    }
    Ok(Json(VolumeList { volumes }))
}

#[utoipa::path(get, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path, description = "Volume id")), responses((status = 200, body = VolumeView), (status = "4XX", description = "No such volume", body = crate::error::ErrorBody)))]
pub async fn get(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(id): PathArgs<String>,
) -> Result<Json<VolumeView>, ApiError> {
    let v = st.manager.volume_of(&p.workspace, &id).await?;
    Ok(Json(view(&st, v).await))
}

#[utoipa::path(delete, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path, description = "Volume id")), responses((status = 204, description = "Deleted with its data"), (status = "4XX", description = "No such volume, or mounted by a sandbox (409)", body = crate::error::ErrorBody)))]
pub async fn delete(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(id): PathArgs<String>,
) -> Result<StatusCode, ApiError> {
    st.manager.delete_volume(&p.workspace, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
