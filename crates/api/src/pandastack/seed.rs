//! Seed 002's REST paths where they differ from the real `pandastack` client's (both
//! are served, the same handlers behind them): files at `/files` (`/files/ls`) as well
//! as `/fs`, `POST …/snapshot` as well as `/snapshots`, identity and tokens at
//! `/auth/whoami` and `/auth/tokens` as well as `/me`, lifecycle events (SSE), the
//! terminal WebSocket, the LSP bridge, template builds.

use super::{create_token, fs_dir, me, revoke_token, snapshot, tokens};
use crate::AppState;
use axum::routing::{delete, get, post};
use axum::Router;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/sandboxes/{id}/files",
            get(crate::files::read)
                .put(crate::files::write)
                .delete(crate::files::delete),
        )
        .route("/v1/sandboxes/{id}/files/ls", get(fs_dir))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot))
        .route("/v1/sandboxes/{id}/events", get(crate::events::events))
        .route("/v1/sandboxes/{id}/exec/pty", get(crate::pty::pty))
        .route("/v1/sandboxes/{id}/lsp/{lang}", get(crate::lsp::lsp))
        .route(
            "/v1/templates",
            post(crate::templates::build).get(super::templates),
        )
        .route(
            "/v1/templates/{name}",
            delete(crate::templates::delete).get(super::template),
        )
        .route("/v1/auth/whoami", get(me))
        .route("/v1/auth/tokens", get(tokens).post(create_token))
        .route("/v1/auth/tokens/{prefix}", delete(revoke_token))
}
