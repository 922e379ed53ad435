//! `/v1/templates`: build templates (streamed progress), list, describe, delete, and
//! read their build logs. Templates are shared by every workspace, so building and
//! deleting one needs an admin key when the server requires keys.

use crate::extract::{JsonBody, PathArgs};
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use forkbox_core::auth::Principal;
use forkbox_core::templates::{BuildEvent, Template};
use forkbox_core::CoreError;
use forkbox_core::TemplateSpec;
use forkbox_types::api::{BuildEvent as WireEvent, TemplateBody, TemplateList, TemplateView};
use futures_util::stream::{BoxStream, StreamExt};

/// A template as the API shows it.
pub fn template_view(t: Template) -> TemplateView {
    TemplateView {
        name: t.name,
        status: t.status.as_str().to_owned(),
        base: t.base,
        packages: t.packages,
        run: t.run,
        env: t.env,
        workdir: t.workdir,
        size: t.size_bytes,
        created: crate::sandboxes::rfc3339(t.created),
        build_seconds: t.build_seconds,
        error: t.error,
        image: t.image,
    }
}

fn admin_only(p: &Principal, st: &AppState, what: &str) -> Result<(), ApiError> {
    if st.auth_required && !p.admin {
        return Err(CoreError::Forbidden(format!(
            "templates are shared by every workspace; {what} one needs an admin key"
        ))
        .into());
    }
    Ok(())
}

/// Build events as NDJSON lines: `{"type":"progress","data":…}` …, then
/// `{"type":"ready","template":{…}}` or `{"type":"failed","error":…}`; as Server-Sent
/// Events (`event: progress|ready|failed`, the same JSON as data) when the client
/// accepts `text/event-stream`.
fn stream_events(
    headers: &axum::http::HeaderMap,
    events: BoxStream<'static, BuildEvent>,
) -> Response {
    let wire = events.map(|ev| match ev {
        BuildEvent::Progress(data) => WireEvent::Progress { data },
        BuildEvent::Ready(t) => WireEvent::Ready {
            template: Box::new(template_view(*t)),
        },
        BuildEvent::Failed(error) => WireEvent::Failed { error },
    });
    let sse = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if !sse {
        return crate::extract::ndjson(wire.boxed());
    }
    let frames = wire.map(|ev| {
        let kind = match &ev {
            WireEvent::Progress { .. } => "progress",
            WireEvent::Ready { .. } => "ready",
            WireEvent::Failed { .. } => "failed",
        };
        Ok::<_, std::convert::Infallible>(
            axum::response::sse::Event::default()
                .event(kind)
                .data(serde_json::to_string(&ev).unwrap_or_default()),
        )
    });
    axum::response::sse::Sse::new(frames).into_response()
}

/// Starts a build; the answer streams its progress as it goes. The build goes on if the
/// client hangs up (follow it again with `GET /v1/templates/{name}/build`).
#[utoipa::path(post, path = "/v1/templates", tag = "templates", request_body = TemplateBody, responses((status = 200, description = "NDJSON build events: progress lines, then `ready` (with the template) or `failed` (with the error)", content_type = "application/x-ndjson", body = String), (status = 400, description = "Invalid request", body = crate::error::ErrorBody), (status = 404, description = "Unknown base template", body = crate::error::ErrorBody), (status = 409, description = "A template of that name exists or is being built", body = crate::error::ErrorBody)))]
pub async fn build(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    headers: axum::http::HeaderMap,
    JsonBody(b): JsonBody<TemplateBody>,
) -> Result<Response, ApiError> {
    admin_only(&p, &st, "building")?;
    let events = st.manager.build_template(template_spec(b)?).await?;
    Ok(stream_events(&headers, events))
}

/// The build a request asks for: its fields, or what its Dockerfile says.
fn template_spec(b: TemplateBody) -> Result<TemplateSpec, ApiError> {
    if b.registry_auth.is_some() && b.image.is_none() && b.dockerfile.is_none() {
        return Err(ApiError::BadRequest(
            "registry_auth goes with an image (or a Dockerfile FROM one)".into(),
        ));
    }
    let pull = |image: Option<String>, auth: Option<forkbox_types::api::RegistryAuth>| {
        image.map(|reference| {
            std::sync::Arc::new(forkbox_core::runtime::ImageSource::Registry { reference, auth })
        })
    };
    let Some(text) = b.dockerfile else {
        if !b.build_args.is_empty() {
            return Err(ApiError::BadRequest(
                "build_args go with a dockerfile".into(),
            ));
        }
        if b.context.is_some() {
            return Err(ApiError::BadRequest(
                "a build context goes with a dockerfile".into(),
            ));
        }
        return Ok(TemplateSpec {
            name: b.name,
            base: b.base,
            packages: b.packages,
            run: b.run,
            env: b.env,
            workdir: b.workdir,
            egress: b.egress_allowlist,
            context: None,
            args: Default::default(),
            keep_steps: false,
            image: pull(b.image, b.registry_auth),
        });
    };
    if b.base.is_some()
        || !b.packages.is_empty()
        || !b.run.is_empty()
        || !b.env.is_empty()
        || b.workdir.is_some()
        || b.image.is_some()
    {
        return Err(ApiError::BadRequest(
            "a dockerfile says the base, commands, environment and working directory: \
             give it without base, image, packages, run, env or workdir"
                .into(),
        ));
    }
    let context = match &b.context {
        Some(encoded) => {
            use base64::Engine as _;
            let tar = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| ApiError::BadRequest(format!("context is not base64: {e}")))?;
            Some(
                forkbox_dockerfile::Context::read(&tar)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?,
            )
        }
        None => None,
    };
    let recipe = forkbox_dockerfile::read_with(&text, &b.build_args, context.as_ref())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(TemplateSpec {
        name: b.name,
        base: recipe.base,
        packages: recipe.packages,
        run: recipe.run,
        env: recipe.env,
        workdir: recipe.workdir,
        egress: b.egress_allowlist,
        context: context.map(|c| std::sync::Arc::new(c.tar)),
        args: recipe.args,
        // A Dockerfile's build keeps its steps, as Docker's does.
        keep_steps: true,
        image: pull(recipe.image, b.registry_auth),
    })
}

