//! Lifecycle events of sandboxes (created, paused, forked, killed, …): a bounded history
//! per sandbox for `tail`, and a broadcast for followers. Followers that fall behind
//! lose events rather than growing memory, and are told how many.

pub use forkbox_types::events::Lifecycle;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::broadcast;

use crate::manager::now_ms;

/// Events kept per sandbox for `tail`.
pub const HISTORY: usize = 256;
/// Sandboxes whose history is kept (oldest forgotten first).
const SANDBOXES: usize = 10_000;
/// Events a follower may fall behind by before it loses some.
const FOLLOW_BUFFER: usize = 1024;

/// One lifecycle event.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LifecycleEvent {
    /// Server-wide sequence number, increasing.
    pub seq: u64,
    /// Milliseconds since the epoch.
    pub ts: u64,
    pub sandbox: String,
    #[serde(rename = "type")]
    pub kind: Lifecycle,
    /// Details, e.g. the children of a fork or the reason of an end.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

/// Per-sandbox histories, and sandbox ids in the order their history started.
type Histories = (HashMap<String, VecDeque<LifecycleEvent>>, VecDeque<String>);

pub struct EventLog {
    seq: AtomicU64,
    history: Mutex<Histories>,
    tx: broadcast::Sender<LifecycleEvent>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            seq: AtomicU64::new(0),
            history: Mutex::new(Default::default()),
            tx: broadcast::channel(FOLLOW_BUFFER).0,
        }
    }
}

impl EventLog {
    /// Records and broadcasts one event.
    pub fn emit(&self, sandbox: &str, kind: Lifecycle, detail: serde_json::Value) {
        let ev = LifecycleEvent {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            ts: now_ms(),
            sandbox: sandbox.to_owned(),
            kind,
            detail,
        };
        {
            let mut g = match self.history.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let (map, order) = &mut *g;
            if !map.contains_key(sandbox) {
                order.push_back(sandbox.to_owned());
                if order.len() > SANDBOXES {
                    if let Some(old) = order.pop_front() {
                        map.remove(&old);
                    }
                }
            }
            let h = map.entry(sandbox.to_owned()).or_default();
            h.push_back(ev.clone());
            if h.len() > HISTORY {
                h.pop_front();
            }
        }
        // No followers is fine.
        let _ = self.tx.send(ev);
    }

    /// Drops `sandbox`'s history (a sandbox nobody can ask about any more, such as a
    /// one-shot runner's).
    pub fn forget(&self, sandbox: &str) {
        let mut g = match self.history.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (map, order) = &mut *g;
        if map.remove(sandbox).is_some() {
            order.retain(|s| s != sandbox);
        }
    }

    /// The last `n` events of `sandbox`, oldest first.
    pub fn tail(&self, sandbox: &str, n: usize) -> Vec<LifecycleEvent> {
        let g = match self.history.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.0.get(sandbox)
            .map(|h| h.iter().skip(h.len().saturating_sub(n)).cloned().collect())
            .unwrap_or_default()
    }

    /// A receiver of every event from now on (filter by sandbox yourself).
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_ordered() {
        let log = EventLog::default();
        for _ in 0..HISTORY + 10 {
            log.emit("a", Lifecycle::Paused, serde_json::Value::Null);
        }
        log.emit("b", Lifecycle::Created, serde_json::json!({"x": 1}));
        let t = log.tail("a", 1000);
        assert_eq!(t.len(), HISTORY);
        assert!(t.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(log.tail("a", 3).len(), 3);
        assert_eq!(log.tail("b", 10)[0].detail["x"], 1);
        assert!(log.tail("nope", 10).is_empty());
        log.forget("a");
        assert!(log.tail("a", 10).is_empty());
        assert_eq!(log.tail("b", 10).len(), 1);
        assert_eq!(log.history.lock().unwrap().1, ["b"]);
    }

    #[tokio::test]
    async fn followers_see_new_events_and_learn_what_they_missed() {
        let log = EventLog::default();
        let mut rx = log.subscribe();
        log.emit("a", Lifecycle::Created, serde_json::Value::Null);
        assert_eq!(rx.recv().await.unwrap().kind, Lifecycle::Created);
        for _ in 0..FOLLOW_BUFFER + 5 {
            log.emit("a", Lifecycle::Paused, serde_json::Value::Null);
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 5),
            other => panic!("{other:?}"),
        }
    }
}
