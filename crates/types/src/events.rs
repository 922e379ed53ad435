//! Lifecycle events of sandboxes, by name: what `GET /v1/sandboxes/{id}/events` sends
//! as each Server-Sent Event's type and each event's `type` field.

use serde::{Deserialize, Serialize};

/// What happened to a sandbox.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Created,
    Paused,
    Resumed,
    Hibernated,
    Woken,
    Forked,
    /// In `detail`: `from` (the parent's event: the child merged into it) or `into`.
    Merged,
    Snapshot,
    /// The OOM killer killed a process of it.
    Oom,
    /// Its time to live ran out (an end or a hibernation follows).
    Timeout,
    /// It went unused for its idle timeout (an end or a hibernation follows).
    IdleTimeout,
    /// A restarted server took it over, running.
    Adopted,
    /// A restarted server found it dead.
    Lost,
    Deleted,
    Killed,
    Failed,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Created => "created",
            Lifecycle::Paused => "paused",
            Lifecycle::Resumed => "resumed",
            Lifecycle::Hibernated => "hibernated",
            Lifecycle::Woken => "woken",
            Lifecycle::Forked => "forked",
            Lifecycle::Merged => "merged",
            Lifecycle::Snapshot => "snapshot",
            Lifecycle::Oom => "oom",
            Lifecycle::Timeout => "timeout",
            Lifecycle::IdleTimeout => "idle_timeout",
            Lifecycle::Adopted => "adopted",
            Lifecycle::Lost => "lost",
            Lifecycle::Deleted => "deleted",
            Lifecycle::Killed => "killed",
            Lifecycle::Failed => "failed",
        }
    }

    /// Whether the sandbox has nothing more to say after it (a merge event of the
    /// parent, the one with `from`, is not an end: see [`Lifecycle::Merged`]).
    pub fn is_end(self) -> bool {
        matches!(
            self,
            Lifecycle::Deleted
                | Lifecycle::Killed
                | Lifecycle::Failed
                | Lifecycle::Merged
                | Lifecycle::Lost
        )
    }
}

impl std::fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_on_the_wire_are_the_names() {
        for l in [Lifecycle::IdleTimeout, Lifecycle::Created, Lifecycle::Lost] {
            assert_eq!(
                serde_json::to_string(&l).unwrap(),
                format!("\"{}\"", l.as_str())
            );
        }
    }
}
