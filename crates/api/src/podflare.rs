//! The Podflare dialect, served under `/podflare` (the real `podflare` client's base
//! URL: `PODFLARE_API_URL=http://host:7070/podflare`, docs/compatibility.md).
//!
//! Same core, same sandboxes, same auth; what differs from forkbox's own API is
//! translated here:
//! - exec events carry one line **without** its newline in `data` (the client joins
//!   them with `"\n"`), and a stream that produced output ends with the remainder after
//!   its last newline (`""` when the output ended with one), so the joined text is
//!   exactly what the program wrote;
//! - create takes Podflare's fields (`timeout_seconds`, `idle_timeout_seconds`,
//!   `ram_mib`, `rootfs_gb`, `persistent`, `egress`);
//! - `GET /v1/healthz` answers `ok` as text;
//! - a persistent sandbox that idles out is hibernated: that is its "space", resumed
//!   (woken) by `POST /v1/spaces/{id}/resume` under the same id.
//!
//! - `replay` gives the sandbox's recent exec events (those of calls made through this
//!   dialect), as they were streamed.
//!
//! - its terminal protocol (`sandbox.pty.*`: an NDJSON stream and calls by session id)
//!   is [`crate::podflare_pty`].
//!
//! Routes outside Podflare's API answer a JSON `501 not_offered` naming forkbox's own.

use crate::error::ApiError;
use crate::extract::{ndjson, JsonBody};
use crate::owned::Sbx;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use forkbox_core::{CreateRequest, ExecCommand, OnTimeout, Work};
use forkbox_types::agent::Language;
use forkbox_types::exec::{EventKind, ExecEvent};
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Where the dialect is mounted.
pub const PREFIX: &str = "/podflare";

/// A line longer than this is passed on in pieces (each piece then reads as a line).
const MAX_LINE: usize = 1 << 20;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/healthz", get(healthz))
        .route("/v1/sandboxes", post(create))
        .route("/v1/sandboxes/{id}", delete(crate::sandboxes::delete))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/fork", post(crate::sandboxes::fork))
        .route(
            "/v1/sandboxes/{id}/merge_into/{winner}",
            post(crate::sandboxes::merge_into),
        )
        .route("/v1/sandboxes/{id}/replay", get(replay))
        .route("/v1/spaces/{id}/resume", post(resume))
        .route("/v1/spaces/{id}", delete(crate::sandboxes::delete))
        .merge(crate::podflare_pty::routes())
        .fallback(elsewhere)
}

/// `GET /v1/healthz`: `ok`.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Podflare's create fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    template: Option<String>,
    /// Lifetime in seconds (forkbox's `timeout`).
    timeout_seconds: Option<u64>,
    /// Seconds without calls before it ends (or, `persistent`, is hibernated).
    idle_timeout_seconds: Option<u64>,
    /// Memory in MiB (forkbox's `memory_mb`).
    ram_mib: Option<u64>,
    /// Disk in GiB (forkbox's `disk_mb` / 1024: the limit of its own writes).
    rootfs_gb: Option<u64>,
    /// Hibernate instead of ending when its idle or life timeout passes.
    persistent: Option<bool>,
    /// `false` (or absent): no network. `true` (the open internet) is not offered.
    egress: Option<bool>,
}

