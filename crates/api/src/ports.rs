//! Preview ports: a server listening inside a sandbox (`python3 -m http.server 8000`, a
//! dev server with WebSockets) reached from outside through forkbox, over a connection
//! the sandbox's agent opens to its own loopback (`Manager::tcp`; jail and vm alike).
//!
//! - **By path**: `ANY /v1/sandboxes/{id}/ports/{port}/{path…}` (under the API's auth and
//!   browser rules). The answer runs in an opaque origin (`Content-Security-Policy:
//!   sandbox …`) and cannot set cookies, because this path shares the API's origin: a
//!   page a sandbox serves must not act as the API's own pages.
//! - **By host**: `{port}-{id}.{preview domain}` (default domain `localhost`, so
//!   `http://8000-sbx-….localhost:7070/` works in a browser on the same machine), for
//!   apps that use absolute paths. Every request to such a host goes to the port, never
//!   to the API: [`route_by_host`] rewrites it to the by-path route before routing, so
//!   auth and workspace checks apply unchanged. Pages served there are untrusted
//!   origins for the API (`browser.rs`).
//!
//! HTTP/1.1 to the sandbox (clients may speak HTTP/1.1 or HTTP/2), bodies streamed both
//! ways, WebSocket (and any HTTP/1.1 upgrade) passed through. One connection into the
//! sandbox per request. `GET /v1/sandboxes/{id}/ports` lists the listening ports.

use crate::error::ApiError;
use crate::owned::Sbx;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where preview hosts live: `{port}-{id}.{domain}`.
#[derive(Debug, Clone)]
pub struct Previews {
    pub domain: String,
}

impl Default for Previews {
    fn default() -> Self {
        Previews {
            domain: "localhost".into(),
        }
    }
}

/// Set on a request that came in for a public link's host, whose signature was
/// checked: the caller it stands for (never set by a client).
#[derive(Clone)]
pub struct PublicPreview(pub forkbox_core::auth::Principal);

/// Set on a request that came in for a preview host (never by a client).
#[derive(Debug, Clone, Copy)]
pub struct ByHost;

/// `{port}-{sandbox id}` of a preview host's first label, whatever its domain.
pub fn preview_label(host: &str) -> Option<(u16, &str)> {
    let label = host.split('.').next()?;
    let (port, id) = label.split_once('-')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    forkbox_core::ids::is_valid("sbx", id).then_some((port, id))
}

impl Previews {
    /// The port and sandbox a request's host names, when it is a preview host.
    pub fn parse<'a>(&self, host: &'a str) -> Option<(u16, &'a str)> {
        let rest = host.split_once('.')?.1;
        (rest == self.domain).then_some(())?;
        preview_label(host)
    }
}

/// `Host` (or the URI's authority) without port, lowercase.
fn request_host(req: &Request) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))?;
    let raw = raw.to_ascii_lowercase();
    let host = match raw.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(']') => h,
        _ => raw.as_str(),
    };
    Some(host.trim_end_matches('.').to_owned())
}

/// The outermost step: a request for a preview host goes to that port's by-path route.
pub async fn route_by_host(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let host = request_host(&req);
    let mut target = host
        .as_deref()
        .and_then(|h| st.previews.parse(h).map(|(port, id)| (port, id.to_owned())));
    // A public link's host (`{port}-{id}-{expiry}-{signature}`): signed by this
    // cluster and not expired, it stands for the sandbox's workspace on that port
    // alone (every request for the host goes to the port); anything else that looks
    // like one is a 404, like a sandbox that does not exist.
    if let Some(label) = host
        .as_deref()
        .and_then(|h| h.split_once('.'))
        .filter(|(_, rest)| *rest == st.previews.domain)
        .map(|(label, _)| label)
        .filter(|l| target.is_none() && l.matches('-').count() >= 4)
    {
        match st.manager.preview_principal(label).await {
            Some((port, id, principal)) => {
                req.extensions_mut().insert(PublicPreview(principal));
                target = Some((port, id));
            }
            None => {
                return axum::response::IntoResponse::into_response(ApiError::from(
                    forkbox_core::CoreError::NotFound("preview link".into()),
                ))
            }
        }
    }
    if let Some((port, id)) = target {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let pq = if pq.starts_with('/') {
            pq
        } else {
            format!("/{pq}")
        };
        match format!("/v1/sandboxes/{id}/ports/{port}{pq}").parse::<Uri>() {
            Ok(uri) => {
                *req.uri_mut() = uri;
                req.extensions_mut().insert(ByHost);
            }
            Err(_) => {
                return axum::response::IntoResponse::into_response(ApiError::BadRequest(
                    "malformed request target".into(),
                ))
            }
        }
    }
    next.run(req).await
}

