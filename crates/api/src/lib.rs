//! The HTTP edge of forkbox. Handlers only translate: request → typed core command →
//! response. Every error leaves through [`ApiError`] as `{"error", "code"}` JSON.

mod auth;
pub mod browser;
mod commands;
mod contexts;
mod declaw;
mod dialect;
mod error;
mod events;
mod extract;
mod files;
mod forward;
mod lsp;
mod nodes;
mod owned;
mod pandastack;
pub mod podflare;
mod podflare_pty;
pub mod ports;
mod pty;
mod relay;
mod runner;
mod sandboxes;
mod settle;
mod templates;
pub mod terminals;
mod ui;
mod volumes;

pub use auth::token_view;
pub use error::ApiError;

use axum::{Json, Router};
use forkbox_core::Manager;
use std::sync::Arc;

/// Largest JSON request body.
pub const MAX_BODY: usize = 10 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    /// Whether every request (but health and the document) needs an API key.
    pub auth_required: bool,
    /// Which browser requests are answered (Host, Origin, content type).
    pub browser: browser::BrowserPolicy,
    /// Recent exec events per sandbox, for the Podflare dialect's `replay`.
    pub replay: podflare::History,
    /// Terminal sessions kept between calls (the Podflare dialect's `pty`).
    pub terminals: terminals::Terminals,
    /// Where preview hosts (`{port}-{id}.{domain}`) live.
    pub previews: ports::Previews,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "forkbox",
        description = "Self-hosted sandboxes for AI agents: run code, stream output, keep a live REPL, fork and merge. Every error is {\"error\", \"code\"} JSON."
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&Security),
    security((), ("bearer" = []), ("api_key" = []), ("access_token" = []))
)]
struct ApiDoc;

/// The key schemes: `Authorization: Bearer`, `X-API-Key`, `?access_token=` (needed
/// unless the server runs without keys on loopback).
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        c.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("access_token"))),
        );
    }
}

/// The router and the OpenAPI document, built from the same annotated handlers, so
/// every route is in the document.
fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi as _;
    use utoipa_axum::{router::OpenApiRouter, routes};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(health))
        .routes(routes!(nodes::list))
        .routes(routes!(nodes::drain))
        .routes(routes!(sandboxes::create, sandboxes::list))
        .routes(routes!(sandboxes::get, sandboxes::delete))
        .routes(routes!(sandboxes::exec))
        .routes(routes!(sandboxes::exec_stream))
        .routes(routes!(pty::pty))
        .routes(routes!(lsp::lsp))
        .routes(routes!(ports::list))
        .routes(routes!(ports::public_link))
        .routes(routes!(events::events))
        .routes(routes!(events::all))
        .routes(routes!(events::logs))
        .routes(routes!(commands::list))
        .routes(routes!(commands::kill))
        .routes(routes!(commands::stdin))
        .routes(routes!(commands::signal))
        .routes(routes!(commands::wait))
        .routes(routes!(commands::output))
        .routes(routes!(sandboxes::set_timeout))
        .routes(routes!(sandboxes::pause))
        .routes(routes!(sandboxes::resume))
        .routes(routes!(sandboxes::fork))
        .routes(routes!(sandboxes::hibernate))
        .routes(routes!(sandboxes::wake))
        .routes(routes!(contexts::create))
        .routes(routes!(contexts::delete))
        .routes(routes!(contexts::run_cell))
        .routes(routes!(sandboxes::snapshot))
        .routes(routes!(sandboxes::list_snapshots))
        .routes(routes!(sandboxes::get_snapshot, sandboxes::delete_snapshot))
        .routes(routes!(files::read, files::write, files::delete))
        .routes(routes!(files::read_raw, files::write_raw))
        .routes(routes!(files::ls))
        .routes(routes!(files::watch))
        .routes(routes!(files::stat))
        .routes(routes!(files::mkdir))
        .routes(routes!(files::rename))
        .routes(routes!(sandboxes::merge_into))
        .routes(routes!(volumes::create, volumes::list))
        .routes(routes!(volumes::get, volumes::delete))
        .routes(routes!(runner::languages))
        .routes(routes!(runner::language))
        .routes(routes!(runner::execute))
        .routes(routes!(runner::list_rootfs, runner::build_rootfs))
        .routes(routes!(runner::list_warm, runner::warm))
        .routes(routes!(templates::build, templates::list))
        .routes(routes!(templates::get, templates::delete))
        .routes(routes!(templates::log))
        .routes(routes!(templates::follow))
        .routes(routes!(templates::import))
        .routes(routes!(auth::whoami))
        .routes(routes!(auth::list_tokens, auth::create_token))
        .routes(routes!(auth::revoke_token))
        .routes(routes!(auth::get_workspace, auth::set_workspace))
        .routes(routes!(openapi))
        .routes(routes!(metrics))
        .split_for_parts()
}

