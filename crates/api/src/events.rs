//! `GET /v1/sandboxes/:id/events?follow=1&tail=200`: lifecycle events as Server-Sent
//! Events.

use crate::extract::QueryArgs;
use crate::owned::Sbx;
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use forkbox_core::events::{Lifecycle, LifecycleEvent, HISTORY};
use futures_util::StreamExt;
use serde::Deserialize;
use std::convert::Infallible;
use tokio::sync::broadcast::error::RecvError;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Keep the stream open for new events (`1`/`true`).
    follow: Option<String>,
    /// How many past events to send first (default 200, at most the kept history).
    tail: Option<usize>,
}

fn sse(ev: &LifecycleEvent) -> Event {
    Event::default()
        .event(ev.kind.as_str())
        .id(ev.seq.to_string())
        .data(serde_json::to_string(ev).unwrap_or_default())
}

/// What a follower that fell `missed` events behind gets instead of them.
fn dropped(missed: u64) -> Event {
    Event::default()
        .event("dropped")
        .data(serde_json::json!({ "missed": missed }).to_string())
}

fn is_final(ev: &LifecycleEvent, id: &str) -> bool {
    // A merge ends the merged child only; its parent goes on.
    ev.kind.is_end()
        && !(ev.kind == Lifecycle::Merged && ev.detail.get("from").is_some() && ev.sandbox == id)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/events", tag = "streams", params(("id" = String, Path, description = "Sandbox id"), ("follow" = Option<String>, Query), ("tail" = Option<usize>, Query)), responses((status = 200, description = "Server-Sent Events of lifecycle changes", content_type = "text/event-stream", body = String), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn events(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<EventsQuery>,
) -> Result<Response, ApiError> {
    let follow = crate::extract::flag(q.follow.as_deref(), "follow")?;
    let n = q.tail.unwrap_or(200).min(HISTORY);
    let rec = st.manager.any_record(&id).await?;
    // Subscribe before reading the history, then skip what the history already had.
    let rx = st.manager.events().subscribe();
    let past = st.manager.events().tail(id.id(), n);
    let last = past.last().map(|e| e.seq).unwrap_or(0);
    let ended = !rec.status.is_live() || past.last().is_some_and(|e| is_final(e, id.id()));
    let head = futures_util::stream::iter(
        past.into_iter()
            .map(|e| Ok::<_, Infallible>(sse(&e)))
            .collect::<Vec<_>>(),
    );
    if !follow || ended {
        return Ok(Sse::new(head).into_response());
    }
    let id = id.id().to_owned();
    let live = futures_util::stream::unfold((rx, false), move |(mut rx, done)| {
        let id = id.clone();
        async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.sandbox == id && ev.seq > last => {
                        let fin = is_final(&ev, &id);
                        return Some((Ok::<_, Infallible>(sse(&ev)), (rx, fin)));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        let ev = dropped(missed);
                        return Some((Ok(ev), (rx, false)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(head.chain(live))
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllQuery {
    /// Keep the stream open and send events as they happen (`1`/`true`); without it the
    /// answer is empty (past events are kept per sandbox: `…/{id}/events`).
    follow: Option<String>,
}

/// `GET /v1/events?follow=1`: every lifecycle event of the caller's workspace's
/// sandboxes (created, paused, forked, deleted, …) as it happens, as Server-Sent Events
/// (the same events as `…/{id}/events`; `dropped` when the follower fell behind). What a
/// dashboard follows to keep a list live.
#[utoipa::path(get, path = "/v1/events", tag = "streams", params(("follow" = Option<String>, Query)), responses((status = 200, description = "Server-Sent Events of lifecycle changes of the workspace's sandboxes", content_type = "text/event-stream", body = String), (status = "4XX", description = "Invalid request", body = crate::error::ErrorBody)))]
pub async fn all(
    State(st): State<AppState>,
    axum::Extension(who): axum::Extension<forkbox_core::auth::Principal>,
    QueryArgs(q): QueryArgs<AllQuery>,
) -> Result<Response, ApiError> {
    if !crate::extract::flag(q.follow.as_deref(), "follow")? {
        let none = futures_util::stream::empty::<Result<Event, Infallible>>();
        return Ok(Sse::new(none).into_response());
    }
    let rx = st.manager.events().subscribe();
    // Whose each sandbox is, as found once per stream.
    let seen: std::collections::HashMap<String, bool> = Default::default();
    let live = futures_util::stream::unfold((rx, seen), move |(mut rx, mut seen)| {
        let (st, who) = (st.clone(), who.clone());
        async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let ours = match seen.get(&ev.sandbox) {
                            Some(o) => *o,
                            None => {
                                let o = st.manager.sandbox_ref(&who, &ev.sandbox).await.is_ok();
                                seen.insert(ev.sandbox.clone(), o);
                                o
                            }
                        };
                        if ours {
                            return Some((Ok::<_, Infallible>(sse(&ev)), (rx, seen)));
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        let ev = dropped(missed);
                        return Some((Ok(ev), (rx, seen)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(live)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    follow: Option<String>,
}

/// `GET /v1/sandboxes/:id/logs?follow=1`: the sandbox's log (its agent's messages) as
/// Server-Sent Events, one `data:` line per log line; with `follow`, new lines while
/// the sandbox lives.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "streams", params(("id" = String, Path, description = "Sandbox id"), ("follow" = Option<String>, Query)), responses((status = 200, description = "Server-Sent Events, one log line each", content_type = "text/event-stream", body = String), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn logs(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<LogsQuery>,
) -> Result<Response, ApiError> {
    let follow = crate::extract::flag(q.follow.as_deref(), "follow")?;
    let lines = st.manager.logs(&id, follow).await?;
    let sse = lines.map(|l| Ok::<_, Infallible>(Event::default().event("log").data(l)));
    Ok(Sse::new(sse)
        .keep_alive(KeepAlive::default())
        .into_response())
}
