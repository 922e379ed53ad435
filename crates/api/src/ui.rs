//! The web console (`/ui`): a single page (`ui/`, bundled by esbuild into `ui/dist` by
//! `make ui`) embedded in the binary at build time (`build.rs`). Its files are served
//! without a key — the page signs in with one and sends it with every API call — under a
//! Content Security Policy that lets it talk to this server only.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ui/index.html"));
const APP_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ui/app.js"));
const APP_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ui/app.css"));

/// What the page may load and reach: its own files and this server (WebSockets
/// included); styles may be set inline (the terminal sizes its cells so).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; font-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// Whether `path` is one of the console's (served without a key).
pub fn is_console(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// `/ui` and its files.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let index = || async { file("text/html; charset=utf-8", INDEX) };
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route(
            "/ui/app.js",
            get(|| async { file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { file("text/css; charset=utf-8", APP_CSS) }),
        )
}
