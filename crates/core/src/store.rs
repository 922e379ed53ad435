//! Persistent state in SQLite (sqlx, WAL, embedded migrations).

use crate::auth::{Quota, Token, Usage};
use crate::model::{ListFilter, OnTimeout, Sandbox, Snapshot, Status, Volume};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open database {0}: {1}")]
    Open(PathBuf, sqlx::Error),
    #[error("migrate database: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("database query {op}: {source}")]
    Query {
        op: &'static str,
        source: sqlx::Error,
    },
    #[error("corrupt row for {id}: {what}")]
    Corrupt { id: String, what: String },
}

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

impl Store {
    /// Opens (creating if needed) `path` and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let url = format!("sqlite://{}", path.display());
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(|e| StoreError::Open(path.into(), e))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5))
            // 512 KiB of page cache per connection (SQLite's default is 2 MiB): the
            // hot rows are few, and four full caches were most of the server's
            // growth under sandbox churn (docs/performance.md, Load).
            .pragma("cache_size", "-512");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Open(path.into(), e))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        Ok(Store { pool })
    }

    pub async fn insert_sandbox(&self, s: &Sandbox) -> Result<(), StoreError> {
        self.insert_sandboxes(std::slice::from_ref(s)).await
    }

    /// Inserts every record in one transaction (all or none).
    pub async fn insert_sandboxes(&self, all: &[Sandbox]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin insert"))?;
        for s in all {
            sqlx::query(
                "INSERT INTO sandboxes (id, runtime, template, status, cpu, memory_mb, timeout_s, metadata, \
                 created_at, expires_at, ended_at, end_reason, boot_ms, host_pid, parent, resource_id, env, on_timeout, traceparent, workspace, egress, volumes, disk_mb, idle_timeout) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&s.id)
            .bind(&s.runtime)
            .bind(&s.template)
            .bind(s.status.as_str())
            .bind(s.cpu)
            .bind(s.memory_mb as i64)
            .bind(s.timeout as i64)
            .bind(serde_json::to_string(&s.metadata).unwrap_or_else(|_| "{}".into()))
            .bind(ts(s.created_at))
            .bind(ts(s.expires_at))
            .bind(s.ended_at.map(ts))
            .bind(&s.end_reason)
            .bind(s.boot_ms)
            .bind(s.host_pid)
            .bind(&s.parent)
            .bind(&s.resource_id)
            .bind(serde_json::to_string(&s.env).unwrap_or_else(|_| "{}".into()))
            .bind(s.on_timeout.as_str())
            .bind(&s.traceparent)
            .bind(&s.workspace)
            .bind(s.egress.as_ref().and_then(|e| serde_json::to_string(e).ok()))
            .bind(serde_json::to_string(&s.volumes).unwrap_or_else(|_| "[]".into()))
            .bind(s.disk_mb as i64)
            .bind(s.idle_timeout.map(|t| t as i64))
            .execute(&mut *tx)
            .await
            .map_err(q("insert sandbox"))?;
        }
        tx.commit().await.map_err(q("commit insert"))?;
        Ok(())
    }

    /// Gives a running pool sandbox its new owner's settings; false when it is no
    /// longer running.
    pub async fn hand_over(&self, s: &Sandbox) -> Result<bool, StoreError> {
        let r = sqlx::query(
            // A new rowid: listings page in creation order, and this is its creation.
            "UPDATE sandboxes SET workspace = ?, metadata = ?, on_timeout = ?, traceparent = ?, \
             timeout_s = ?, created_at = ?, expires_at = ?, boot_ms = ?, idle_timeout = ?, \
             rowid = (SELECT MAX(rowid) + 1 FROM sandboxes) \
             WHERE id = ? AND status = 'running'",
        )
        .bind(&s.workspace)
        .bind(serde_json::to_string(&s.metadata).unwrap_or_else(|_| "{}".into()))
        .bind(s.on_timeout.as_str())
        .bind(&s.traceparent)
        .bind(s.timeout as i64)
        .bind(ts(s.created_at))
        .bind(ts(s.expires_at))
        .bind(s.boot_ms)
        .bind(s.idle_timeout.map(|t| t as i64))
        .bind(&s.id)
        .execute(&self.pool)
        .await
        .map_err(q("hand over sandbox"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Sets a sandbox's idle timeout and timeout action.
    pub async fn set_expiry_policy(
        &self,
        id: &str,
        idle_timeout: Option<u64>,
        on_timeout: OnTimeout,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET idle_timeout = ?, on_timeout = ? WHERE id = ?")
            .bind(idle_timeout.map(|t| t as i64))
            .bind(on_timeout.as_str())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("set expiry"))?;
        Ok(())
    }

    /// Marks a sandbox ended with `status` and `reason`.
    pub async fn end_sandbox(
        &self,
        id: &str,
        status: Status,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET status = ?, end_reason = ?, ended_at = ? WHERE id = ?")
            .bind(status.as_str())
            .bind(reason)
            .bind(ts(at))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("end sandbox"))?;
        Ok(())
    }

    /// Sets a sandbox's status (live transitions such as pause/resume).
    pub async fn set_status(&self, id: &str, status: Status) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET status = ? WHERE id = ?")
            .bind(status.as_str())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("set status"))?;
        Ok(())
    }

    /// Records a new time to live.
    pub async fn set_expiry(
        &self,
        id: &str,
        timeout_s: u64,
        expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET timeout_s = ?, expires_at = ? WHERE id = ?")
            .bind(timeout_s as i64)
            .bind(ts(expires_at))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("set expiry"))?;
        Ok(())
    }

    /// One page of sandboxes in creation order, and the cursor of the next page.
    /// The cursor is the row's insertion number, so pages stay stable while new
    /// sandboxes are created (they only ever append).
    pub async fn list_sandboxes(
        &self,
        f: &ListFilter,
    ) -> Result<(Vec<Sandbox>, Option<i64>), StoreError> {
        let mut sql = String::from("SELECT rowid AS seq, * FROM sandboxes WHERE rowid > ?");
        if f.template.is_some() {
            sql.push_str(" AND template = ?");
        }
        if f.workspace.is_some() {
            sql.push_str(" AND workspace = ?");
        }
        if !f.all {
            if f.status.is_some() {
                sql.push_str(" AND status = ?");
            } else {
                sql.push_str(" AND status IN ('running', 'paused', 'hibernated')");
            }
        }
        sql.push_str(" ORDER BY rowid LIMIT ?");
        let mut query = sqlx::query(&sql).bind(f.after.unwrap_or(0));
        if let Some(t) = &f.template {
            query = query.bind(t);
        }
        if let Some(w) = &f.workspace {
            query = query.bind(w);
        }
        if let (false, Some(s)) = (f.all, f.status) {
            query = query.bind(s.as_str());
        }
        let limit = f.limit.max(1);
        let rows = query
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list sandboxes"))?;
        let more = rows.len() > limit as usize;
        let mut out = Vec::with_capacity(rows.len().min(limit as usize));
        let mut last = None;
        for r in rows.iter().take(limit as usize) {
            last = Some(r.get::<i64, _>("seq"));
            out.push(from_row(r)?);
        }
        Ok((out, if more { last } else { None }))
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Option<Sandbox>, StoreError> {
        let row = sqlx::query("SELECT * FROM sandboxes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get sandbox"))?;
        row.map(|r| from_row(&r)).transpose()
    }

    /// `merge_into`, in one transaction: `parent` takes over `child`'s resources and
    /// status, `child` is marked merged, and `child`'s own fork children now count as
    /// `parent`'s.
    pub async fn merge(
        &self,
        child: &Sandbox,
        parent: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin merge"))?;
        sqlx::query("UPDATE sandboxes SET resource_id = ?, host_pid = ?, status = ? WHERE id = ?")
            .bind(&child.resource_id)
            .bind(child.host_pid)
            .bind(child.status.as_str())
            .bind(parent)
            .execute(&mut *tx)
            .await
            .map_err(q("merge: take over"))?;
        sqlx::query(
            "UPDATE sandboxes SET status = 'merged', end_reason = ?, ended_at = ? WHERE id = ?",
        )
        .bind(format!("merged into {parent}"))
        .bind(ts(at))
        .bind(&child.id)
        .execute(&mut *tx)
        .await
        .map_err(q("merge: consume child"))?;
        sqlx::query("UPDATE sandboxes SET parent = ? WHERE parent = ?")
            .bind(parent)
            .bind(&child.id)
            .execute(&mut *tx)
            .await
            .map_err(q("merge: reparent"))?;
        tx.commit().await.map_err(q("commit merge"))?;
        Ok(())
    }

    /// Records a hibernated sandbox woken again (new pid, new expiry).
    pub async fn set_woken(
        &self,
        id: &str,
        host_pid: Option<i32>,
        expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sandboxes SET status = 'running', host_pid = ?, expires_at = ? WHERE id = ?",
        )
        .bind(host_pid)
        .bind(ts(expires_at))
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("set woken"))?;
        Ok(())
    }

    pub async fn insert_snapshot(&self, s: &Snapshot) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO snapshots (id, name, sandbox_id, template, created_at, workspace) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.name)
        .bind(&s.sandbox_id)
        .bind(&s.template)
        .bind(ts(s.created_at))
        .bind(&s.workspace)
        .execute(&self.pool)
        .await
        .map_err(q("insert snapshot"))?;
        Ok(())
    }

    pub async fn get_snapshot(&self, id: &str) -> Result<Option<Snapshot>, StoreError> {
        let row = sqlx::query("SELECT * FROM snapshots WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get snapshot"))?;
        row.map(|r| snapshot_from_row(&r)).transpose()
    }

    /// Every snapshot of `workspace` (or of all), oldest first.
    pub async fn list_snapshots(
        &self,
        workspace: Option<&str>,
    ) -> Result<Vec<Snapshot>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM snapshots WHERE ?1 IS NULL OR workspace = ?1 ORDER BY rowid",
        )
        .bind(workspace)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list snapshots"))?;
        rows.iter().map(snapshot_from_row).collect()
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM snapshots WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("delete snapshot"))?;
        Ok(())
    }

    /// Runtime resource ids of every ended sandbox, and of every sandbox a merge
    /// replaced (whose resources a crash may have left behind).
    pub async fn ended_resource_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT COALESCE(resource_id, id) AS r, id FROM sandboxes \
             WHERE status NOT IN ('running', 'paused', 'hibernated') \
             UNION SELECT id AS r, id FROM sandboxes WHERE resource_id IS NOT NULL AND resource_id != id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("ended resource ids"))?;
        Ok(rows.iter().map(|r| r.get::<String, _>("r")).collect())
    }

    /// Creates workspace `name` if it does not exist.
    pub async fn ensure_workspace(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT OR IGNORE INTO workspaces (name, created_at) VALUES (?, ?)")
            .bind(name)
            .bind(ts(OffsetDateTime::now_utc()))
            .execute(&self.pool)
            .await
            .map_err(q("ensure workspace"))?;
        Ok(())
    }

    /// The quota of `workspace` (unlimited when it has none or does not exist).
    pub async fn quota(&self, workspace: &str) -> Result<Quota, StoreError> {
        let row = sqlx::query("SELECT max_sandboxes, max_memory_mb FROM workspaces WHERE name = ?")
            .bind(workspace)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get quota"))?;
        let to_u64 = |v: Option<i64>| v.map(|n| n.max(0) as u64);
        Ok(row
            .map(|r| Quota {
                max_sandboxes: to_u64(r.get("max_sandboxes")),
                max_memory_mb: to_u64(r.get("max_memory_mb")),
            })
            .unwrap_or_default())
    }

    /// Sets the quota of `workspace`, creating it if needed.
    pub async fn set_quota(&self, workspace: &str, quota: Quota) -> Result<(), StoreError> {
        self.ensure_workspace(workspace).await?;
        sqlx::query("UPDATE workspaces SET max_sandboxes = ?, max_memory_mb = ? WHERE name = ?")
            .bind(quota.max_sandboxes.map(|n| n as i64))
            .bind(quota.max_memory_mb.map(|n| n as i64))
            .bind(workspace)
            .execute(&self.pool)
            .await
            .map_err(q("set quota"))?;
        Ok(())
    }

    /// Sandboxes of `workspace` not ended, and the memory of those running or paused.
    pub async fn usage(&self, workspace: &str) -> Result<Usage, StoreError> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN status IN ('running', 'paused') \
             THEN memory_mb ELSE 0 END), 0) AS mem FROM sandboxes \
             WHERE workspace = ? AND status IN ('running', 'paused', 'hibernated')",
        )
        .bind(workspace)
        .fetch_one(&self.pool)
        .await
        .map_err(q("workspace usage"))?;
        Ok(Usage {
            sandboxes: r.get::<i64, _>("n").max(0) as u64,
            memory_mb: r.get::<i64, _>("mem").max(0) as u64,
        })
    }

    /// Stores a key's record under `hash`.
    pub async fn insert_token(&self, t: &Token, hash: &str) -> Result<(), StoreError> {
        self.ensure_workspace(&t.workspace).await?;
        sqlx::query(
            "INSERT INTO tokens (id, workspace, name, hash, prefix, admin, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.workspace)
        .bind(&t.name)
        .bind(hash)
        .bind(&t.prefix)
        .bind(t.admin)
        .bind(ts(t.created_at))
        .bind(t.expires_at.map(ts))
        .execute(&self.pool)
        .await
        .map_err(q("insert token"))?;
        Ok(())
    }

    /// The live (not revoked) key whose hash is `hash`.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>, StoreError> {
        let row = sqlx::query("SELECT * FROM tokens WHERE hash = ? AND revoked_at IS NULL")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("find token"))?;
        row.map(|r| token_from_row(&r)).transpose()
    }

    /// Keys of `workspace` (or of all), oldest first, revoked ones included.
    pub async fn list_tokens(&self, workspace: Option<&str>) -> Result<Vec<Token>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM tokens WHERE ?1 IS NULL OR workspace = ?1 ORDER BY rowid")
                .bind(workspace)
                .fetch_all(&self.pool)
                .await
                .map_err(q("list tokens"))?;
        rows.iter().map(token_from_row).collect()
    }

    pub async fn get_token(&self, id: &str) -> Result<Option<Token>, StoreError> {
        let row = sqlx::query("SELECT * FROM tokens WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get token"))?;
        row.map(|r| token_from_row(&r)).transpose()
    }

    /// Revokes key `id` (no-op when already revoked).
    pub async fn revoke_token(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(ts(OffsetDateTime::now_utc()))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("revoke token"))?;
        Ok(())
    }

    pub async fn insert_volume(&self, v: &Volume) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO volumes (id, name, size_mb, workspace, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&v.id)
        .bind(&v.name)
        .bind(v.size_mb as i64)
        .bind(&v.workspace)
        .bind(ts(v.created_at))
        .execute(&self.pool)
        .await
        .map_err(q("insert volume"))?;
        Ok(())
    }

    /// Volumes of `workspace` (or of all), oldest first.
    pub async fn list_volumes(&self, workspace: Option<&str>) -> Result<Vec<Volume>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM volumes WHERE ?1 IS NULL OR workspace = ?1 ORDER BY rowid")
                .bind(workspace)
                .fetch_all(&self.pool)
                .await
                .map_err(q("list volumes"))?;
        rows.iter().map(volume_from_row).collect()
    }

    pub async fn get_volume(&self, id: &str) -> Result<Option<Volume>, StoreError> {
        let row = sqlx::query("SELECT * FROM volumes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get volume"))?;
        row.map(|r| volume_from_row(&r)).transpose()
    }

    pub async fn delete_volume(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM volumes WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("delete volume"))?;
        Ok(())
    }

    /// Sandboxes not ended (running, paused, hibernated) that mount volume `id`.
    pub async fn sandboxes_mounting(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.id AS id FROM sandboxes s, json_each(s.volumes) v \
             WHERE json_extract(v.value, '$.id') = ? AND s.status IN ('running', 'paused', 'hibernated')",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("sandboxes mounting a volume"))?;
        Ok(rows.iter().map(|r| r.get::<String, _>("id")).collect())
    }

    /// Sandboxes in `status`.
    pub async fn sandboxes_with_status(&self, status: Status) -> Result<Vec<Sandbox>, StoreError> {
        let rows = sqlx::query("SELECT * FROM sandboxes WHERE status = ? ORDER BY created_at")
            .bind(status.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(q("list sandboxes"))?;
        rows.iter().map(from_row).collect()
    }
}

fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Sandbox, StoreError> {
    let id: String = r.get("id");
    let corrupt = |what: &str| StoreError::Corrupt {
        id: id.clone(),
        what: what.to_owned(),
    };
    let time_of = |col: &str| -> Result<OffsetDateTime, StoreError> {
        let s: String = r.get(col);
        OffsetDateTime::parse(&s, &Rfc3339).map_err(|_| corrupt(col))
    };
    let status: String = r.get("status");
    let ended: Option<String> = r.get("ended_at");
    Ok(Sandbox {
        status: Status::parse(&status).ok_or_else(|| corrupt("status"))?,
        runtime: r.get("runtime"),
        template: r.get("template"),
        cpu: r.get("cpu"),
        memory_mb: r.get::<i64, _>("memory_mb").max(0) as u64,
        timeout: r.get::<i64, _>("timeout_s").max(0) as u64,
        metadata: serde_json::from_str(&r.get::<String, _>("metadata"))
            .map_err(|_| corrupt("metadata"))?,
        created_at: time_of("created_at")?,
        expires_at: time_of("expires_at")?,
        ended_at: ended
            .map(|s| OffsetDateTime::parse(&s, &Rfc3339).map_err(|_| corrupt("ended_at")))
            .transpose()?,
        end_reason: r.get("end_reason"),
        boot_ms: r.get("boot_ms"),
        host_pid: r.get("host_pid"),
        parent: r.get("parent"),
        resource_id: r
            .get::<Option<String>, _>("resource_id")
            .unwrap_or_else(|| id.clone()),
        env: serde_json::from_str(&r.get::<String, _>("env")).map_err(|_| corrupt("env"))?,
        on_timeout: OnTimeout::parse(&r.get::<String, _>("on_timeout"))
            .ok_or_else(|| corrupt("on_timeout"))?,
        traceparent: r.get("traceparent"),
        workspace: r.get("workspace"),
        egress: r
            .get::<Option<String>, _>("egress")
            .map(|e| serde_json::from_str(&e).map_err(|_| corrupt("egress")))
            .transpose()?,
        volumes: serde_json::from_str(&r.get::<String, _>("volumes"))
            .map_err(|_| corrupt("volumes"))?,
        disk_mb: r.get::<i64, _>("disk_mb").max(0) as u64,
        idle_timeout: r
            .get::<Option<i64>, _>("idle_timeout")
            .map(|t| t.max(1) as u64),
        id,
    })
}

