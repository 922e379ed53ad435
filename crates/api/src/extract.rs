//! A JSON body extractor whose every rejection is an [`ApiError`].

use crate::ApiError;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

/// Like `axum::Json`, but an empty body reads as `{}` and errors are `ApiError`s.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge {
                        limit: crate::MAX_BODY,
                    }
                } else {
                    ApiError::BadRequest("could not read the request body".into())
                }
            })?;
        let bytes: &[u8] = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON for this call: {e}")))
    }
}

/// Like `axum::extract::Query`, but rejections are `ApiError`s (JSON, 400).
pub struct QueryArgs<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for QueryArgs<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryArgs(q.0))
            .map_err(|e| ApiError::BadRequest(format!("bad query string: {}", e.body_text())))
    }
}

/// A boolean query flag: absent, `0`/`false` or `1`/`true`.
pub fn flag(v: Option<&str>, name: &str) -> Result<bool, ApiError> {
    match v {
        None | Some("0") | Some("false") => Ok(false),
        Some("1") | Some("true") => Ok(true),
        Some(_) => Err(ApiError::BadRequest(format!(
            "{name} must be 1/true or 0/false"
        ))),
    }
}

/// A streamed NDJSON answer: each item as one JSON line, flushed as it comes.
pub fn ndjson<T: serde::Serialize + Send + 'static>(
    events: futures_util::stream::BoxStream<'static, T>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use futures_util::StreamExt as _;
    let body = events.map(|ev| {
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(forkbox_types::ndjson::line(&ev)))
    });
    (
        [
            (axum::http::header::CONTENT_TYPE, "application/x-ndjson"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Like `axum::extract::Path`, but a path that does not decode (`%FF`, a number that is
/// none) is a JSON `400 invalid_request`, not axum's plain text.
pub struct PathArgs<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for PathArgs<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathArgs(v)),
            Err(e) => Err(ApiError::BadRequest(format!(
                "invalid path: {}",
                e.body_text()
            ))),
        }
    }
}