/// Largest image archive a template import takes.
pub const MAX_IMAGE_ARCHIVE: u64 = 8 << 30;

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct ImportQuery {
    /// Which image of the archive: its name or tag (`app`, `app:v1`,
    /// `docker.io/library/app:latest`); needed only when it holds several.
    #[serde(rename = "ref")]
    reference: Option<String>,
}

/// Imports an OCI image as template `name`: the body is an image archive (an OCI
/// image layout as a tar — `oci-archive` — or a `docker save` tar), streamed, up to
/// [`MAX_IMAGE_ARCHIVE`] bytes. Digests of the manifest, configuration and every layer
/// are checked (a layer before it is applied); layers are applied in order with their
/// whiteouts, owners shifted into the sandboxes' range; `Env` and `WorkingDir` become
/// the template's environment and working directory, `User`, `Entrypoint`, `Cmd` and
/// labels are recorded. The answer streams the import's progress as a build's does.
#[utoipa::path(post, path = "/v1/templates/{name}/image", tag = "templates", params(("name" = String, Path, description = "Name of the template to make"), ImportQuery), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The image archive (any content type: application/x-tar, application/octet-stream, …)"), responses((status = 200, description = "NDJSON build events: progress lines, then `ready` (with the template) or `failed` (with the error: a digest mismatch, a layer that cannot be applied, …)", content_type = "application/x-ndjson", body = String), (status = 400, description = "Invalid name or ref", body = crate::error::ErrorBody), (status = 409, description = "A template of that name exists or is being built", body = crate::error::ErrorBody), (status = 413, description = "The archive is larger than the limit", body = crate::error::ErrorBody)))]
pub async fn import(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    headers: axum::http::HeaderMap,
    PathArgs(name): PathArgs<String>,
    crate::extract::QueryArgs(q): crate::extract::QueryArgs<ImportQuery>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    admin_only(&p, &st, "importing")?;
    let (data, over) = crate::files::bounded(&headers, body, MAX_IMAGE_ARCHIVE)?;
    match st.manager.import_template(name, q.reference, data).await {
        Ok(events) => Ok(stream_events(&headers, events)),
        Err(_) if over.load(std::sync::atomic::Ordering::Relaxed) => Err(ApiError::TooLarge {
            limit: MAX_IMAGE_ARCHIVE as usize,
        }),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(get, path = "/v1/templates", tag = "templates", responses((status = 200, description = "Built templates and builds this server runs or saw fail", body = TemplateList)))]
pub async fn list(State(st): State<AppState>) -> Json<TemplateList> {
    Json(TemplateList {
        templates: st
            .manager
            .templates()
            .await
            .into_iter()
            .map(template_view)
            .collect(),
    })
}

#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates", params(("name" = String, Path, description = "Template name")), responses((status = 200, body = TemplateView), (status = 404, description = "No such template", body = crate::error::ErrorBody)))]
pub async fn get(
    State(st): State<AppState>,
    PathArgs(name): PathArgs<String>,
) -> Result<Json<TemplateView>, ApiError> {
    Ok(Json(template_view(st.manager.template(&name).await?)))
}

/// Deletes a template (or a failed build's record). Sandboxes made from it keep their
/// own copy, but while live ones (running, paused, hibernated) exist it answers 409.
#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates", params(("name" = String, Path, description = "Template name")), responses((status = 204, description = "Deleted"), (status = 404, description = "No such template", body = crate::error::ErrorBody), (status = 409, description = "Live sandboxes use it, or it is being built", body = crate::error::ErrorBody)))]
pub async fn delete(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(name): PathArgs<String>,
) -> Result<StatusCode, ApiError> {
    admin_only(&p, &st, "deleting")?;
    st.manager.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/templates/{name}/log", tag = "templates", params(("name" = String, Path, description = "Template name")), responses((status = 200, description = "The build log (kept for templates built through the API and for failed builds)", content_type = "text/plain", body = String), (status = 404, description = "No such template", body = crate::error::ErrorBody)))]
pub async fn log(
    State(st): State<AppState>,
    PathArgs(name): PathArgs<String>,
) -> Result<Response, ApiError> {
    let text = st.manager.template_log(&name).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/templates/{name}/build", tag = "templates", params(("name" = String, Path, description = "Template name")), responses((status = 200, description = "NDJSON build events from the start of a build this server runs or ran (as for POST /v1/templates)", content_type = "application/x-ndjson", body = String), (status = 404, description = "No build of that name (a built template's log is at …/log)", body = crate::error::ErrorBody)))]
pub async fn follow(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    PathArgs(name): PathArgs<String>,
) -> Result<Response, ApiError> {
    Ok(stream_events(&headers, st.manager.follow_build(&name)?))
}