fn token_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Token, StoreError> {
    let id: String = r.get("id");
    let parse = |col: &str, v: String| {
        OffsetDateTime::parse(&v, &Rfc3339).map_err(|_| StoreError::Corrupt {
            id: id.clone(),
            what: col.to_owned(),
        })
    };
    Ok(Token {
        created_at: parse("created_at", r.get("created_at"))?,
        revoked_at: r
            .get::<Option<String>, _>("revoked_at")
            .map(|v| parse("revoked_at", v))
            .transpose()?,
        expires_at: r
            .get::<Option<String>, _>("expires_at")
            .map(|v| parse("expires_at", v))
            .transpose()?,
        workspace: r.get("workspace"),
        name: r.get("name"),
        prefix: r.get("prefix"),
        admin: r.get("admin"),
        id,
    })
}

fn volume_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Volume, StoreError> {
    let id: String = r.get("id");
    let created: String = r.get("created_at");
    Ok(Volume {
        created_at: OffsetDateTime::parse(&created, &Rfc3339).map_err(|_| StoreError::Corrupt {
            id: id.clone(),
            what: "created_at".into(),
        })?,
        name: r.get("name"),
        size_mb: r.get::<i64, _>("size_mb").max(0) as u64,
        workspace: r.get("workspace"),
        id,
    })
}

