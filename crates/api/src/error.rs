//! The one error type at the HTTP edge, with a stable machine-readable code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use forkbox_core::{CoreError, FileErrorKind, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("request body too large (limit {limit} bytes)")]
    TooLarge { limit: usize },
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Internal(String),
    /// A call of a client dialect this server does not offer (with what to use).
    #[error("{0}")]
    NotOffered(String),
    /// A client dialect's way of saying a command ran out of time (or its outcome is
    /// unknown): a 504 whose message says so.
    #[error("{0}")]
    Timeout(String),
    /// Something of a client dialect's that is not there (a code context, …).
    #[error("{0}")]
    NotFound(String),
    /// A server inside a sandbox (a preview port) answered no usable HTTP.
    #[error("{0}")]
    BadGateway(String),
    /// The node that runs the sandbox cannot be reached (its heartbeat lapsed, or it
    /// refused the connection).
    #[error("{0}")]
    NodeUnreachable(String),
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl ApiError {
    /// Status and stable code for this error.
    pub fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::NotOffered(_) => (StatusCode::NOT_IMPLEMENTED, "not_offered"),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            ApiError::NodeUnreachable(_) => (StatusCode::BAD_GATEWAY, "node_unreachable"),
            ApiError::Core(e) => match e {
                CoreError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                CoreError::NoSnapshot(_) => (StatusCode::NOT_FOUND, "snapshot_not_found"),
                CoreError::Gone { .. } | CoreError::Ending(_) => (StatusCode::GONE, "gone"),
                CoreError::OtherNode { .. } => (StatusCode::MISDIRECTED_REQUEST, "other_node"),
                CoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
                CoreError::WrongState { .. } => (StatusCode::CONFLICT, "wrong_state"),
                CoreError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                CoreError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
                CoreError::Quota(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
                CoreError::NoToken(_) => (StatusCode::NOT_FOUND, "token_not_found"),
                CoreError::NoLanguage(_) => (StatusCode::NOT_FOUND, "language_not_found"),
                CoreError::NoVolume(_) => (StatusCode::NOT_FOUND, "volume_not_found"),
                CoreError::NoTemplate(_) => (StatusCode::NOT_FOUND, "template_not_found"),
                CoreError::NoContext(_) => (StatusCode::NOT_FOUND, "context_not_found"),
                CoreError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                CoreError::Runtime(r) => match r {
                    RuntimeError::UnknownTemplate(_) => {
                        (StatusCode::BAD_REQUEST, "unknown_template")
                    }
                    RuntimeError::Rejected(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
                    RuntimeError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                    RuntimeError::NoProcess(_) => (StatusCode::NOT_FOUND, "process_not_found"),
                    RuntimeError::PortClosed(_) => (StatusCode::BAD_GATEWAY, "port_closed"),
                    RuntimeError::Unsupported(_) => (StatusCode::NOT_IMPLEMENTED, "not_supported"),
                    RuntimeError::File { kind, .. } => match kind {
                        FileErrorKind::Invalid => (StatusCode::BAD_REQUEST, "invalid_path"),
                        FileErrorKind::NotFound => (StatusCode::NOT_FOUND, "file_not_found"),
                        FileErrorKind::Conflict => (StatusCode::CONFLICT, "file_conflict"),
                        FileErrorKind::Denied => (StatusCode::FORBIDDEN, "forbidden"),
                        FileErrorKind::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
                    },
                    RuntimeError::Agent { .. } => (StatusCode::BAD_GATEWAY, "agent_unreachable"),
                    RuntimeError::Unavailable(_) => {
                        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                    }
                    RuntimeError::Host { .. } => {
                        (StatusCode::INTERNAL_SERVER_ERROR, "executor_error")
                    }
                },
                CoreError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
            },
        }
    }
}

pub use forkbox_types::api::ErrorBody;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// Error answers by stable code, for `/metrics`.
pub static ERRORS: std::sync::LazyLock<
    prometheus_client::metrics::family::Family<
        CodeLabel,
        prometheus_client::metrics::counter::Counter,
    >,
> = std::sync::LazyLock::new(Default::default);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        ERRORS
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
        // 5xx bodies stay generic; the cause goes to the log. (501 `not_offered` says
        // what to use instead: its message is written for the client.)
        let message = if status.is_server_error()
            && status != StatusCode::BAD_GATEWAY
            && status != StatusCode::NOT_IMPLEMENTED
            && status != StatusCode::GATEWAY_TIMEOUT
        {
            tracing::error!(error = %self, code, "request failed");
            match status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    "runtime unavailable, try again later".to_owned()
                }
                StatusCode::INSUFFICIENT_STORAGE => {
                    "no space left in the sandbox's filesystem".to_owned()
                }
                _ => "executor error; see the server log".to_owned(),
            }
        } else {
            if code == "agent_unreachable" {
                tracing::warn!(error = %self, "agent unreachable");
            }
            self.to_string()
        };
        (
            status,
            axum::Json(serde_json::json!({ "error": message, "code": code })),
        )
            .into_response()
    }
}
