//! Persistent state in SQLite (sqlx, WAL, embedded migrations).

use crate::model::{Sandbox, Status};
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
            .busy_timeout(std::time::Duration::from_secs(5));
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
        sqlx::query(
            "INSERT INTO sandboxes (id, runtime, template, status, cpu, memory_mb, timeout_s, metadata, \
             created_at, expires_at, ended_at, end_reason, boot_ms, host_pid) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .execute(&self.pool)
        .await
        .map_err(q("insert sandbox"))?;
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

    pub async fn get_sandbox(&self, id: &str) -> Result<Option<Sandbox>, StoreError> {
        let row = sqlx::query("SELECT * FROM sandboxes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get sandbox"))?;
        row.map(|r| from_row(&r)).transpose()
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
            host_pid: Some(42),
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
        // Reopening keeps everything (migrations are not re-applied).
        drop(store);
        let again = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        assert_eq!(
            again.get_sandbox(&s.id).await.unwrap().unwrap().status,
            Status::Deleted
        );
    }
}
