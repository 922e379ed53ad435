//! API keys at the edge: who is calling (a key, or the local user when auth is off),
//! which workspace's resources a request may name, and the `/v1/auth/*` routes.

use crate::extract::{JsonBody, PathArgs};
use crate::{ApiError, AppState};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use forkbox_core::auth::{Principal, Quota, Token, Usage};
use forkbox_core::CoreError;
use forkbox_types::api::{CreateTokenBody, TokenList, TokenView};
use serde::{Deserialize, Serialize};

/// Paths answered without a key.
const OPEN: &[&str] = &[
    "/v1/healthz",
    "/health",
    "/openapi.json",
    "/podflare/v1/healthz",
];

/// The key a request carries: `Authorization: Bearer`, `X-API-Key` or `?access_token=`.
fn key_of(req: &Request) -> Option<String> {
    let h = req.headers();
    if let Some(v) = h.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().unwrap_or_default();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(rest.trim().to_owned());
        }
    }
    if let Some(v) = h.get("x-api-key") {
        return Some(v.to_str().unwrap_or_default().trim().to_owned());
    }
    req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned())
    })
}

/// Resolves the caller. Which sandboxes, snapshots and volumes it may name is decided
/// in core, on the decoded id, by every operation (`forkbox_core::access`): another
/// workspace's resource answers exactly like a missing one, so existence does not leak.
pub async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if OPEN.contains(&path.as_str()) || crate::ui::is_console(&path) {
        return next.run(req).await;
    }
    // A public link's request: the caller its checked signature stands for, whatever
    // key it carries (the key, if any, is the app's business, not forkbox's).
    if let Some(crate::ports::PublicPreview(p)) = req.extensions().get().cloned() {
        req.extensions_mut().insert(p);
        return next.run(req).await;
    }
    let principal = match key_of(&req) {
        Some(key) => match st.manager.authenticate(&key).await {
            Ok(Some(p)) => p,
            // With keys optional, a key that is not one of ours (a client that always
            // sends the key of the hosted service it was written for) is no key at all:
            // it gets exactly what sending none gets.
            Ok(None) if !st.auth_required => Principal::local(),
            Ok(None) => return unauthorized("invalid or revoked API key"),
            Err(e) => return ApiError::from(e).into_response(),
        },
        None if st.auth_required => {
            return unauthorized(
                "an API key is required: Authorization: Bearer <key>, X-API-Key: <key> or ?access_token=<key>",
            )
        }
        None => Principal::local(),
    };
    if path == "/metrics" && st.auth_required && !principal.admin {
        return ApiError::from(CoreError::Forbidden("/metrics needs an admin key".into()))
            .into_response();
    }
    // A key from the query goes on as a header: out of the handlers' sight, and
    // along with a request forwarded to the node that runs the sandbox (which checks
    // the caller's own key again).
    let in_header = req
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION)
        || req.headers().contains_key("x-api-key");
    let key = key_of(&req).filter(|_| !in_header);
    strip_access_token(&mut req);
    if let Some(v) = key.and_then(|k| axum::http::HeaderValue::from_str(&k).ok()) {
        req.headers_mut().insert("x-api-key", v);
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Query parameters that carry credentials: never logged.
const SECRET_PARAMS: &[&str] = &["access_token", "api_key", "token"];

/// `uri` with the values of credential-carrying query parameters replaced by
/// `REDACTED`, for logs.
pub(crate) fn redacted_uri(uri: &axum::http::Uri) -> String {
    let Some(q) = uri.query() else {
        return uri.path().to_owned();
    };
    let parts: Vec<String> = q
        .split('&')
        .map(|kv| {
            let key = kv.split('=').next().unwrap_or_default();
            let decoded: String = form_urlencoded::parse(key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if SECRET_PARAMS
                .iter()
                .any(|s| decoded.eq_ignore_ascii_case(s))
            {
                format!("{key}=REDACTED")
            } else {
                kv.to_owned()
            }
        })
        .collect();
    format!("{}?{}", uri.path(), parts.join("&"))
}

/// Removes `access_token` from the query, so handlers (and their strict query
/// parsers) never see the key.
fn strip_access_token(req: &mut Request) {
    let Some(q) = req.uri().query() else { return };
    // Compared decoded, as `key_of` reads it (`%61ccess_token` is `access_token`).
    let is_token = |kv: &&str| {
        let key = kv.split('=').next().unwrap_or_default();
        form_urlencoded::parse(key.as_bytes())
            .next()
            .is_some_and(|(k, _)| k == "access_token")
    };
    if !q.split('&').any(|kv| is_token(&kv)) {
        return;
    }
    let rest: Vec<&str> = q.split('&').filter(|kv| !is_token(kv)).collect();
    let pq = if rest.is_empty() {
        req.uri().path().to_owned()
    } else {
        format!("{}?{}", req.uri().path(), rest.join("&"))
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(v) = pq.parse() {
        parts.path_and_query = Some(v);
        if let Ok(u) = axum::http::Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

fn unauthorized(msg: &str) -> Response {
    let mut r = ApiError::Unauthorized(msg.to_owned()).into_response();
    r.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Who the caller is.
#[derive(Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    workspace: String,
    /// The key used (`null` without one, when auth is off).
    token_id: Option<String>,
    token_name: Option<String>,
    admin: bool,
    /// Whether this server requires a key.
    auth_required: bool,
    quota: QuotaView,
    usage: UsageView,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaView {
    /// Most sandboxes not ended (running, paused, hibernated); `null` = unlimited.
    max_sandboxes: Option<u64>,
    /// Most memory of running and paused sandboxes, in MiB; `null` = unlimited.
    max_memory_mb: Option<u64>,
}

impl From<Quota> for QuotaView {
    fn from(q: Quota) -> Self {
        QuotaView {
            max_sandboxes: q.max_sandboxes,
            max_memory_mb: q.max_memory_mb,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UsageView {
    sandboxes: u64,
    memory_mb: u64,
}

impl From<Usage> for UsageView {
    fn from(u: Usage) -> Self {
        UsageView {
            sandboxes: u.sandboxes,
            memory_mb: u.memory_mb,
        }
    }
}

#[utoipa::path(get, path = "/v1/auth/whoami", tag = "auth", responses((status = 200, body = WhoAmI), (status = 401, description = "Missing, invalid or revoked key", body = crate::error::ErrorBody)))]
pub async fn whoami(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<WhoAmI>, ApiError> {
    Ok(Json(WhoAmI {
        quota: st.manager.quota(&p.workspace).await?.into(),
        usage: st.manager.usage(&p.workspace).await?.into(),
        workspace: p.workspace,
        token_id: p.token_id,
        token_name: p.token_name,
        admin: p.admin,
        auth_required: st.auth_required,
    }))
}

/// An API key's record as the API shows it (without the key).
pub fn token_view(t: Token) -> TokenView {
    let ts = crate::sandboxes::rfc3339;
    TokenView {
        id: t.id,
        name: t.name,
        workspace: t.workspace,
        prefix: t.prefix,
        admin: t.admin,
        created_at: ts(t.created_at),
        revoked_at: t.revoked_at.map(ts),
        expires_at: t.expires_at.map(ts),
        key: None,
    }
}

#[utoipa::path(get, path = "/v1/auth/tokens", tag = "auth", responses((status = 200, description = "The workspace's keys (every key for an admin key), revoked ones included", body = TokenList), (status = 401, description = "Missing, invalid or revoked key", body = crate::error::ErrorBody)))]
pub async fn list_tokens(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<TokenList>, ApiError> {
    Ok(Json(TokenList {
        tokens: st
            .manager
            .tokens(&p)
            .await?
            .into_iter()
            .map(token_view)
            .collect(),
    }))
}

/// `now + seconds`, for a key's expiry (`None`: never).
pub(crate) fn expires_after(
    seconds: Option<u64>,
) -> Result<Option<time::OffsetDateTime>, ApiError> {
    seconds
        .map(|s| {
            i64::try_from(s)
                .ok()
                .filter(|s| *s > 0)
                .and_then(|s| {
                    time::OffsetDateTime::now_utc().checked_add(time::Duration::seconds(s))
                })
                .ok_or_else(|| {
                    ApiError::BadRequest("a key expires in the future, at most ten years on".into())
                })
        })
        .transpose()
}

#[utoipa::path(post, path = "/v1/auth/tokens", tag = "auth", request_body = CreateTokenBody, responses((status = 201, description = "The new key, shown once", body = TokenView), (status = "4XX", description = "Invalid request, or not allowed for this key", body = crate::error::ErrorBody)))]
pub async fn create_token(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    JsonBody(b): JsonBody<CreateTokenBody>,
) -> Result<(StatusCode, Json<TokenView>), ApiError> {
    let made = st
        .manager
        .create_token(
            &p,
            b.name.as_deref().unwrap_or("api"),
            b.workspace.as_deref(),
            b.admin,
            expires_after(b.expires_in)?,
        )
        .await?;
    let mut v = token_view(made.token);
    v.key = Some(made.key);
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(delete, path = "/v1/auth/tokens/{id}", tag = "auth", params(("id" = String, Path, description = "Key id (`tok-…`)")), responses((status = 200, description = "The revoked key; it fails from now on", body = TokenView), (status = "4XX", description = "No such key in this workspace", body = crate::error::ErrorBody)))]
pub async fn revoke_token(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(id): PathArgs<String>,
) -> Result<Json<TokenView>, ApiError> {
    Ok(Json(crate::auth::token_view(
        st.manager.revoke_token(&p, &id).await?,
    )))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct WorkspaceView {
    name: String,
    quota: QuotaView,
    usage: UsageView,
}

/// The caller's own workspace, or any for an admin key.
fn visible(p: &Principal, name: &str) -> Result<(), ApiError> {
    if p.admin || p.workspace == name {
        Ok(())
    } else {
        Err(CoreError::Forbidden(format!("workspace {name} is not this key's")).into())
    }
}

#[utoipa::path(get, path = "/v1/auth/workspaces/{name}", tag = "auth", params(("name" = String, Path, description = "Workspace name")), responses((status = 200, body = WorkspaceView), (status = "4XX", description = "Not this key's workspace", body = crate::error::ErrorBody)))]
pub async fn get_workspace(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(name): PathArgs<String>,
) -> Result<Json<WorkspaceView>, ApiError> {
    visible(&p, &name)?;
    Ok(Json(WorkspaceView {
        quota: st.manager.quota(&name).await?.into(),
        usage: st.manager.usage(&name).await?.into(),
        name,
    }))
}

#[utoipa::path(put, path = "/v1/auth/workspaces/{name}", tag = "auth", params(("name" = String, Path, description = "Workspace name")), request_body = QuotaView, responses((status = 200, body = WorkspaceView), (status = "4XX", description = "Invalid quota, or not an admin key", body = crate::error::ErrorBody)))]
pub async fn set_workspace(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(name): PathArgs<String>,
    JsonBody(q): JsonBody<QuotaView>,
) -> Result<Json<WorkspaceView>, ApiError> {
    let quota = Quota {
        max_sandboxes: q.max_sandboxes,
        max_memory_mb: q.max_memory_mb,
    };
    st.manager.set_quota(&p, &name, quota).await?;
    Ok(Json(WorkspaceView {
        quota: quota.into(),
        usage: st.manager.usage(&name).await?.into(),
        name,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_query_are_redacted_in_logs() {
        let u: axum::http::Uri =
            "/v1/sandboxes/x/events?follow=1&access_token=fbk_secret&%61ccess_token=fbk_2&tail=3"
                .parse()
                .unwrap();
        let shown = redacted_uri(&u);
        assert!(!shown.contains("fbk_"), "{shown}");
        assert_eq!(
            shown,
            "/v1/sandboxes/x/events?follow=1&access_token=REDACTED&%61ccess_token=REDACTED&tail=3"
        );
        let plain: axum::http::Uri = "/v1/sandboxes".parse().unwrap();
        assert_eq!(redacted_uri(&plain), "/v1/sandboxes");
    }
}
