//! Any node serves the whole API: a request about a sandbox another node runs is
//! passed to that node (at the URL it registered) and its answer passed back, bodies
//! streaming both ways and upgrades (terminals) spliced through (`relay`). The
//! client's own credentials go along: the owner authenticates and authorizes the call
//! against the shared database exactly as if it had been sent there. A forwarded
//! request says so (`x-forkbox-forwarded-by`) and is never forwarded again. A node
//! whose heartbeat lapsed, or that refuses the connection, answers
//! `502 node_unreachable`. Calls between nodes carry the cluster secret the nodes
//! share through the database; a call marked as forwarded without it is refused.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use forkbox_core::manager::nodes::Owner;

/// Marks a request one node passed to another (its value: the sender's node name).
pub const FORWARDED_BY: &str = "x-forkbox-forwarded-by";
/// On every call one node passes to another: the cluster secret, which the receiver
/// checks (and removes: nothing past it, such as a sandbox's port, sees it).
pub const SECRET: &str = "x-forkbox-cluster-secret";
/// On a create placed on another node: the reservation its record ends.
pub const PLACEMENT: &str = "x-forkbox-placement";

/// The sandbox a request is about: the first path segment that is a sandbox id.
pub fn sandbox_in(path: &str) -> Option<&str> {
    path.split('/').find(|s| {
        s.len() > 4
            && s.starts_with("sbx-")
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// On a request another node passed on (it carried the cluster secret): the
/// reservation of the create placed here, if it is one. The marks themselves are
/// taken off the request, so nothing past this (a sandbox's port) sees them.
#[derive(Clone, Debug, Default)]
pub struct Forwarded {
    pub placement: Option<String>,
}

/// A placement's reservation, released when this is dropped: the create was made,
/// failed, or its caller went away mid-way.
pub struct Reserved {
    manager: std::sync::Arc<forkbox_core::Manager>,
    token: Option<String>,
}

impl Reserved {
    pub fn new(manager: &std::sync::Arc<forkbox_core::Manager>, token: Option<String>) -> Self {
        Reserved {
            manager: manager.clone(),
            token,
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        let manager = self.manager.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { manager.release_placement(&token).await });
        }
    }
}

/// What a request is about that lives on one node: a sandbox (any call), or a volume
/// or snapshot when it changes one (their records are read anywhere).
fn held_in<'a>(method: &axum::http::Method, path: &'a str) -> Option<&'a str> {
    sandbox_in(path).or_else(|| {
        if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
            return None;
        }
        let mut segs = path.split('/');
        match (segs.next(), segs.next(), segs.next(), segs.next()) {
            (Some(""), Some("v1"), Some("volumes" | "snapshots"), Some(id))
                if id.starts_with("vol-") || id.starts_with("snap-") =>
            {
                Some(id)
            }
            _ => None,
        }
    })
}

