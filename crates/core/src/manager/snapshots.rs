//! Named snapshots of a sandbox's files, and their records.

use super::*;

impl Manager {
    /// Takes a named, read-only snapshot of a running or paused sandbox's filesystem.
    pub async fn snapshot(&self, id: &SandboxRef, name: &str) -> Result<Snapshot, CoreError> {
        let id = id.id();
        if name.is_empty() || name.len() > 128 || name.contains('\0') {
            return Err(CoreError::Invalid(
                "name must be 1-128 characters without NUL".into(),
            ));
        }
        let live = self.running(id).await?;
        let _op = live.op.lock().await;
        let rec = live.record();
        let snap = Snapshot {
            id: ids::new("snap"),
            name: name.to_owned(),
            sandbox_id: id.to_owned(),
            template: rec.template.clone(),
            created_at: OffsetDateTime::now_utc(),
            workspace: rec.workspace.clone(),
            runtime: rec.runtime.clone(),
        };
        live.instance
            .snapshot(&snap.id, rec.status == Status::Running)
            .await?;
        if let Err(e) = self.store.insert_snapshot(&snap).await {
            let _ = self.forget_snapshot(&snap).await;
            return Err(e.into());
        }
        tracing::info!(sandbox = %id, snapshot = %snap.id, "snapshot taken");
        self.events.emit(
            id,
            Lifecycle::Snapshot,
            serde_json::json!({"id": snap.id, "name": snap.name}),
        );
        Ok(snap)
    }

    /// Snapshots of `workspace` (or of every workspace), oldest first.
    pub async fn snapshots(&self, workspace: Option<&str>) -> Result<Vec<Snapshot>, CoreError> {
        Ok(self.store.list_snapshots(workspace).await?)
    }

    pub async fn get_snapshot(&self, id: &SnapshotRef) -> Result<Snapshot, CoreError> {
        self.get_snapshot_in(id.id()).await
    }

    async fn get_snapshot_in(&self, id: &str) -> Result<Snapshot, CoreError> {
        self.store
            .get_snapshot(id)
            .await?
            .ok_or_else(|| CoreError::NoSnapshot(id.to_owned()))
    }

    /// Deletes a snapshot; sandboxes made from it keep their own copies.
    pub async fn delete_snapshot(&self, id: &SnapshotRef) -> Result<(), CoreError> {
        let id = id.id();
        let snap = self.get_snapshot_in(id).await?;
        // Its files are on the node that took it.
        self.ensure_here(id).await?;
        self.forget_snapshot(&snap).await?;
        self.store.delete_snapshot(id).await?;
        Ok(())
    }

    /// Deletes a snapshot's files, wherever its runtime keeps them (the host's stores,
    /// or the runtime itself for a runtime whose snapshots are its own).
    pub(crate) async fn forget_snapshot(&self, snap: &Snapshot) -> Result<(), CoreError> {
        match self.runtimes.iter().find(|r| r.name() == snap.runtime) {
            Some(rt) if rt.capabilities().own_snapshots => rt.forget_snapshot(&snap.id).await?,
            Some(_) => self.host.delete_snapshot(&snap.id).await?,
            // Its files are that runtime's to delete; its record stays until it can.
            None => {
                return Err(CoreError::Conflict(format!(
                    "snapshot {} was taken by the {} runtime, which this server does not run",
                    snap.id, snap.runtime
                )))
            }
        }
        Ok(())
    }
}
