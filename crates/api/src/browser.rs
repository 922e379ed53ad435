//! What a web page may make a browser do to the server. Any page the developer visits
//! can send requests to `http://127.0.0.1:7070` (CSRF: form posts and `no-cors`
//! fetches need no permission) and, by rebinding its own DNS name to 127.0.0.1, read
//! the answers (DNS rebinding). With auth off, that would be running code. So:
//!
//! - **Host**: when auth is off (or hosts are configured), the `Host` header must name
//!   an allowed host (loopback names and addresses, the listen address, `--allowed-host`)
//!   — a rebound name is refused (421).
//! - **Origin**: a request carrying `Origin` (every browser's cross-origin request does)
//!   is served only when that origin is loopback or configured (`--cors-origin`);
//!   others are refused (403). Configured origins get CORS headers and preflights.
//! - **Content type**: a body sent as `text/plain` or `multipart/form-data` (what a page
//!   can send without a preflight) is never taken for JSON (415); a form-encoded one
//!   only from a non-browser client (`curl -d`), not with `Origin` or `Sec-Fetch-Site`.

use crate::{ApiError, AppState};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Which browser requests the server answers.
#[derive(Debug, Clone, Default)]
pub struct BrowserPolicy {
    /// Host names (no port) requests may name besides loopback ones; `None`: any host
    /// (auth on, nothing configured).
    pub allowed_hosts: Option<Vec<String>>,
    /// Origins (`scheme://host[:port]`) besides loopback ones whose browser requests
    /// are answered, with CORS headers.
    pub cors_origins: Vec<String>,
}

impl BrowserPolicy {
    /// A policy checking `Host` when `check_host` (against loopback names and `hosts`)
    /// and answering browsers from loopback origins and `cors_origins`.
    pub fn new(check_host: bool, hosts: Vec<String>, cors_origins: Vec<String>) -> Self {
        let norm = |h: String| h.trim().trim_end_matches('.').to_ascii_lowercase();
        let hosts: Vec<String> = hosts.into_iter().map(norm).collect();
        BrowserPolicy {
            allowed_hosts: check_host.then_some(hosts),
            cors_origins: cors_origins
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        match &self.allowed_hosts {
            None => true,
            Some(list) => is_loopback_name(host) || list.iter().any(|h| h == host),
        }
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.cors_origins.contains(&origin) {
            return true;
        }
        // A page served from loopback is as trusted as a local process — but not a
        // page a sandbox serves on a preview host: any host whose first label starts
        // with a port number and a dash (`8000-sbx-….localhost`, a public link's
        // `8000-sbx-…-<expiry>-<signature>.localhost`, whatever its shape).
        match origin.split_once("://") {
            Some(("http" | "https", rest)) => {
                let host = host_of(rest);
                is_loopback_name(&host) && !preview_like(&host)
            }
            _ => false,
        }
    }
}

/// `host[:port]` (or `[v6]:port`) → the host, lowercase, without brackets or port.
fn host_of(authority: &str) -> String {
    let a = authority.trim().to_ascii_lowercase();
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default().to_owned()
    } else {
        a.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map(|(h, _)| h.to_owned())
            .unwrap_or(a)
    };
    host.trim_end_matches('.').to_owned()
}

