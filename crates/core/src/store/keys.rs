//! Workspaces, their quotas and usage, and API keys' records.

use super::{q, time_col, ts, Cols, Db, Store, StoreError};
use crate::auth::{Quota, Token, Usage};
use time::OffsetDateTime;

impl Store {
    /// Creates workspace `name` if it does not exist.
    pub async fn ensure_workspace(&self, name: &str) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query("INSERT INTO workspaces (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .bind(ts(OffsetDateTime::now_utc()))
                .execute(pool)
                .await
                .map_err(q("ensure workspace"))?;
            Ok(())
        })
    }

    /// The quota of `workspace` (unlimited when it has none or does not exist).
    pub async fn quota(&self, workspace: &str) -> Result<Quota, StoreError> {
        on_db!(self, pool => {
            let row = sqlx::query("SELECT max_sandboxes, max_memory_mb FROM workspaces WHERE name = $1")
                .bind(workspace)
                .fetch_optional(pool)
                .await
                .map_err(q("get quota"))?;
            let to_u64 = |v: Option<i64>| v.map(|n| n.max(0) as u64);
            match row {
                Some(r) => Ok(Quota {
                    max_sandboxes: to_u64(r.oi("max_sandboxes")?),
                    max_memory_mb: to_u64(r.oi("max_memory_mb")?),
                }),
                None => Ok(Quota::default()),
            }
        })
    }

    /// Sets the quota of `workspace`, creating it if needed.
    pub async fn set_quota(&self, workspace: &str, quota: Quota) -> Result<(), StoreError> {
        on_db!(self, pool => {
            self.ensure_workspace(workspace).await?;
            sqlx::query("UPDATE workspaces SET max_sandboxes = $1, max_memory_mb = $2 WHERE name = $3")
                .bind(quota.max_sandboxes.map(|n| n as i64))
                .bind(quota.max_memory_mb.map(|n| n as i64))
                .bind(workspace)
                .execute(pool)
                .await
                .map_err(q("set quota"))?;
            Ok(())
        })
    }

    /// Sandboxes of `workspace` not ended, and the memory of those running or paused.
    pub async fn usage(&self, workspace: &str) -> Result<Usage, StoreError> {
        on_db!(self, pool => {
            let r = sqlx::query(
                "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(CASE WHEN status IN ('running', 'paused') \
                 THEN memory_mb ELSE 0 END), 0) AS BIGINT) AS mem FROM sandboxes \
                 WHERE workspace = $1 AND status IN ('running', 'paused', 'hibernated')",
            )
            .bind(workspace)
            .fetch_one(pool)
            .await
            .map_err(q("workspace usage"))?;
            Ok(Usage {
                sandboxes: r.i("n")?.max(0) as u64,
                memory_mb: r.i("mem")?.max(0) as u64,
            })
        })
    }

    /// Stores a key's record under `hash`.
    pub async fn insert_token(&self, t: &Token, hash: &str) -> Result<(), StoreError> {
        on_db!(self, pool => {
            self.ensure_workspace(&t.workspace).await?;
            sqlx::query(
                "INSERT INTO tokens (id, workspace, name, hash, prefix, admin, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&t.id)
            .bind(&t.workspace)
            .bind(&t.name)
            .bind(hash)
            .bind(&t.prefix)
            .bind(t.admin)
            .bind(ts(t.created_at))
            .bind(t.expires_at.map(ts))
            .execute(pool)
            .await
            .map_err(q("insert token"))?;
            Ok(())
        })
    }

    /// The live (not revoked) key whose hash is `hash`.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>, StoreError> {
        on_db!(self, pool => {
            let row = sqlx::query("SELECT * FROM tokens WHERE hash = $1 AND revoked_at IS NULL")
                .bind(hash)
                .fetch_optional(pool)
                .await
                .map_err(q("find token"))?;
            row.map(|r| token_from_row(&r)).transpose()
        })
    }

    /// Keys of `workspace` (or of all), oldest first, revoked ones included.
    pub async fn list_tokens(&self, workspace: Option<&str>) -> Result<Vec<Token>, StoreError> {
        on_db!(self, pool => {
            let rows =
                sqlx::query("SELECT * FROM tokens WHERE $1 IS NULL OR workspace = $1 ORDER BY rowid")
                    .bind(workspace)
                    .fetch_all(pool)
                    .await
                    .map_err(q("list tokens"))?;
            rows.iter().map(token_from_row).collect()
        })
    }

    pub async fn get_token(&self, id: &str) -> Result<Option<Token>, StoreError> {
        on_db!(self, pool => {
            let row = sqlx::query("SELECT * FROM tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
                .map_err(q("get token"))?;
            row.map(|r| token_from_row(&r)).transpose()
        })
    }

    /// Revokes key `id` (no-op when already revoked).
    pub async fn revoke_token(&self, id: &str) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(ts(OffsetDateTime::now_utc()))
                .bind(id)
                .execute(pool)
                .await
                .map_err(q("revoke token"))?;
            Ok(())
        })
    }
}

fn token_from_row(r: &impl Cols) -> Result<Token, StoreError> {
    let id = r.s("id")?;
    Ok(Token {
        created_at: time_col(&id, "created_at", r.s("created_at")?)?,
        revoked_at: r
            .os("revoked_at")?
            .map(|v| time_col(&id, "revoked_at", v))
            .transpose()?,
        expires_at: r
            .os("expires_at")?
            .map(|v| time_col(&id, "expires_at", v))
            .transpose()?,
        workspace: r.s("workspace")?,
        name: r.s("name")?,
        prefix: r.s("prefix")?,
        admin: r.b("admin")?,
        id,
    })
}