/// The OpenAPI document of this API.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The whole API as a router, ready for `axum::serve` (HTTP/1.1 and h2c).
pub fn app(state: AppState) -> Router {
    app_with(state, Router::new())
}

/// [`app`] with `extra` routes served behind the same authentication, host guard,
/// tracing and body limit (the binary's `/mcp`).
pub fn app_with(state: AppState, extra: Router<AppState>) -> Router {
    let (router, doc) = routes();
    let doc = Arc::new(doc);
    let proxy = axum::routing::any(ports::proxy);
    let inner = router
        .merge(extra)
        // Preview ports by path (docs/api.md); any method.
        .route("/v1/sandboxes/{id}/ports/{port}", proxy.clone())
        .route("/v1/sandboxes/{id}/ports/{port}/", proxy.clone())
        .route("/v1/sandboxes/{id}/ports/{port}/{*path}", proxy)
        // Client dialects, each under the prefix its client is pointed at
        // (docs/compatibility.md).
        .nest(podflare::PREFIX, podflare::router())
        .nest(pandastack::PREFIX, pandastack::router())
        // Declaw's client can only be pointed at a host (no path): its routes (no /v1)
        // are served at the root too.
        .nest(declaw::PREFIX, declaw::router())
        .merge(declaw::router())
        // The web console's page and files (docs/ui.md).
        .merge(ui::router())
        .layer(axum::Extension(doc))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside auth: only authenticated calls are passed to another node (which
        // authenticates them again, with the same key, against the shared database).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward::to_owner,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            browser::guard,
        ))
        .layer(axum::middleware::from_fn(traced))
        .layer(axum::middleware::from_fn(settle::settle_body))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |req: &axum::http::Request<axum::body::Body>| {
                    // The URI as logged: credentials in the query are redacted.
                    tracing::debug_span!(
                        "request",
                        method = %req.method(),
                        uri = %auth::redacted_uri(req.uri()),
                        version = ?req.version(),
                    )
                },
            ),
        )
        .with_state(state.clone());
    // A preview host's requests are rewritten to the by-path route before routing.
    Router::new().fallback_service(tower::Layer::layer(
        &axum::middleware::from_fn_with_state(state, ports::route_by_host),
        inner,
    ))
}

/// Prometheus metrics: sandboxes created/ended/live, execs, forks (count and
/// latency), merges, OOM kills, adoption and garbage collection, and error answers by
/// code.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "OpenMetrics text format", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
async fn metrics(
    axum::extract::State(s): axum::extract::State<AppState>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let mut reg = prometheus_client::registry::Registry::default();
    s.manager.metrics().register(&mut reg);
    reg.register(
        "forkbox_http_errors",
        "Error answers, by stable code",
        error::ERRORS.clone(),
    );
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &reg) {
        return ApiError::Internal(format!("encode metrics: {e}")).into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "health", responses((status = 200, description = "This document", body = Object)))]
async fn openapi(
    axum::Extension(doc): axum::Extension<Arc<utoipa::openapi::OpenApi>>,
) -> Json<utoipa::openapi::OpenApi> {
    Json((*doc).clone())
}

#[utoipa::path(get, path = "/v1/healthz", tag = "health", responses((status = 200, description = "Server health", body = Object)))]
async fn healthz(
    axum::extract::State(s): axum::extract::State<AppState>,
) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "runtime": s.manager.runtime_name(),
        "runtimes": s.manager.runtimes_live().into_iter().map(|(name, accel)| {
            let mut r = serde_json::json!({"name": name});
            if let Some(a) = accel {
                r["accelerator"] = a.into();
            }
            r
        }).collect::<Vec<_>>(),
        "sandboxes": s.manager.live_count(),
        "warm_pool": s.manager.create_pools().iter().map(|p| serde_json::json!({
            "template": p.template, "ready": p.ready, "target": p.target,
            "keeping": p.keeping,
        })).collect::<Vec<_>>(),
    }))
}

#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, description = "Health (code-runner contract)", body = Object)))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "healthy", "version": env!("CARGO_PKG_VERSION") }))
}

/// Runs a request under its W3C `traceparent` (when it sends a valid one), so every log
/// line of its work carries the caller's trace id and parent span id.
async fn traced(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let tp = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(forkbox_core::trace::TraceParent::parse);
    match tp {
        Some(t) => {
            let span = tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                trace_id = %t.trace_id,
                parent_span_id = %t.parent_span_id
            );
            t.adopt(&span);
            next.run(req).instrument(span).await
        }
        None => next.run(req).await,
    }
}

async fn not_found() -> ApiError {
    ApiError::NoRoute
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
