//! API keys: authenticating a key, creating, listing and revoking keys, and whose
//! workspace a sandbox or snapshot is.

use super::*;

impl Manager {
    /// The caller a key stands for, or `None` for an unknown, revoked or expired key.
    pub async fn authenticate(&self, key: &str) -> Result<Option<Principal>, CoreError> {
        if !key.starts_with(auth::KEY_PREFIX) || key.len() > 256 {
            return Ok(None);
        }
        let now = OffsetDateTime::now_utc();
        Ok(self
            .store
            .token_by_hash(&auth::hash_key(key))
            .await?
            .filter(|t| t.in_force(now))
            .map(|t| Principal {
                workspace: t.workspace,
                token_id: Some(t.id),
                token_name: Some(t.name),
                admin: t.admin,
            }))
    }

    /// Makes a key, valid until `expires_at` when given (in the future, at most ten
    /// years on). Non-admin callers may only make non-admin keys of their own
    /// workspace; `workspace` defaults to the caller's.
    pub async fn create_token(
        &self,
        by: &Principal,
        name: &str,
        workspace: Option<&str>,
        admin: bool,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<NewToken, CoreError> {
        let now = OffsetDateTime::now_utc();
        if expires_at.is_some_and(|e| e <= now || e > now + time::Duration::days(3660)) {
            return Err(CoreError::Invalid(
                "a key expires in the future, at most ten years on".into(),
            ));
        }
        let workspace = workspace.unwrap_or(&by.workspace);
        if !by.admin && (admin || workspace != by.workspace) {
            return Err(CoreError::Forbidden(
                "only an admin key may make admin keys or keys of another workspace".into(),
            ));
        }
        if !auth::valid_workspace(workspace) {
            return Err(CoreError::Invalid(
                "workspace must be 1-64 characters of a-z, 0-9, '-' and '_'".into(),
            ));
        }
        if name.is_empty() || name.len() > 128 || name.contains('\0') {
            return Err(CoreError::Invalid(
                "name must be 1-128 characters without NUL".into(),
            ));
        }
        Ok(auth::issue(
            &self.store,
            &auth::new_key(),
            name,
            workspace,
            admin,
            expires_at,
        )
        .await?)
    }

    /// Makes sure `key` (chosen by the operator, e.g. from the environment) is an admin
    /// key of the default workspace.
    pub async fn ensure_admin_key(&self, key: &str, name: &str) -> Result<(), CoreError> {
        if !key.starts_with(auth::KEY_PREFIX) || key.len() < auth::KEY_PREFIX.len() + 20 {
            return Err(CoreError::Invalid(format!(
                "an admin key must start with {} and have at least 20 more characters",
                auth::KEY_PREFIX
            )));
        }
        if self.authenticate(key).await?.is_none() {
            auth::issue(&self.store, key, name, DEFAULT_WORKSPACE, true, None).await?;
        }
        Ok(())
    }

    /// Keys the caller may see: its workspace's, or every key for an admin.
    pub async fn tokens(&self, by: &Principal) -> Result<Vec<Token>, CoreError> {
        let ws = (!by.admin).then_some(by.workspace.as_str());
        Ok(self.store.list_tokens(ws).await?)
    }

    /// Revokes a key the caller may see; it fails from the next request on.
    pub async fn revoke_token(&self, by: &Principal, id: &str) -> Result<Token, CoreError> {
        let t = self
            .store
            .get_token(id)
            .await?
            .filter(|t| by.admin || t.workspace == by.workspace)
            .ok_or_else(|| CoreError::NoToken(id.to_owned()))?;
        self.store.revoke_token(id).await?;
        Ok(self.store.get_token(id).await?.unwrap_or(t))
    }

    /// The workspace owning sandbox `id`, if it exists.
    pub async fn sandbox_workspace(&self, id: &str) -> Result<Option<String>, CoreError> {
        if let Some(l) = self.live(id) {
            return Ok(Some(l.record().workspace));
        }
        Ok(self.store.get_sandbox(id).await?.map(|s| s.workspace))
    }

    /// The workspace owning snapshot `id`, if it exists.
    pub async fn snapshot_workspace(&self, id: &str) -> Result<Option<String>, CoreError> {
        Ok(self.store.get_snapshot(id).await?.map(|s| s.workspace))
    }
}
