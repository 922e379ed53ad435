//! One HTTP/1.1 request passed on over a byte stream and its answer passed back:
//! bodies streamed both ways, an upgrade (WebSocket) spliced through. Used for preview
//! ports (the stream is a connection into a sandbox) and for forwarding to the node
//! that runs a sandbox (a TCP connection to it).

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Headers that belong to one connection (RFC 9110 §7.6.1): never passed on.
pub const HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The request as it goes out: `req`'s method, body and headers, except hop-by-hop
/// ones, the `Host` (set to `host`) and those `drop` says; the client's upgrade wish
/// kept (and its pending upgrade, for [`send`]).
pub fn outgoing(
    req: Request,
    target: &str,
    host: &str,
    drop: impl Fn(&HeaderName) -> bool,
) -> Result<(Request, Option<hyper::upgrade::OnUpgrade>), String> {
    let (mut parts, body) = req.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .cloned()
        .filter(|_| connection_has_upgrade(&parts.headers));
    let client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let mut out = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(target)
        .version(axum::http::Version::HTTP_11)
        .body(body)
        .map_err(|e| format!("malformed request: {e}"))?;
    let h = out.headers_mut();
    for (k, v) in parts.headers.iter() {
        if !(HOP.contains(&k.as_str()) || k == header::HOST || drop(k)) {
            h.append(k.clone(), v.clone());
        }
    }
    h.insert(
        header::HOST,
        HeaderValue::from_str(host).map_err(|e| format!("host {host}: {e}"))?,
    );
    if let Some(u) = &upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u.clone());
    }
    Ok((out, client_upgrade))
}

/// An HTTP/1.1 connection over `io`, upgrades allowed; its driver runs on its own.
pub async fn handshake<S>(io: S) -> Result<SendRequest<Body>, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

/// Sends `out` over `io` (HTTP/1.1) and gives back the answer (see [`send_on`]).
pub async fn send<S>(
    io: S,
    out: Request,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut sender = handshake(io).await?;
    send_on(&mut sender, out, client_upgrade).await
}

/// Sends `out` on `sender`'s connection and gives back the answer: its body streamed,
/// or, when it switches protocols and the client asked to, both sides spliced
/// together. Hop-by-hop headers of the answer are dropped (but an upgrade's).
pub async fn send_on(
    sender: &mut SendRequest<Body>,
    out: Request,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response, String> {
    let mut resp = sender.send_request(out).await.map_err(|e| e.to_string())?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_up) = client_upgrade else {
            return Err("switched protocols unasked".into());
        };
        let server_up = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(s)) = (client_up.await, server_up.await) else {
                return;
            };
            let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
            let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
        });
        let (rp, _) = resp.into_parts();
        let mut r = Response::from_parts(rp, Body::empty());
        // Exactly what was negotiated goes back.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok(r);
    }
    let (mut rp, incoming) = resp.into_parts();
    for k in HOP {
        rp.headers.remove(k);
    }
    Ok(Response::from_parts(rp, Body::new(incoming)))
}

pub fn connection_has_upgrade(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}
