//! The HTTP edge of forkbox. Handlers only translate: request → typed core command →
//! response. Every error leaves through [`ApiError`] as `{"error", "code"}` JSON.

mod commands;
mod error;
mod events;
mod extract;
mod files;
mod pty;
mod sandboxes;

pub use error::ApiError;

use axum::routing::{delete, get, post};
use axum::{Json, Router};
use forkbox_core::Manager;
use std::sync::Arc;

/// Largest JSON request body.
pub const MAX_BODY: usize = 10 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
}

/// The whole API as a router, ready for `axum::serve` (HTTP/1.1 and h2c).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/healthz", get(healthz))
        .route("/health", get(health))
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/v1/sandboxes/{id}/exec", post(sandboxes::exec))
        .route(
            "/v1/sandboxes/{id}/exec/stream",
            post(sandboxes::exec_stream),
        )
        .route("/v1/sandboxes/{id}/exec/pty", get(pty::pty))
        .route("/v1/sandboxes/{id}/events", get(events::events))
        .route("/v1/sandboxes/{id}/logs", get(events::logs))
        .route("/v1/sandboxes/{id}/commands", get(commands::list))
        .route("/v1/sandboxes/{id}/commands/{pid}", delete(commands::kill))
        .route(
            "/v1/sandboxes/{id}/commands/{pid}/stdin",
            post(commands::stdin),
        )
        .route(
            "/v1/sandboxes/{id}/commands/{pid}/signal",
            post(commands::signal),
        )
        .route(
            "/v1/sandboxes/{id}/commands/{pid}/wait",
            get(commands::wait),
        )
        .route(
            "/v1/sandboxes/{id}/commands/{pid}/output",
            get(commands::output),
        )
        .route(
            "/v1/sandboxes/{id}/timeout",
            post(sandboxes::set_timeout).patch(sandboxes::set_timeout),
        )
        .route("/v1/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/v1/sandboxes/{id}/fork", post(sandboxes::fork))
        .route("/v1/sandboxes/{id}/hibernate", post(sandboxes::hibernate))
        .route("/v1/sandboxes/{id}/wake", post(sandboxes::wake))
        .route("/v1/sandboxes/{id}/snapshot", post(sandboxes::snapshot))
        .route("/v1/snapshots", get(sandboxes::list_snapshots))
        .route(
            "/v1/snapshots/{id}",
            get(sandboxes::get_snapshot).delete(sandboxes::delete_snapshot),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::read).put(files::write).delete(files::delete),
        )
        .route(
            "/v1/sandboxes/{id}/files/raw",
            get(files::read).put(files::write),
        )
        .route("/v1/sandboxes/{id}/files/ls", get(files::ls))
        .route("/v1/sandboxes/{id}/files/watch", get(files::watch))
        .route("/v1/sandboxes/{id}/files/stat", get(files::stat))
        .route("/v1/sandboxes/{id}/files/mkdir", post(files::mkdir))
        .route("/v1/sandboxes/{id}/files/rename", post(files::rename))
        .route(
            "/v1/sandboxes/{child}/merge_into/{parent}",
            post(sandboxes::merge_into),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn healthz(
    axum::extract::State(s): axum::extract::State<AppState>,
) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "runtime": s.manager.runtime_name(),
        "sandboxes": s.manager.live_count(),
    }))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "healthy", "version": env!("CARGO_PKG_VERSION") }))
}

async fn not_found() -> ApiError {
    ApiError::NoRoute
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
