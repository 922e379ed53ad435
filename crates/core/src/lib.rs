//! The core of forkbox: what a sandbox is, the state it moves through, the interface
//! every runtime implements, and where all of it is kept.
//!
//! Core never sees HTTP: the API layer turns requests into calls on [`Manager`], which
//! returns typed results and [`CoreError`]s.

pub mod access;
pub mod auth;
pub mod down;
pub mod events;
mod idle;
pub mod ids;
pub mod languages;
pub mod lsp;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod runner;
pub mod runtime;
pub mod store;
pub mod templates;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trace;
pub mod volumes;
pub mod warm;

pub use access::{SandboxRef, SnapshotRef};
pub use manager::{ForkOutcome, Manager, ManagerConfig, EXIT_UNKNOWN, MAX_FORK, TIMEOUT_NOTE};
pub use model::{
    CreateRequest, ExecCommand, ListFilter, OnTimeout, Sandbox, Snapshot, Status, Volume,
    VolumeMount, Work,
};
pub use runtime::{
    ByteStream, FileErrorKind, GcReport, HostStores, Instance, Runtime, RuntimeError, TemplateInfo,
    TemplateSpec, UploadStream,
};

/// Everything that can go wrong in a core operation, by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("sandbox {0} not found")]
    NotFound(String),
    #[error("sandbox {id} is {status}")]
    Gone { id: String, status: Status },
    /// Being destroyed right now (deleted, expired, or its agent died).
    #[error("sandbox {0} is ending")]
    Ending(String),
    /// Another node (server on the same database) runs the sandbox, or keeps the
    /// volume or snapshot: its processes and files are there.
    #[error("{id} is on node {node}{}; send the request there", url.as_deref().map(|u| format!(" ({u})")).unwrap_or_default())]
    OtherNode {
        id: String,
        node: String,
        url: Option<String>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("sandbox {id} is {status}; this needs a running sandbox")]
    WrongState { id: String, status: Status },
    #[error("snapshot {0} not found")]
    NoSnapshot(String),
    /// The request contradicts the sandboxes' relations (e.g. merge into a non-ancestor).
    #[error("{0}")]
    Conflict(String),
    /// The caller's key may not do this (e.g. a non-admin key managing another workspace).
    #[error("{0}")]
    Forbidden(String),
    /// The workspace's quota does not allow it.
    #[error("{0}")]
    Quota(String),
    #[error("API key {0} not found")]
    NoToken(String),
    #[error("language not found: {0}")]
    NoLanguage(String),
    #[error("volume {0} not found")]
    NoVolume(String),
    #[error("template {0} not found")]
    NoTemplate(String),
    #[error("code context {0} not found (closed, or its REPL restarted)")]
    NoContext(String),
    /// The work ran past its timeout and was interrupted.
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}
