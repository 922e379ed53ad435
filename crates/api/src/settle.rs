//! Keeping HTTP/1.1 connections usable after a refusal. A connection carries the next
//! request only once this one's body was read to the end. A refusal that comes before
//! a handler reads the body (an unknown sandbox, a missing key, a wrong state) leaves
//! it unread, and hyper then closes the connection after the answer, racing a client
//! that reuses it for its next request ("server disconnected without sending a
//! response"). So small bodies (every JSON call) are read before routing; a large one
//! (a file upload) answered with an error says `Connection: close`, which clients
//! honour before they send again.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};

/// Bodies up to this many bytes (with a known length) are read before routing.
pub const SMALL_BODY: u64 = 64 * 1024;

pub async fn settle_body(req: Request, next: Next) -> Response {
    if req.version() >= Version::HTTP_2 {
        return next.run(req).await;
    }
    let len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if !chunked && len.unwrap_or(0) == 0 {
        return next.run(req).await;
    }
    if let Some(len) = len.filter(|l| !chunked && *l <= SMALL_BODY) {
        let (parts, body) = req.into_parts();
        // `len` fits: it is at most SMALL_BODY.
        let limit = usize::try_from(len).unwrap_or(usize::MAX);
        return match axum::body::to_bytes(body, limit).await {
            Ok(bytes) => {
                next.run(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
            Err(e) => {
                let mut r = crate::ApiError::BadRequest(format!("unreadable request body: {e}"))
                    .into_response();
                close(&mut r);
                r
            }
        };
    }
    let mut resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        close(&mut resp);
    }
    resp
}

fn close(r: &mut Response) {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}