pub async fn to_owner(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    if req.headers().contains_key(FORWARDED_BY) {
        let h = req.headers_mut();
        let genuine = h
            .remove(SECRET)
            .is_some_and(|v| st.manager.is_cluster_secret(v.as_bytes()));
        if !genuine {
            return ApiError::Unauthorized(format!(
                "{FORWARDED_BY} marks a call passed on by another node, and needs the \
                 cluster secret ({SECRET}) it is sent with"
            ))
            .into_response();
        }
        h.remove(FORWARDED_BY);
        let placement = h
            .remove(PLACEMENT)
            .and_then(|v| v.to_str().ok().map(str::to_owned));
        req.extensions_mut().insert(Forwarded { placement });
        return next.run(req).await;
    }
    for name in [SECRET, PLACEMENT] {
        req.headers_mut().remove(name);
    }
    let Some(id) = held_in(req.method(), req.uri().path()).map(str::to_owned) else {
        return next.run(req).await;
    };
    let owner = match st.manager.owner(&id).await {
        Ok(o) => o,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Owner::Elsewhere { node, url, up } = owner else {
        return next.run(req).await;
    };
    if !up || url.is_empty() {
        return unheard(&id, &node).into_response();
    }
    // Node URLs come from the list the last heartbeat read: a node that restarted
    // since may listen elsewhere, so a refused connection reads the list again once.
    let (conn, node, url) = match connect(&node, &url).await {
        Ok(c) => (c, node, url),
        Err(e) => {
            let _ = st.manager.nodes().await;
            match st.manager.owner(&id).await {
                Ok(Owner::Elsewhere {
                    node: n2,
                    url: u2,
                    up: true,
                }) if u2 != url => match connect(&n2, &u2).await {
                    Ok(c) => (c, n2, u2),
                    Err(e) => return e.into_response(),
                },
                _ => return e.into_response(),
            }
        }
    };
    match send(&st, req, conn, &node, &url).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `id` lives on node `node`, which is down.
pub fn unheard(id: &str, node: &str) -> ApiError {
    if id.starts_with("sbx-") {
        ApiError::NodeUnreachable(format!(
            "sandbox {id} runs on node {node}, which has not been heard from; it is \
             lost if the node does not return within its orphan grace period"
        ))
    } else {
        ApiError::NodeUnreachable(format!(
            "{id} is kept on node {node}, which has not been heard from; it is usable \
             again when the node returns (docs/cluster.md: moving volumes)"
        ))
    }
}

/// Kept-alive connections to other nodes, by URL, for requests that do not upgrade.
type Idle = hyper::client::conn::http1::SendRequest<axum::body::Body>;
static IDLE: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, Vec<Idle>>>> =
    std::sync::LazyLock::new(Default::default);
/// Most kept-alive connections to one node.
const IDLE_MAX: usize = 32;

fn idle() -> std::sync::MutexGuard<'static, std::collections::HashMap<String, Vec<Idle>>> {
    IDLE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection to node `node` at `url` (a kept-alive one when one is free), and the
/// authority to name in its `Host`.
async fn connect(node: &str, url: &str) -> Result<(Idle, String), ApiError> {
    let unreachable = |e: String| ApiError::NodeUnreachable(format!("node {node} ({url}): {e}"));
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned();
    if !url.starts_with("http://") || authority.is_empty() {
        return Err(unreachable("only http:// node URLs are reached".into()));
    }
    {
        let mut pool = idle();
        let conns = pool.entry(url.to_owned()).or_default();
        conns.retain(|c| !c.is_closed());
        if let Some(i) = conns.iter().position(|c| c.is_ready()) {
            return Ok((conns.swap_remove(i), authority));
        }
    }
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(&authority),
    )
    .await
    .map_err(|_| unreachable("no connection within 5 s".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let sender = crate::relay::handshake(stream).await.map_err(unreachable)?;
    Ok((sender, authority))
}

/// `req` sent on `conn` to node `node` (at `url`, named `authority`); the connection is
/// kept for the next request unless it was upgraded.
async fn send(
    st: &AppState,
    req: Request,
    (mut conn, authority): (Idle, String),
    node: &str,
    url: &str,
) -> Result<Response, ApiError> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let (mut out, client_upgrade) = crate::relay::outgoing(req, &target, &authority, |_| false)
        .map_err(ApiError::BadRequest)?;
    let secret = st
        .manager
        .cluster_secret()
        .ok_or_else(|| ApiError::Internal("this node has not registered".into()))?;
    let h = out.headers_mut();
    h.insert(
        HeaderName::from_static(FORWARDED_BY),
        HeaderValue::from_str(st.manager.node_name())
            .map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    h.insert(
        HeaderName::from_static(SECRET),
        HeaderValue::from_str(secret).map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    let upgrade = client_upgrade.is_some();
    let resp = crate::relay::send_on(&mut conn, out, client_upgrade)
        .await
        .map_err(|e| ApiError::NodeUnreachable(format!("node {node} ({url}): {e}")))?;
    if !upgrade {
        let mut pool = idle();
        let conns = pool.entry(url.to_owned()).or_default();
        if conns.len() < IDLE_MAX {
            conns.push(conn);
        }
    }
    Ok(resp)
}

/// A create placed on node `node` (at `url`): the same body, with the caller's
/// credentials and trace context, made there; its answer is this one. `None` when the
/// node cannot be reached at all (nothing was sent: the caller makes it itself).
pub async fn create_on(
    st: &AppState,
    headers: &axum::http::HeaderMap,
    body: &forkbox_types::api::CreateBody,
    node: &str,
    url: &str,
    placement: Option<&str>,
) -> Result<Option<Response>, ApiError> {
    let conn = match connect(node, url).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(node, error = %e, "placement: node not reached; made here");
            return Ok(None);
        }
    };
    let json = serde_json::to_vec(body).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut req = axum::http::Request::builder()
        .method(axum::http::Method::POST)
        .uri("/v1/sandboxes")
        .body(axum::body::Body::from(json))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let h = req.headers_mut();
    for name in ["authorization", "x-api-key", "traceparent", "tracestate"] {
        if let Some(v) = headers.get(name) {
            h.insert(HeaderName::from_static(name), v.clone());
        }
    }
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(token) = placement {
        h.insert(
            HeaderName::from_static(PLACEMENT),
            HeaderValue::from_str(token).map_err(|e| ApiError::Internal(e.to_string()))?,
        );
    }
    send(st, req, conn, node, url).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_is_found_in_any_dialect_path() {
        assert_eq!(sandbox_in("/v1/sandboxes/sbx-00ff/exec"), Some("sbx-00ff"));
        assert_eq!(
            sandbox_in("/podflare/v1/sandboxes/sbx-1a/files"),
            Some("sbx-1a")
        );
        assert_eq!(sandbox_in("/sandboxes/sbx-9"), Some("sbx-9"));
        assert_eq!(sandbox_in("/v1/sandboxes"), None);
        assert_eq!(sandbox_in("/v1/sandboxes/sbx-"), None);
        assert_eq!(sandbox_in("/v1/sandboxes/sbx-%2e%2e"), None);
    }

    #[test]
    fn volumes_and_snapshots_go_to_their_node_only_to_change() {
        use axum::http::Method;
        assert_eq!(held_in(&Method::DELETE, "/v1/volumes/vol-1"), Some("vol-1"));
        assert_eq!(
            held_in(&Method::DELETE, "/v1/snapshots/snap-1"),
            Some("snap-1")
        );
        assert_eq!(held_in(&Method::GET, "/v1/volumes/vol-1"), None);
        assert_eq!(held_in(&Method::DELETE, "/v1/volumes/x"), None);
        assert_eq!(held_in(&Method::GET, "/v1/sandboxes/sbx-2"), Some("sbx-2"));
    }
}