fn snapshot_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Snapshot, StoreError> {
    let id: String = r.get("id");
    let created: String = r.get("created_at");
    Ok(Snapshot {
        created_at: OffsetDateTime::parse(&created, &Rfc3339).map_err(|_| StoreError::Corrupt {
            id: id.clone(),
            what: "created_at".into(),
        })?,
        name: r.get("name"),
        sandbox_id: r.get("sandbox_id"),
        template: r.get("template"),
        workspace: r.get("workspace"),
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sandboxes_round_trip_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let s = Sandbox {
            id: "sbx-0123456789abcdef".into(),
            status: Status::Running,
            runtime: "jail".into(),
            template: "python".into(),
            cpu: 1.0,
            memory_mb: 512,
            timeout: 300,
            metadata: [("k".to_owned(), "v".to_owned())].into(),
            created_at: now,
            expires_at: now + time::Duration::seconds(300),
            ended_at: None,
            end_reason: None,
            boot_ms: 7.5,
            parent: None,
            host_pid: Some(42),
            resource_id: "sbx-0123456789abcdef".into(),
            env: [("A".to_owned(), "b".to_owned())].into(),
            on_timeout: OnTimeout::Hibernate,
            traceparent: Some("00-4bf92f3564d486ad4bf92f3564d486ad-00f067aa0ba902b7-01".into()),
            workspace: "team-a".into(),
            egress: Some(vec!["pypi.org".into()]),
            volumes: vec![crate::model::VolumeMount {
                id: "vol-0123456789abcdef".into(),
                mount: "/data".into(),
                read_only: true,
            }],
            disk_mb: 2048,
            idle_timeout: Some(60),
        };
        store.insert_sandbox(&s).await.unwrap();
        assert_eq!(store.get_sandbox(&s.id).await.unwrap().unwrap(), s);
        assert_eq!(
            store
                .sandboxes_with_status(Status::Running)
                .await
                .unwrap()
                .len(),
            1
        );
        store
            .end_sandbox(&s.id, Status::Deleted, "deleted by client", now)
            .await
            .unwrap();
        let got = store.get_sandbox(&s.id).await.unwrap().unwrap();
        assert_eq!(got.status, Status::Deleted);
        assert_eq!(got.end_reason.as_deref(), Some("deleted by client"));
        assert!(store.get_sandbox("sbx-nope").await.unwrap().is_none());
        // Listing: live ones by default, pages with a cursor, filters.
        for i in 0..5 {
            let mut t = s.clone();
            t.id = format!("sbx-{i:016}");
            t.template = if i % 2 == 0 {
                "python".into()
            } else {
                "other".into()
            };
            store.insert_sandbox(&t).await.unwrap();
        }
        let mut f = ListFilter {
            limit: 2,
            ..Default::default()
        };
        let (page, next) = store.list_sandboxes(&f).await.unwrap();
        assert_eq!(
            page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["sbx-0000000000000000", "sbx-0000000000000001"]
        );
        f.after = next;
        let (page2, next2) = store.list_sandboxes(&f).await.unwrap();
        assert_eq!(page2.len(), 2);
        f.after = next2;
        let (page3, next3) = store.list_sandboxes(&f).await.unwrap();
        assert_eq!((page3.len(), next3), (1, None));
        let only = ListFilter {
            limit: 10,
            template: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(store.list_sandboxes(&only).await.unwrap().0.len(), 2);
        let deleted = ListFilter {
            limit: 10,
            status: Some(Status::Deleted),
            ..Default::default()
        };
        assert_eq!(store.list_sandboxes(&deleted).await.unwrap().0.len(), 1);
        let all = ListFilter {
            limit: 10,
            all: true,
            ..Default::default()
        };
        assert_eq!(store.list_sandboxes(&all).await.unwrap().0.len(), 6);
        store
            .set_status("sbx-0000000000000000", Status::Paused)
            .await
            .unwrap();
        assert_eq!(
            store
                .get_sandbox("sbx-0000000000000000")
                .await
                .unwrap()
                .unwrap()
                .status,
            Status::Paused
        );
        // Reopening keeps everything (migrations are not re-applied).
        drop(store);
        let again = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        assert_eq!(
            again.get_sandbox(&s.id).await.unwrap().unwrap().status,
            Status::Deleted
        );
    }
}