/// Whether a path is a by-path preview request (its body is the app's, not JSON).
pub fn is_proxy_path(path: &str) -> bool {
    let mut seg = path.split('/');
    matches!(
        (seg.next(), seg.next(), seg.next(), seg.next(), seg.next(), seg.next()),
        (Some(""), Some("v1"), Some("sandboxes"), Some(_), Some("ports"), Some(p)) if p.parse::<u16>().is_ok()
    )
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PortView {
    port: u16,
    /// The address it is bound to inside the sandbox.
    address: String,
    /// By path, on this server.
    path: String,
    /// By host: `{port}-{id}.{preview domain}` (plus this server's port).
    host: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PortList {
    ports: Vec<PortView>,
}

/// The port of this server a request came in on, from its `Host`.
fn server_port(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.rsplit_once(':'))
        .map(|(_, p)| p.to_owned())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// A preview host of this server: `label.{preview domain}[:server port]`.
fn preview_host(st: &AppState, label: &str, server_port: Option<&str>) -> String {
    match server_port {
        Some(sp) => format!("{label}.{}:{sp}", st.previews.domain),
        None => format!("{label}.{}", st.previews.domain),
    }
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
pub struct PreviewBody {
    /// The sandbox's port the link opens.
    port: u16,
    /// Seconds the link works (default a day, at most 30 days).
    expires_in: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PreviewView {
    port: u16,
    /// `{port}-{id}-{expiry}-{signature}.{preview domain}[:server port]`
    host: String,
    /// `http://{host}/`: opens the port without a key.
    url: String,
    /// RFC 3339.
    expires_at: String,
}

/// A public link to one port: anyone holding it reaches that port, without a key,
/// until it expires or the sandbox ends.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/previews", tag = "ports", params(("id" = String, Path, description = "Sandbox id")), request_body = PreviewBody, responses((status = 201, body = PreviewView), (status = "4XX", description = "Invalid request, unknown or ended sandbox", body = crate::error::ErrorBody)))]
pub async fn public_link(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    headers: HeaderMap,
    crate::extract::JsonBody(b): crate::extract::JsonBody<PreviewBody>,
) -> Result<(StatusCode, Json<PreviewView>), ApiError> {
    let link = st
        .manager
        .public_preview(&id, b.port, b.expires_in.unwrap_or(24 * 3600))?;
    let host = preview_host(&st, &link.label, server_port(&headers).as_deref());
    let expires_at = time::OffsetDateTime::from_unix_timestamp(link.expires as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(PreviewView {
            port: b.port,
            url: format!("http://{host}/"),
            host,
            expires_at,
        }),
    ))
}

/// Lists the TCP ports something listens on in the sandbox, with where each is reached.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports", tag = "ports", params(("id" = String, Path, description = "Sandbox id")), responses((status = 200, body = PortList), (status = "4XX", description = "Unknown, ended or not running", body = crate::error::ErrorBody)))]
pub async fn list(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    headers: HeaderMap,
) -> Result<Json<PortList>, ApiError> {
    let server_port = server_port(&headers);
    let ports = st
        .manager
        .ports(&id)
        .await?
        .into_iter()
        .map(|p| PortView {
            path: format!("/v1/sandboxes/{id}/ports/{}/", p.port),
            host: preview_host(&st, &format!("{}-{id}", p.port), server_port.as_deref()),
            port: p.port,
            address: p.address,
        })
        .collect();
    Ok(Json(PortList { ports }))
}

/// Sandbox `id`'s `port`: the request passed on, the answer passed back.
pub async fn proxy(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    req: Request,
) -> Result<Response, ApiError> {
    let by_host = req.extensions().get::<ByHost>().is_some();
    // `/v1/sandboxes/{id}/ports/{port}[/rest]`, raw (as sent, still percent-encoded).
    let path = req.uri().path().to_owned();
    let mut seg = path.splitn(7, '/').skip(5);
    let port: u16 = seg
        .next()
        .and_then(|p| p.parse().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::BadRequest("port must be 1-65535".into()))?;
    let rest = seg.next().unwrap_or("");
    let prefix = format!("/v1/sandboxes/{id}/ports/{port}");
    let target = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };

    // A connection into the sandbox, as an in-process duplex pipe hyper can speak on.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let mut from_sandbox = st
        .manager
        .tcp(
            &id,
            port,
            tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        )
        .await?;
    let (near, far) = tokio::io::duplex(64 * 1024);
    let (mut far_r, mut far_w) = tokio::io::split(far);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        while let Ok(n) = far_r.read(&mut buf).await {
            if n == 0
                || tx
                    .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
            {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(Ok(b)) = from_sandbox.next().await {
            if far_w.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = far_w.shutdown().await;
    });
    let original_host = req.headers().get(header::HOST).cloned();
    let auth_required = st.auth_required;
    let (mut out, client_upgrade) =
        crate::relay::outgoing(req, &target, &format!("localhost:{port}"), |k| {
            // The key that authenticated this call is forkbox's, not the app's.
            auth_required && (k == header::AUTHORIZATION || k.as_str() == "x-api-key")
        })
        .map_err(ApiError::BadRequest)?;
    let h = out.headers_mut();
    if let Some(oh) = original_host {
        h.insert(HeaderName::from_static("x-forwarded-host"), oh);
    }
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if !by_host {
        if let Ok(p) = HeaderValue::from_str(&prefix) {
            h.insert(HeaderName::from_static("x-forwarded-prefix"), p);
        }
    }
    let mut resp = crate::relay::send(near, out, client_upgrade)
        .await
        .map_err(|e| ApiError::BadGateway(format!("the server on port {port}: {e}")))?;
    if !by_host && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let h = resp.headers_mut();
        h.remove(header::SET_COOKIE);
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads",
            ),
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_hosts() {
        let p = Previews::default();
        let id = "sbx-abcdefghij012345";
        assert_eq!(p.parse(&format!("8000-{id}.localhost")), Some((8000, id)));
        assert_eq!(p.parse(&format!("8000-{id}.example.com")), None);
        assert_eq!(p.parse(&format!("0-{id}.localhost")), None);
        assert_eq!(p.parse(&format!("70000-{id}.localhost")), None);
        assert_eq!(p.parse("8000-sbx-short.localhost"), None);
        assert_eq!(p.parse("localhost"), None);
        assert_eq!(p.parse(&format!("x.8000-{id}.localhost")), None);
        let custom = Previews {
            domain: "preview.example.com".into(),
        };
        assert_eq!(
            custom.parse(&format!("3000-{id}.preview.example.com")),
            Some((3000, id))
        );
        assert_eq!(
            preview_label(&format!("3000-{id}.anything")),
            Some((3000, id))
        );
    }

    #[test]
    fn proxy_paths() {
        assert!(is_proxy_path("/v1/sandboxes/sbx-x/ports/8000/a/b"));
        assert!(is_proxy_path("/v1/sandboxes/sbx-x/ports/8000"));
        assert!(!is_proxy_path("/v1/sandboxes/sbx-x/ports"));
        assert!(!is_proxy_path("/v1/sandboxes/sbx-x/files"));
    }
}
