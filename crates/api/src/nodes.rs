//! `GET /v1/nodes`: the servers sharing this server's database, and whether each is up.

use crate::extract::{JsonBody, PathArgs};
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::{Extension, Json};
use forkbox_core::auth::Principal;
use forkbox_core::manager::nodes::Node;
use forkbox_core::CoreError;
use forkbox_types::api::{NodeList, NodeView};

fn view(n: Node) -> NodeView {
    let ts = crate::sandboxes::rfc3339;
    NodeView {
        state: if n.up { "up" } else { "down" }.to_owned(),
        this: n.this,
        runtimes: n.record.runtimes,
        sandboxes: n.record.sandboxes,
        started_at: ts(n.record.started_at),
        heartbeat_at: ts(n.record.heartbeat_at),
        cpus: n.record.cpus,
        memory_mb: n.record.memory_mb,
        templates: n.record.templates,
        draining: n.record.draining,
        url: n.record.url,
        name: n.record.name,
    }
}

#[utoipa::path(get, path = "/v1/nodes", tag = "health", responses((status = 200, body = NodeList)))]
pub async fn list(State(st): State<AppState>) -> Result<Json<NodeList>, ApiError> {
    Ok(Json(NodeList {
        nodes: st.manager.nodes().await?.into_iter().map(view).collect(),
    }))
}

/// `POST /v1/nodes/{name}/drain`.
#[derive(serde::Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DrainBody {
    /// `false` takes new sandboxes again (default `true`).
    #[serde(default)]
    draining: Option<bool>,
}

/// No new sandboxes are placed on the node (what runs there keeps running), or,
/// with `{"draining": false}`, they are again. Admin keys only when keys are required.
#[utoipa::path(post, path = "/v1/nodes/{name}/drain", tag = "health", params(("name" = String, Path, description = "Node name")), request_body = DrainBody, responses((status = 200, body = NodeList), (status = "4XX", description = "No such node, or not an admin key", body = crate::error::ErrorBody)))]
pub async fn drain(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(name): PathArgs<String>,
    JsonBody(b): JsonBody<DrainBody>,
) -> Result<Json<NodeList>, ApiError> {
    if st.auth_required && !p.admin {
        return Err(CoreError::Forbidden("draining a node needs an admin key".into()).into());
    }
    st.manager
        .drain_node(&name, b.draining.unwrap_or(true))
        .await?;
    list(State(st)).await
}
