//! Quota admission: whether a workspace may have another sandbox (count and memory).

use super::*;

/// Held from a quota check until the sandboxes it admitted are recorded, so two
/// concurrent creates of one workspace cannot both take its last place: this server's
/// lock of the workspace and, when servers share a database, the database's.
pub(crate) struct Admitted {
    _here: tokio::sync::OwnedMutexGuard<()>,
    _everywhere: Option<crate::store::WorkspaceLock>,
}

impl Manager {
    /// The quota of `workspace` (read through when servers share the database: another
    /// may have changed it).
    pub async fn quota(&self, workspace: &str) -> Result<Quota, CoreError> {
        if self.store.backend() == "postgres" {
            return Ok(self.store.quota(workspace).await?);
        }
        if let Some(q) = lock(&self.quotas).get(workspace) {
            return Ok(*q);
        }
        let q = self.store.quota(workspace).await?;
        lock(&self.quotas).insert(workspace.to_owned(), q);
        Ok(q)
    }

    /// What `workspace` holds now.
    pub async fn usage(&self, workspace: &str) -> Result<Usage, CoreError> {
        Ok(self.store.usage(workspace).await?)
    }

    /// The lock serialising `workspace`'s admissions (each workspace its own, so no
    /// workspace waits behind another's cold create, fork or wake).
    fn admission_lock(&self, workspace: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.admitting)
            .entry(workspace.to_owned())
            .or_default()
            .clone()
    }

    /// `workspace`'s admission locks, this server's first.
    async fn lock_workspace(&self, workspace: &str) -> Result<Admitted, CoreError> {
        let here = self.admission_lock(workspace).lock_owned().await;
        let everywhere = self.store.lock_workspace(workspace).await?;
        Ok(Admitted {
            _here: here,
            _everywhere: everywhere,
        })
    }

    /// Checks that `workspace` may add `n` sandboxes of `memory_mb` each; the guard
    /// must be held until they are recorded. `None` when the workspace is unlimited.
    pub(crate) async fn admit(
        &self,
        workspace: &str,
        n: u64,
        memory_mb: u64,
    ) -> Result<Option<Admitted>, CoreError> {
        let quota = self.quota(workspace).await?;
        if quota.is_unlimited() {
            return Ok(None);
        }
        let guard = self.lock_workspace(workspace).await?;
        let usage = self.store.usage(workspace).await?;
        match quota.refuse(workspace, usage, n, memory_mb) {
            Some(why) => Err(CoreError::Quota(why)),
            None => Ok(Some(guard)),
        }
    }

    /// Like [`Manager::admit`] for memory only (waking a sandbox that already counts).
    pub(super) async fn admit_memory(
        &self,
        workspace: &str,
        memory_mb: u64,
    ) -> Result<Option<Admitted>, CoreError> {
        let quota = Quota {
            max_sandboxes: None,
            ..self.quota(workspace).await?
        };
        if quota.is_unlimited() {
            return Ok(None);
        }
        let guard = self.lock_workspace(workspace).await?;
        let usage = self.store.usage(workspace).await?;
        match quota.refuse(workspace, usage, 1, memory_mb) {
            Some(why) => Err(CoreError::Quota(why)),
            None => Ok(Some(guard)),
        }
    }

    /// Sets the quota of `workspace` (admins only).
    pub async fn set_quota(
        &self,
        by: &Principal,
        workspace: &str,
        quota: Quota,
    ) -> Result<(), CoreError> {
        if !by.admin {
            return Err(CoreError::Forbidden(
                "only an admin key may set quotas".into(),
            ));
        }
        if !auth::valid_workspace(workspace) {
            return Err(CoreError::Invalid(
                "workspace must be 1-64 characters of a-z, 0-9, '-' and '_'".into(),
            ));
        }
        self.store.set_quota(workspace, quota).await?;
        lock(&self.quotas).insert(workspace.to_owned(), quota);
        Ok(())
    }
}
