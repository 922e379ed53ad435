//! Who may touch which sandbox and snapshot. Every [`Manager`] operation on a sandbox
//! takes a [`SandboxRef`] (on a snapshot, a [`SnapshotRef`]); a caller gets one only
//! from [`Manager::sandbox_ref`] ([`Manager::snapshot_ref`]), which checks the id's
//! shape and that the caller's workspace owns it, answering a malformed id, a missing
//! one and another workspace's alike (404). So no request path can reach a sandbox
//! without the check, whatever the HTTP edge does with the id's spelling; pool and
//! runner sandboxes (workspaces `@pool`, `@runner`) are out of every key's reach.

use crate::auth::Principal;
use crate::manager::Manager;
use crate::CoreError;

/// A sandbox id whose owner was checked (or an internal caller's own sandbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRef(String);

impl SandboxRef {
    pub fn id(&self) -> &str {
        &self.0
    }

    /// For core's own callers (warm pool, runner, template builds, the reaper): the
    /// sandbox is one they made.
    pub(crate) fn internal(id: &str) -> SandboxRef {
        SandboxRef(id.to_owned())
    }
}

impl std::fmt::Display for SandboxRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A snapshot id whose owner was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef(String);

impl SnapshotRef {
    pub fn id(&self) -> &str {
        &self.0
    }
}

impl Manager {
    /// `id` as a sandbox of `caller`'s workspace: `NotFound` when it is malformed,
    /// unknown, or another workspace's (ended ones included).
    pub async fn sandbox_ref(&self, caller: &Principal, id: &str) -> Result<SandboxRef, CoreError> {
        if !crate::ids::is_valid("sbx", id) {
            return Err(CoreError::NotFound(shown(id)));
        }
        match self.sandbox_workspace(id).await? {
            Some(ws) if ws == caller.workspace => Ok(SandboxRef(id.to_owned())),
            _ => Err(CoreError::NotFound(id.to_owned())),
        }
    }

    /// `id` as a snapshot of `caller`'s workspace: `NoSnapshot` otherwise.
    pub async fn snapshot_ref(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<SnapshotRef, CoreError> {
        if !crate::ids::is_valid("snap", id) {
            return Err(CoreError::NoSnapshot(shown(id)));
        }
        match self.snapshot_workspace(id).await? {
            Some(ws) if ws == caller.workspace => Ok(SnapshotRef(id.to_owned())),
            _ => Err(CoreError::NoSnapshot(id.to_owned())),
        }
    }
}

/// A client's id as an error message may quote it (bounded, printable).
fn shown(id: &str) -> String {
    let mut s: String = id.chars().take(64).filter(|c| !c.is_control()).collect();
    if id.chars().count() > 64 {
        s.push('…');
    }
    s
}