async fn create(
    State(st): State<AppState>,
    axum::Extension(p): axum::Extension<forkbox_core::auth::Principal>,
    headers: axum::http::HeaderMap,
    JsonBody(b): JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<crate::sandboxes::SandboxView>), ApiError> {
    if b.egress == Some(true) {
        return Err(ApiError::BadRequest(
            "egress: true (the open internet) is not offered by this server; its sandboxes \
             have no network, or reach listed hosts only (forkbox's own API: egress_allowlist)"
                .into(),
        ));
    }
    let disk_mb = b
        .rootfs_gb
        .map(|g| {
            g.checked_mul(1024)
                .ok_or_else(|| ApiError::BadRequest("rootfs_gb is too large".into()))
        })
        .transpose()?;
    let s = st
        .manager
        .create(CreateRequest {
            // Podflare's README names its default image `default`.
            template: b.template.filter(|t| t != "default"),
            memory_mb: b.ram_mib,
            disk_mb,
            timeout: b.timeout_seconds,
            idle_timeout: b.idle_timeout_seconds,
            on_timeout: if b.persistent == Some(true) {
                OnTimeout::Hibernate
            } else {
                OnTimeout::Kill
            },
            traceparent: headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            workspace: p.workspace,
            ..Default::default()
        })
        .await?;
    Ok((StatusCode::CREATED, Json(crate::sandboxes::sandbox_view(s))))
}

/// Podflare's exec body: a cell for the sandbox's REPL.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    code: String,
    language: Option<String>,
}

async fn exec(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let name = b.language.as_deref().unwrap_or("python");
    let language = Language::parse(name).ok_or_else(|| {
        ApiError::BadRequest("unsupported language; use python, javascript or bash".into())
    })?;
    let events = st
        .manager
        .exec(
            &id,
            ExecCommand {
                work: Work::Code {
                    language,
                    code: b.code,
                },
                cwd: None,
                env: Default::default(),
                timeout: None,
            },
        )
        .await?;
    let (history, sandbox) = (st.replay.clone(), id.to_string());
    let events = lines(events)
        .map(move |ev| {
            history.record(&sandbox, &ev);
            ev
        })
        .boxed();
    Ok(ndjson(events))
}

/// `POST /v1/spaces/{id}/resume`: a persistent sandbox that was hibernated (its
/// "space" has the sandbox's id) is woken and answers under the same id.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    timeout_seconds: Option<u64>,
    idle_timeout_seconds: Option<u64>,
    persistent: Option<bool>,
    egress: Option<bool>,
}

async fn resume(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ResumeBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if b.egress == Some(true) {
        return Err(ApiError::BadRequest(
            "egress: true (the open internet) is not offered by this server".into(),
        ));
    }
    if b.idle_timeout_seconds.is_some() || b.persistent.is_some() {
        return Err(ApiError::BadRequest(
            "a resumed sandbox keeps the idle timeout and persistence it was created \
             with; only timeout_seconds can be given on resume"
                .into(),
        ));
    }
    let s = st.manager.wake(&id).await?;
    if let Some(t) = b.timeout_seconds {
        st.manager.set_timeout(&id, t).await?;
    }
    Ok(Json(serde_json::json!({ "id": s.id })))
}

/// `GET …/replay`: the sandbox's recent exec events (of calls made through this
/// dialect), as they were streamed, oldest first, NDJSON.
async fn replay(State(st): State<AppState>, Sbx(id): Sbx) -> Response {
    let events = st.replay.of(id.id());
    ndjson(futures_util::stream::iter(events).boxed())
}

/// The recent exec events of sandboxes, for `replay`: up to [`History::EVENTS`] events
/// and [`History::BYTES`] of output per sandbox, for the [`History::SANDBOXES`] whose
/// last exec is the most recent (so it stays bounded: at most 64 MiB).
#[derive(Clone, Default)]
pub struct History {
    inner: Arc<Mutex<HistoryInner>>,
}

#[derive(Default)]
struct HistoryInner {
    by_sandbox: HashMap<String, Kept>,
    /// Sandboxes by last write, oldest first.
    order: VecDeque<String>,
}

#[derive(Default)]
struct Kept {
    events: VecDeque<ExecEvent>,
    bytes: usize,
}

impl History {
    const EVENTS: usize = 1000;
    const BYTES: usize = 512 << 10;
    const SANDBOXES: usize = 128;