/// Whether a host's first label starts like a preview host's (`<digits>-…`).
fn preview_like(host: &str) -> bool {
    host.split('.')
        .next()
        .and_then(|label| label.split_once('-'))
        .is_some_and(|(port, _)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
}

/// `localhost`, `*.localhost`, 127.0.0.0/8 and ::1.
fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn refuse(status: StatusCode, code: &'static str, msg: String) -> Response {
    let body = serde_json::json!({ "error": msg, "code": code });
    (status, axum::Json(body)).into_response()
}

/// Content types a page may send without a CORS preflight (besides form encoding).
fn is_simple_non_form(ct: &str) -> bool {
    ct.starts_with("text/plain") || ct.starts_with("multipart/form-data")
}

/// Whether the request comes from a browser page (it says where from).
fn from_browser(h: &HeaderMap) -> bool {
    h.contains_key(header::ORIGIN) || h.contains_key("sec-fetch-site")
}

/// The middleware (outermost but tracing): see the module comment.
pub async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // A preview host's requests are the sandbox app's: its host was recognized, and
    // what its pages send is the app's business, not the API's.
    if req.extensions().get::<crate::ports::ByHost>().is_some() {
        return next.run(req).await;
    }
    let policy = &st.browser;
    let h = req.headers();
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(host_of)
        .or_else(|| req.uri().host().map(host_of));
    if let Some(host) = &host {
        if !policy.host_allowed(host) {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "host_not_allowed",
                format!(
                    "this server does not answer for host {host:?} (allowed: loopback names \
                     and --allowed-host)"
                ),
            );
        }
    }
    let origin = h
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(o) = &origin {
        if !policy.origin_allowed(o) {
            return refuse(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!("cross-origin requests from {o} are not allowed (see --cors-origin)"),
            );
        }
    }
    if let Some(ct) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let ct = ct.to_ascii_lowercase();
        let form = ct.starts_with("application/x-www-form-urlencoded");
        let expects_json = !is_upload(req.uri().path());
        if expects_json && (is_simple_non_form(&ct) || (form && from_browser(h))) {
            return ApiError::UnsupportedMediaType(format!(
                "a JSON body must be sent as application/json, not {ct}"
            ))
            .into_response();
        }
    }
    // A preflight from an allowed origin: answered here.
    let preflight = req.method() == Method::OPTIONS
        && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        && origin.is_some();
    if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        cors_headers(&mut r, origin.as_deref());
        let hd = r.headers_mut();
        hd.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        hd.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, x-api-key, traceparent"),
        );
        hd.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        return r;
    }
    let mut r = next.run(req).await;
    cors_headers(&mut r, origin.as_deref());
    r
}

/// Routes whose body is raw bytes, not JSON (file uploads, preview ports).
fn is_upload(path: &str) -> bool {
    path.ends_with("/files") || path.ends_with("/files/raw") || crate::ports::is_proxy_path(path)
}

/// CORS headers for an (already allowed) origin.
fn cors_headers(r: &mut Response, origin: Option<&str>) {
    let Some(v) = origin.and_then(|o| HeaderValue::from_str(o).ok()) else {
        return;
    };
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins() {
        let off = BrowserPolicy::new(true, vec!["Sandbox.Example.".into()], vec![]);
        for ok in [
            "localhost",
            "127.0.0.1",
            "::1",
            "a.localhost",
            "sandbox.example",
        ] {
            assert!(off.host_allowed(ok), "{ok}");
        }
        for bad in [
            "attacker.example",
            "127.0.0.1.nip.io",
            "0.0.0.0",
            "localhost.evil",
        ] {
            assert!(!off.host_allowed(bad), "{bad}");
        }
        let on = BrowserPolicy::new(false, vec![], vec!["https://console.example".into()]);
        assert!(on.host_allowed("anything.example"));
        assert!(on.origin_allowed("https://console.example/"));
        assert!(on.origin_allowed("http://localhost:3000"));
        assert!(on.origin_allowed("http://[::1]:8080"));
        assert!(!on.origin_allowed("https://attacker.example"));
        assert!(!on.origin_allowed("null"));
        assert!(!on.origin_allowed("http://localhost.attacker.example"));
        // Pages a sandbox serves on a preview host are not trusted.
        assert!(!on.origin_allowed("http://8000-sbx-abcdefghij012345.localhost:7070"));
        // … nor on a public link's host, nor anything shaped like a preview host.
        assert!(!on.origin_allowed(
            "http://8000-sbx-abcdefghij012345-6a2f0e11-0123456789abcdef01234567.localhost:7070"
        ));
        assert!(!on.origin_allowed("http://8000-sbx-short.localhost:7070"));
        assert!(on.origin_allowed("http://app.localhost:7070"));
        assert_eq!(host_of("LOCALHOST:7070"), "localhost");
        assert_eq!(host_of("[::1]:7070"), "::1");
        assert_eq!(host_of("example.com."), "example.com");
    }
}
