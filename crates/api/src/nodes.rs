//! `GET /v1/nodes`: the servers sharing this server's database, and whether each is up.

use crate::{ApiError, AppState};
use axum::extract::State;
use axum::Json;
use forkbox_core::manager::nodes::Node;
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