    fn lock(&self) -> std::sync::MutexGuard<'_, HistoryInner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// What an event counts against [`History::BYTES`].
    fn weight(ev: &ExecEvent) -> usize {
        32 + match &ev.kind {
            EventKind::Stdout(d) | EventKind::Stderr(d) => d.len(),
            EventKind::Exit(_) => 0,
        }
    }

    fn record(&self, sandbox: &str, ev: &ExecEvent) {
        let size = Self::weight(ev);
        let mut h = self.lock();
        if h.order.back().map(String::as_str) != Some(sandbox) {
            h.order.retain(|s| s != sandbox);
            h.order.push_back(sandbox.to_owned());
            while h.order.len() > Self::SANDBOXES {
                if let Some(old) = h.order.pop_front() {
                    h.by_sandbox.remove(&old);
                }
            }
        }
        let kept = h.by_sandbox.entry(sandbox.to_owned()).or_default();
        kept.events.push_back(ev.clone());
        kept.bytes += size;
        while kept.events.len() > Self::EVENTS
            || (kept.bytes > Self::BYTES && kept.events.len() > 1)
        {
            if let Some(old) = kept.events.pop_front() {
                kept.bytes -= Self::weight(&old);
            }
        }
    }

    fn of(&self, sandbox: &str) -> Vec<ExecEvent> {
        self.lock()
            .by_sandbox
            .get(sandbox)
            .map(|k| k.events.iter().cloned().collect())
            .unwrap_or_default()
    }
}

async fn elsewhere() -> Response {
    ApiError::NotOffered(
        "not part of the Podflare API this server speaks under /podflare; forkbox's own API \
         is at /v1/… (docs/api.md, docs/compatibility.md)"
            .into(),
    )
    .into_response()
}

