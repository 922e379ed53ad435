//! The sandbox as the rest of the system sees it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    /// Frozen (cgroup freezer): memory kept, no CPU.
    Paused,
    /// Processes stopped, memory freed, filesystem kept; `wake` starts it again.
    Hibernated,
    /// Deleted by a client.
    Deleted,
    /// Ended by forkbox: its time to live ran out.
    Killed,
    /// Its agent died or could not be reached; resources were freed.
    Failed,
    /// A fork child whose state became its ancestor's (`merge_into`); the id is consumed.
    Merged,
    /// Found dead (or unreachable) by a server starting after a crash or restart.
    Lost,
}

impl Status {
    /// The lifecycle event of ending in this status (an end status, or `failed`).
    pub fn ended(self) -> forkbox_types::events::Lifecycle {
        use forkbox_types::events::Lifecycle;
        match self {
            Status::Deleted => Lifecycle::Deleted,
            Status::Killed => Lifecycle::Killed,
            Status::Merged => Lifecycle::Merged,
            Status::Lost => Lifecycle::Lost,
            Status::Failed | Status::Running | Status::Paused | Status::Hibernated => {
                Lifecycle::Failed
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Hibernated => "hibernated",
            Status::Deleted => "deleted",
            Status::Killed => "killed",
            Status::Failed => "failed",
            Status::Merged => "merged",
            Status::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "running" => Status::Running,
            "paused" => Status::Paused,
            "hibernated" => Status::Hibernated,
            "deleted" => Status::Deleted,
            "killed" => Status::Killed,
            "failed" => Status::Failed,
            "merged" => Status::Merged,
            "lost" => Status::Lost,
            _ => return None,
        })
    }

    /// True while the sandbox exists (running, paused or hibernated).
    pub fn is_live(self) -> bool {
        matches!(self, Status::Running | Status::Paused | Status::Hibernated)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sandbox record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sandbox {
    pub id: String,
    pub status: Status,
    pub runtime: String,
    pub template: String,
    pub cpu: f64,
    pub memory_mb: u64,
    /// Seconds of life from creation (or from the last timeout change).
    pub timeout: u64,
    pub metadata: BTreeMap<String, String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub end_reason: Option<String>,
    /// Milliseconds from request to a ready agent.
    pub boot_ms: f64,
    /// The sandbox this one was forked from.
    pub parent: Option<String>,
    #[serde(skip)]
    pub host_pid: Option<i32>,
    /// The runtime's name for this sandbox's resources: its own id, or after a merge
    /// the merged child's.
    #[serde(skip)]
    pub resource_id: String,
    /// Environment of every command (kept to start the sandbox again; never shown).
    #[serde(skip)]
    pub env: BTreeMap<String, String>,
    /// What expiry does.
    pub on_timeout: OnTimeout,
    /// W3C trace context given at creation (work on the sandbox is logged under it).
    #[serde(skip)]
    pub traceparent: Option<String>,
    /// The workspace that owns it (fork children inherit it).
    pub workspace: String,
    /// Host names its egress proxy admits; `None`: no network beyond loopback.
    pub egress: Option<Vec<String>>,
    /// Volumes it mounts.
    pub volumes: Vec<VolumeMount>,
    /// Disk limit of its own writes, MiB.
    pub disk_mb: u64,
    /// Seconds without a call on it (and nothing of it running through the API)
    /// after which it ends as a timeout does (`on_timeout`); `None`: never.
    pub idle_timeout: Option<u64>,
    /// The node (server) that runs it, when several share a database.
    pub node: Option<String>,
}

/// A volume mounted into a sandbox at `mount` (an absolute path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub id: String,
    pub mount: String,
    /// Mounted read-only: the sandbox reads the volume, others may write it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// A persistent directory with a size limit that outlives sandboxes and can be
/// mounted into several at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub size_mb: u64,
    #[serde(skip)]
    pub workspace: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// What happens when a sandbox's time to live runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Kill,
    Hibernate,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Kill => "kill",
            OnTimeout::Hibernate => "hibernate",
        }
    }

    pub fn parse(s: &str) -> Option<OnTimeout> {
        match s {
            "kill" => Some(OnTimeout::Kill),
            "hibernate" => Some(OnTimeout::Hibernate),
            _ => None,
        }
    }
}

/// A named, read-only copy of a sandbox's root filesystem.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub sandbox_id: String,
    pub template: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The workspace that owns it (the sandbox's).
    #[serde(skip)]
    pub workspace: String,
    /// The runtime that took it (sandboxes made from it are made by the same one):
    /// a `jail` snapshot is the sandbox's files, a `vm` one the whole guest.
    pub runtime: String,
}

/// A validated create request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CreateRequest {
    pub template: Option<String>,
    pub cpu: Option<f64>,
    pub memory_mb: Option<u64>,
    /// Disk limit of the sandbox's own writes, MiB.
    pub disk_mb: Option<u64>,
    pub timeout: Option<u64>,
    /// Seconds without calls before it ends like a timeout; `None`: never.
    pub idle_timeout: Option<u64>,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub on_timeout: OnTimeout,
    /// Start from this snapshot (`snap-…`) instead of the template.
    pub snapshot: Option<String>,
    /// W3C trace context for the sandbox's work (invalid values are ignored).
    pub traceparent: Option<String>,
    /// The owning workspace; empty means [`crate::auth::DEFAULT_WORKSPACE`].
    pub workspace: String,
    /// Host names the sandbox may reach through its egress proxy (`None` or empty: no
    /// network beyond loopback).
    pub egress: Option<Vec<String>>,
    /// Volumes to mount (of the same workspace).
    pub volumes: Vec<VolumeMount>,
    /// Runtime to create it with (`jail`, `vm`); `None`: the server's default.
    pub runtime: Option<String>,
}

/// What an exec call runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// A shell command line (`/bin/sh -c`).
    Command(String),
    /// A cell for the sandbox's persistent REPL kernel.
    Code {
        language: forkbox_types::agent::Language,
        code: String,
    },
}

/// A command or cell to run in a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecCommand {
    pub work: Work,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Seconds; fractional values allowed.
    pub timeout: Option<f64>,
}

/// Which sandboxes a list call returns.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ListFilter {
    pub template: Option<String>,
    /// `None`: live ones (running, paused, hibernated); `Some(s)`: exactly that status.
    pub status: Option<Status>,
    /// Every status, ended ones included (overrides `status`).
    pub all: bool,
    pub limit: u32,
    /// Opaque cursor from the previous page.
    pub after: Option<i64>,
    /// Only this workspace's sandboxes (`None`: every workspace).
    pub workspace: Option<String>,
}