/// Re-frames forkbox's exec events as Podflare's: see the module docs. `seq` is
/// renumbered (still strictly increasing from the first event's).
pub fn lines(events: BoxStream<'static, ExecEvent>) -> BoxStream<'static, ExecEvent> {
    #[derive(Default)]
    struct Pending {
        text: String,
        wrote: bool,
    }
    struct State {
        events: BoxStream<'static, ExecEvent>,
        out: Pending,
        err: Pending,
        seq: Option<u64>,
        queue: std::collections::VecDeque<ExecEvent>,
        done: bool,
    }
    fn emit(s: &mut State, kind: EventKind, ts: u64) {
        let seq = s.seq.unwrap_or(1);
        s.seq = Some(seq + 1);
        s.queue.push_back(ExecEvent { kind, seq, ts });
    }
    fn split(s: &mut State, stderr: bool, data: String, ts: u64) {
        let p = if stderr { &mut s.err } else { &mut s.out };
        p.wrote = true;
        p.text.push_str(&data);
        let mut lines = Vec::new();
        while let Some(i) = p.text.find('\n') {
            let rest = p.text.split_off(i + 1);
            let mut line = std::mem::replace(&mut p.text, rest);
            line.pop();
            lines.push(line);
        }
        if p.text.len() > MAX_LINE {
            lines.push(std::mem::take(&mut p.text));
        }
        for l in lines {
            let kind = if stderr {
                EventKind::Stderr(l)
            } else {
                EventKind::Stdout(l)
            };
            emit(s, kind, ts);
        }
    }
    /// The remainders after the last newlines, for streams that wrote anything.
    fn flush(s: &mut State, ts: u64) {
        if std::mem::take(&mut s.out.wrote) {
            let t = std::mem::take(&mut s.out.text);
            emit(s, EventKind::Stdout(t), ts);
        }
        if std::mem::take(&mut s.err.wrote) {
            let t = std::mem::take(&mut s.err.text);
            emit(s, EventKind::Stderr(t), ts);
        }
    }
    let state = State {
        events,
        out: Pending::default(),
        err: Pending::default(),
        seq: None,
        queue: Default::default(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.queue.pop_front() {
                return Some((ev, s));
            }
            if s.done {
                return None;
            }
            match s.events.next().await {
                Some(ev) => {
                    if s.seq.is_none() {
                        s.seq = Some(ev.seq);
                    }
                    match ev.kind {
                        EventKind::Stdout(d) => split(&mut s, false, d, ev.ts),
                        EventKind::Stderr(d) => split(&mut s, true, d, ev.ts),
                        EventKind::Exit(c) => {
                            flush(&mut s, ev.ts);
                            emit(&mut s, EventKind::Exit(c), ev.ts);
                        }
                    }
                }
                None => {
                    let ts = s.queue.back().map(|e| e.ts).unwrap_or_default();
                    flush(&mut s, ts);
                    s.done = true;
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, seq: u64) -> ExecEvent {
        ExecEvent { kind, seq, ts: seq }
    }

    /// What the real client does with the events: `"\n".join` per stream.
    fn joined(events: &[ExecEvent], stderr: bool) -> String {
        events
            .iter()
            .filter_map(|e| match (&e.kind, stderr) {
                (EventKind::Stdout(d), false) | (EventKind::Stderr(d), true) => Some(d.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn run(input: Vec<EventKind>) -> Vec<ExecEvent> {
        let evs: Vec<ExecEvent> = input
            .into_iter()
            .enumerate()
            .map(|(i, k)| ev(k, i as u64 + 1))
            .collect();
        lines(futures_util::stream::iter(evs).boxed())
            .collect()
            .await
    }

    #[tokio::test]
    async fn the_clients_join_gives_back_exactly_what_was_written() {
        use EventKind::*;
        let long = format!("{}yy\n", "x".repeat(70_000));
        let cases: Vec<(Vec<EventKind>, &str, &str)> = vec![
            (
                vec![
                    Stdout("0\n".into()),
                    Stdout("1\n".into()),
                    Stdout("2\n".into()),
                    Exit(0),
                ],
                "0\n1\n2\n",
                "",
            ),
            (
                vec![
                    Stdout("a\n".into()),
                    Stdout("\n".into()),
                    Stdout("b".into()),
                    Exit(0),
                ],
                "a\n\nb",
                "",
            ),
            (
                vec![
                    Stderr("Traceback\n".into()),
                    Stderr("  x\n".into()),
                    Exit(1),
                ],
                "",
                "Traceback\n  x\n",
            ),
            // A line cut at the agent's 64 KiB cap arrives whole.
            (
                vec![Stdout("x".repeat(70_000)), Stdout("yy\n".into()), Exit(0)],
                &long,
                "",
            ),
            (vec![Exit(3)], "", ""),
        ];
        for (input, out, err) in cases {
            let got = run(input.clone()).await;
            assert_eq!(joined(&got, false), out, "{input:?}");
            assert_eq!(joined(&got, true), err, "{input:?}");
            // Exit last, seq strictly increasing, no data with a newline.
            assert!(matches!(got.last().unwrap().kind, Exit(_)));
            assert!(got.windows(2).all(|w| w[1].seq == w[0].seq + 1));
            assert!(got
                .iter()
                .all(|e| !matches!(&e.kind, Stdout(d) | Stderr(d) if d.contains('\n'))));
        }
        // Nothing written, nothing sent but the exit.
        assert_eq!(run(vec![Exit(0)]).await.len(), 1);
    }

    #[tokio::test]
    async fn lines_are_passed_on_as_they_complete() {
        use EventKind::*;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let rx =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
            );
        let mut out = lines(rx.boxed());
        tx.send(ev(Stdout("first\n".into()), 1)).unwrap();
        let e = out.next().await.unwrap();
        assert_eq!(e.kind, Stdout("first".into()));
        tx.send(ev(Exit(0), 2)).unwrap();
        drop(tx);
        let rest: Vec<_> = out.collect().await;
        assert_eq!(
            rest.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
            vec![Stdout(String::new()), Exit(0)]
        );
    }
}
