//! Persistent state through sqlx: SQLite (WAL, one file in the data dir; the default)
//! or PostgreSQL (`--database postgres://…`). Every query is one SQL text for both
//! (`$N` placeholders, which SQLite takes too), run against the backend's own pool by
//! [`on_db!`]: no `Any` driver and no generic bounds; rows are read through [`Cols`],
//! so a column of an unexpected type is an error, not a panic. The migrations come in
//! pairs, one per backend (`migrations/sqlite`, `migrations/postgres`), with the same
//! versions.
//!
//! This module: connecting, and the records of sandboxes, snapshots and volumes;
//! [`keys`]: workspaces, quotas, usage and API keys; [`nodes`]: the servers sharing
//! the database; [`recipes`]: templates built through the API, for every node.

use crate::model::{ListFilter, OnTimeout, Sandbox, Snapshot, Status, Volume};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `0`: the database, as a URL without its password.
    #[error("open database {0}: {1}")]
    Open(String, sqlx::Error),
    #[error("migrate database: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("database query {op}: {source}")]
    Query {
        op: &'static str,
        source: sqlx::Error,
    },
    #[error("database column {column}: {source}")]
    Column { column: String, source: sqlx::Error },
    #[error("corrupt row for {id}: {what}")]
    Corrupt { id: String, what: String },
    #[error("another forkbox server already runs as node {node} on database {db}; give each server its own --node")]
    InUse { node: String, db: String },
}

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the backend's own pool: the body is compiled once
/// per backend.
macro_rules! on_db {
    ($self:expr, $pool:ident => $body:expr) => {
        match &$self.db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// Reading a row's columns by name, with a decoding failure as an error.
trait Cols {
    fn s(&self, col: &str) -> Result<String, StoreError>;
    fn os(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn i(&self, col: &str) -> Result<i64, StoreError>;
    fn oi(&self, col: &str) -> Result<Option<i64>, StoreError>;
    fn f(&self, col: &str) -> Result<f64, StoreError>;
    fn oi32(&self, col: &str) -> Result<Option<i32>, StoreError>;
    fn b(&self, col: &str) -> Result<bool, StoreError>;
}

fn column(col: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |source| StoreError::Column {
        column: col.to_owned(),
        source,
    }
}

macro_rules! cols {
    ($row:ty) => {
        impl Cols for $row {
            fn s(&self, col: &str) -> Result<String, StoreError> {
                self.try_get(col).map_err(column(col))
            }
            fn os(&self, col: &str) -> Result<Option<String>, StoreError> {
                self.try_get(col).map_err(column(col))
            }
            fn i(&self, col: &str) -> Result<i64, StoreError> {
                self.try_get(col).map_err(column(col))
            }
            fn oi(&self, col: &str) -> Result<Option<i64>, StoreError> {
                self.try_get(col).map_err(column(col))
            }
            fn f(&self, col: &str) -> Result<f64, StoreError> {
                self.try_get(col).map_err(column(col))
            }
            fn oi32(&self, col: &str) -> Result<Option<i32>, StoreError> {
                self.try_get(col).map_err(column(col))
            }
            fn b(&self, col: &str) -> Result<bool, StoreError> {
                self.try_get(col).map_err(column(col))
            }
        }
    };
}
cols!(sqlx::sqlite::SqliteRow);
cols!(sqlx::postgres::PgRow);

mod keys;
mod nodes;
mod recipes;
pub use nodes::{NodeInfo, NodeLoad, NodeRecord, WorkspaceLock};

#[derive(Clone)]
pub struct Store {
    db: Db,
    /// The node (server) this store works for: its sandboxes are recorded as this
    /// node's, and recovery and garbage collection see only this node's.
    node: std::sync::Arc<str>,
    /// PostgreSQL: the connection holding this server's claim on its node name
    /// ([`Store::claim`]), kept for the store's life.
    claim: std::sync::Arc<tokio::sync::Mutex<Option<sqlx::PgConnection>>>,
}

/// The node name a store works for unless told otherwise ([`Store::on_node`]).
pub const LOCAL_NODE: &str = "local";

fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// `url` without its password, for messages.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let tail = &rest[authority.len()..];
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                url.to_owned()
            }
        }
        None => url.to_owned(),
    }
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and applies pending
    /// migrations.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let url = format!("sqlite://{shown}");
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(|e| StoreError::Open(shown.clone(), e))?
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
            .map_err(|e| StoreError::Open(shown, e))?;
        SQLITE_MIGRATIONS
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        Ok(Store::with(Db::Sqlite(pool)))
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user:pw@host/db`, or
    /// `?host=/dir` for a unix socket) and applies pending migrations (concurrent
    /// starts wait for each other: the migrator takes an advisory lock).
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let opts =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Open(redacted(url), e))?;
        Store::connect_with(opts, url).await
    }

    /// [`Store::connect`] with options made already (`url` is only for messages).
    pub async fn connect_with(opts: PgConnectOptions, url: &str) -> Result<Store, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Open(redacted(url), e))?;
        POSTGRES_MIGRATIONS
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        Ok(Store::with(Db::Postgres(pool)))
    }

    /// The database at `target`: a PostgreSQL URL, else a SQLite file path.
    pub async fn open_target(target: &str) -> Result<Store, StoreError> {
        if is_postgres(target) {
            Store::connect(target).await
        } else {
            Store::open(Path::new(target)).await
        }
    }

    fn with(db: Db) -> Store {
        Store {
            db,
            node: LOCAL_NODE.into(),
            claim: Default::default(),
        }
    }

    /// This store, working for node `name`.
    pub fn on_node(mut self, name: &str) -> Store {
        self.node = name.into();
        self
    }

    /// The node this store works for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    pub async fn insert_sandbox(&self, s: &Sandbox) -> Result<(), StoreError> {
        self.insert_sandboxes(std::slice::from_ref(s)).await
    }

    /// Inserts every record in one transaction (all or none).
    pub async fn insert_sandboxes(&self, all: &[Sandbox]) -> Result<(), StoreError> {
        on_db!(self, pool => {
            let mut tx = pool.begin().await.map_err(q("begin insert"))?;
            for s in all {
                sqlx::query(
                    "INSERT INTO sandboxes (id, runtime, template, status, cpu, memory_mb, timeout_s, metadata, \
                     created_at, expires_at, ended_at, end_reason, boot_ms, host_pid, parent, resource_id, env, on_timeout, traceparent, workspace, egress, volumes, disk_mb, idle_timeout, node) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)",
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
                .bind(&*self.node)
                .execute(&mut *tx)
                .await
                .map_err(q("insert sandbox"))?;
            }
            tx.commit().await.map_err(q("commit insert"))?;
            Ok(())
        })
    }

    /// Gives a running pool sandbox its new owner's settings; false when it is no
    /// longer running.
    pub async fn hand_over(&self, s: &Sandbox) -> Result<bool, StoreError> {
        // A new rowid: listings page in creation order, and this is its creation.
        let sql = |next_rowid: &str| {
            format!(
                "UPDATE sandboxes SET workspace = $1, metadata = $2, on_timeout = $3, \
                 traceparent = $4, timeout_s = $5, created_at = $6, expires_at = $7, \
                 boot_ms = $8, idle_timeout = $9, rowid = {next_rowid} \
                 WHERE id = $10 AND status = 'running'"
            )
        };
        let sql = match &self.db {
            Db::Sqlite(_) => sql("(SELECT MAX(rowid) + 1 FROM sandboxes)"),
            Db::Postgres(_) => sql("nextval(pg_get_serial_sequence('sandboxes', 'rowid'))"),
        };
        on_db!(self, pool => {
            let r = sqlx::query(&sql)
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
                .execute(pool)
                .await
                .map_err(q("hand over sandbox"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    /// Sets a sandbox's idle timeout and timeout action.
    pub async fn set_expiry_policy(
        &self,
        id: &str,
        idle_timeout: Option<u64>,
        on_timeout: OnTimeout,
    ) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query("UPDATE sandboxes SET idle_timeout = $1, on_timeout = $2 WHERE id = $3")
                .bind(idle_timeout.map(|t| t as i64))
                .bind(on_timeout.as_str())
                .bind(id)
                .execute(pool)
                .await
                .map_err(q("set expiry"))?;
            Ok(())
        })
    }

    /// Marks a sandbox ended with `status` and `reason`.
    pub async fn end_sandbox(
        &self,
        id: &str,
        status: Status,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query("UPDATE sandboxes SET status = $1, end_reason = $2, ended_at = $3 WHERE id = $4")
                .bind(status.as_str())
                .bind(reason)
                .bind(ts(at))
                .bind(id)
                .execute(pool)
                .await
                .map_err(q("end sandbox"))?;
            Ok(())
        })
    }

    /// Sets a sandbox's status (live transitions such as pause/resume).
    pub async fn set_status(&self, id: &str, status: Status) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query("UPDATE sandboxes SET status = $1 WHERE id = $2")
                .bind(status.as_str())
                .bind(id)
                .execute(pool)
                .await
                .map_err(q("set status"))?;
            Ok(())
        })
    }

    /// Records a new time to live.
    pub async fn set_expiry(
        &self,
        id: &str,
        timeout_s: u64,
        expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query("UPDATE sandboxes SET timeout_s = $1, expires_at = $2 WHERE id = $3")
                .bind(timeout_s as i64)
                .bind(ts(expires_at))
                .bind(id)
                .execute(pool)
                .await
                .map_err(q("set expiry"))?;
            Ok(())
        })
    }

    /// One page of sandboxes in creation order, and the cursor of the next page.
    /// The cursor is the row's insertion number, so pages stay stable while new
    /// sandboxes are created (they only ever append).
    pub async fn list_sandboxes(
        &self,
        f: &ListFilter,
    ) -> Result<(Vec<Sandbox>, Option<i64>), StoreError> {
        on_db!(self, pool => {
            let mut sql = String::from("SELECT rowid AS seq, * FROM sandboxes WHERE rowid > $1");
            let mut n = 1;
            let mut arg = |sql: &mut String, cond: &str| {
                n += 1;
                sql.push_str(&format!("{cond}${n}"));
            };
            if f.template.is_some() {
                arg(&mut sql, " AND template = ");
            }
            if f.workspace.is_some() {
                arg(&mut sql, " AND workspace = ");
            }
            if !f.all {
                if f.status.is_some() {
                    arg(&mut sql, " AND status = ");
                } else {
                    sql.push_str(" AND status IN ('running', 'paused', 'hibernated')");
                }
            }
            arg(&mut sql, " ORDER BY rowid LIMIT ");
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
                .fetch_all(pool)
                .await
                .map_err(q("list sandboxes"))?;
            let more = rows.len() > limit as usize;
            let mut out = Vec::with_capacity(rows.len().min(limit as usize));
            let mut last = None;
            for r in rows.iter().take(limit as usize) {
                last = Some(r.i("seq")?);
                out.push(from_row(r)?);
            }
            Ok((out, if more { last } else { None }))
        })
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Option<Sandbox>, StoreError> {
        on_db!(self, pool => {
            let row = sqlx::query("SELECT * FROM sandboxes WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
                .map_err(q("get sandbox"))?;
            row.map(|r| from_row(&r)).transpose()
        })
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
        on_db!(self, pool => {
            let mut tx = pool.begin().await.map_err(q("begin merge"))?;
            sqlx::query("UPDATE sandboxes SET resource_id = $1, host_pid = $2, status = $3 WHERE id = $4")
                .bind(&child.resource_id)
                .bind(child.host_pid)
                .bind(child.status.as_str())
                .bind(parent)
                .execute(&mut *tx)
                .await
                .map_err(q("merge: take over"))?;
            sqlx::query(
                "UPDATE sandboxes SET status = 'merged', end_reason = $1, ended_at = $2 WHERE id = $3",
            )
            .bind(format!("merged into {parent}"))
            .bind(ts(at))
            .bind(&child.id)
            .execute(&mut *tx)
            .await
            .map_err(q("merge: consume child"))?;
            sqlx::query("UPDATE sandboxes SET parent = $1 WHERE parent = $2")
                .bind(parent)
                .bind(&child.id)
                .execute(&mut *tx)
                .await
                .map_err(q("merge: reparent"))?;
            tx.commit().await.map_err(q("commit merge"))?;
            Ok(())
        })
    }

    /// Records a hibernated sandbox woken again (new pid, new expiry).
    pub async fn set_woken(
        &self,
        id: &str,
        host_pid: Option<i32>,
        expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query(
                "UPDATE sandboxes SET status = 'running', host_pid = $1, expires_at = $2 WHERE id = $3",
            )
            .bind(host_pid)
            .bind(ts(expires_at))
            .bind(id)
            .execute(pool)
            .await
            .map_err(q("set woken"))?;
            Ok(())
        })
    }

    pub async fn insert_snapshot(&self, s: &Snapshot) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query(
                "INSERT INTO snapshots (id, name, sandbox_id, template, created_at, workspace, node, \
                 runtime) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&s.id)
            .bind(&s.name)
            .bind(&s.sandbox_id)
            .bind(&s.template)
            .bind(ts(s.created_at))
            .bind(&s.workspace)
            .bind(&*self.node)
            .bind(&s.runtime)
            .execute(pool)
            .await
            .map_err(q("insert snapshot"))?;
            Ok(())
        })
    }

    pub async fn get_snapshot(&self, id: &str) -> Result<Option<Snapshot>, StoreError> {
        on_db!(self, pool => {
            let row = sqlx::query("SELECT * FROM snapshots WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
                .map_err(q("get snapshot"))?;
            row.map(|r| snapshot_from_row(&r)).transpose()
        })
    }

    /// Every snapshot of `workspace` (or of all), oldest first.
    pub async fn list_snapshots(
        &self,
        workspace: Option<&str>,
    ) -> Result<Vec<Snapshot>, StoreError> {
        on_db!(self, pool => {
            let rows = sqlx::query(
                "SELECT * FROM snapshots WHERE $1 IS NULL OR workspace = $1 ORDER BY rowid",
            )
            .bind(workspace)
            .fetch_all(pool)
            .await
            .map_err(q("list snapshots"))?;
            rows.iter().map(snapshot_from_row).collect()
        })
    }

    /// Runs `sql`, a `DELETE` with one text parameter (`$1`).
    async fn delete_where(&self, sql: &str, arg: &str, op: &'static str) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query(sql)
                .bind(arg)
                .execute(pool)
                .await
                .map_err(q(op))?;
            Ok(())
        })
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        self.delete_where("DELETE FROM snapshots WHERE id = $1", id, "delete snapshot")
            .await
    }

    /// Runtime resource ids of every ended sandbox, and of every sandbox a merge
    /// replaced (whose resources a crash may have left behind).
    pub async fn ended_resource_ids(&self) -> Result<Vec<String>, StoreError> {
        on_db!(self, pool => {
            let rows = sqlx::query(
                "SELECT COALESCE(resource_id, id) AS r, id FROM sandboxes \
                 WHERE (node = $1 OR node IS NULL) AND status NOT IN ('running', 'paused', 'hibernated') \
                 UNION SELECT id AS r, id FROM sandboxes \
                 WHERE (node = $1 OR node IS NULL) AND resource_id IS NOT NULL AND resource_id != id",
            )
            .bind(&*self.node)
            .fetch_all(pool)
            .await
            .map_err(q("ended resource ids"))?;
            rows.iter().map(|r| r.s("r")).collect()
        })
    }

    pub async fn insert_volume(&self, v: &Volume) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query(
                "INSERT INTO volumes (id, name, size_mb, workspace, created_at, node) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&v.id)
            .bind(&v.name)
            .bind(v.size_mb as i64)
            .bind(&v.workspace)
            .bind(ts(v.created_at))
            .bind(&*self.node)
            .execute(pool)
            .await
            .map_err(q("insert volume"))?;
            Ok(())
        })
    }

    /// Volumes of `workspace` (or of all), oldest first.
    pub async fn list_volumes(&self, workspace: Option<&str>) -> Result<Vec<Volume>, StoreError> {
        on_db!(self, pool => {
            let rows =
                sqlx::query("SELECT * FROM volumes WHERE $1 IS NULL OR workspace = $1 ORDER BY rowid")
                    .bind(workspace)
                    .fetch_all(pool)
                    .await
                    .map_err(q("list volumes"))?;
            rows.iter().map(volume_from_row).collect()
        })
    }

    pub async fn get_volume(&self, id: &str) -> Result<Option<Volume>, StoreError> {
        on_db!(self, pool => {
            let row = sqlx::query("SELECT * FROM volumes WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
                .map_err(q("get volume"))?;
            row.map(|r| volume_from_row(&r)).transpose()
        })
    }

    pub async fn delete_volume(&self, id: &str) -> Result<(), StoreError> {
        self.delete_where("DELETE FROM volumes WHERE id = $1", id, "delete volume")
            .await
    }

    /// Sandboxes not ended (running, paused, hibernated) that mount volume `id`.
    pub async fn sandboxes_mounting(&self, id: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .volume_users(id)
            .await?
            .into_iter()
            .map(|u| u.sandbox)
            .collect())
    }

    /// The mounts of volume `id` by sandboxes not ended (running, paused,
    /// hibernated).
    pub async fn volume_users(&self, id: &str) -> Result<Vec<VolumeUser>, StoreError> {
        // The mounts are a JSON list per sandbox: read here, so the SQL is the same on
        // every backend.
        let live = on_db!(self, pool => {
            let rows = sqlx::query(
                "SELECT id, runtime, volumes FROM sandboxes \
                 WHERE status IN ('running', 'paused', 'hibernated')",
            )
            .fetch_all(pool)
            .await
            .map_err(q("sandboxes mounting a volume"))?;
            rows.iter()
                .map(|r| Ok((r.s("id")?, r.s("runtime")?, r.s("volumes")?)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        Ok(live
            .into_iter()
            .filter_map(|(sandbox, runtime, vols)| {
                let mounts = serde_json::from_str::<Vec<crate::model::VolumeMount>>(&vols).ok()?;
                let m = mounts.into_iter().find(|m| m.id == id)?;
                Some(VolumeUser {
                    sandbox,
                    runtime,
                    read_only: m.read_only,
                })
            })
            .collect())
    }

    /// Sandboxes in `status`.
    pub async fn sandboxes_with_status(&self, status: Status) -> Result<Vec<Sandbox>, StoreError> {
        on_db!(self, pool => {
            let rows = sqlx::query("SELECT * FROM sandboxes WHERE status = $1 AND (node = $2 OR node IS NULL) \
                 ORDER BY rowid")
                .bind(status.as_str())
                .bind(&*self.node)
                .fetch_all(pool)
                .await
                .map_err(q("list sandboxes"))?;
            rows.iter().map(from_row).collect()
        })
    }
}

fn from_row(r: &impl Cols) -> Result<Sandbox, StoreError> {
    let id = r.s("id")?;
    let corrupt = |what: &str| StoreError::Corrupt {
        id: id.clone(),
        what: what.to_owned(),
    };
    let time_of = |col: &str| -> Result<OffsetDateTime, StoreError> {
        OffsetDateTime::parse(&r.s(col)?, &Rfc3339).map_err(|_| corrupt(col))
    };
    Ok(Sandbox {
        status: Status::parse(&r.s("status")?).ok_or_else(|| corrupt("status"))?,
        runtime: r.s("runtime")?,
        template: r.s("template")?,
        cpu: r.f("cpu")?,
        memory_mb: r.i("memory_mb")?.max(0) as u64,
        timeout: r.i("timeout_s")?.max(0) as u64,
        metadata: json_col(&id, "metadata", &r.s("metadata")?)?,
        created_at: time_of("created_at")?,
        expires_at: time_of("expires_at")?,
        ended_at: r
            .os("ended_at")?
            .map(|s| OffsetDateTime::parse(&s, &Rfc3339).map_err(|_| corrupt("ended_at")))
            .transpose()?,
        end_reason: r.os("end_reason")?,
        boot_ms: r.f("boot_ms")?,
        host_pid: r.oi32("host_pid")?,
        parent: r.os("parent")?,
        resource_id: r.os("resource_id")?.unwrap_or_else(|| id.clone()),
        env: json_col(&id, "env", &r.s("env")?)?,
        on_timeout: OnTimeout::parse(&r.s("on_timeout")?).ok_or_else(|| corrupt("on_timeout"))?,
        traceparent: r.os("traceparent")?,
        workspace: r.s("workspace")?,
        egress: r
            .os("egress")?
            .map(|e| json_col(&id, "egress", &e))
            .transpose()?,
        volumes: json_col(&id, "volumes", &r.s("volumes")?)?,
        disk_mb: r.i("disk_mb")?.max(0) as u64,
        idle_timeout: r.oi("idle_timeout")?.map(|t| t.max(1) as u64),
        node: r.os("node")?,
        id,
    })
}

/// The JSON value of row `id`'s column `col`.
fn json_col<T: serde::de::DeserializeOwned>(
    id: &str,
    col: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt {
        id: id.to_owned(),
        what: col.to_owned(),
    })
}

/// An RFC 3339 time of row `id`'s column `col`.
fn time_col(id: &str, col: &str, v: String) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(&v, &Rfc3339).map_err(|_| StoreError::Corrupt {
        id: id.to_owned(),
        what: col.to_owned(),
    })
}

fn volume_from_row(r: &impl Cols) -> Result<Volume, StoreError> {
    let id = r.s("id")?;
    Ok(Volume {
        created_at: time_col(&id, "created_at", r.s("created_at")?)?,
        name: r.s("name")?,
        size_mb: r.i("size_mb")?.max(0) as u64,
        workspace: r.s("workspace")?,
        id,
    })
}

/// A sandbox's mount of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeUser {
    pub sandbox: String,
    pub runtime: String,
    pub read_only: bool,
}

fn snapshot_from_row(r: &impl Cols) -> Result<Snapshot, StoreError> {
    let id = r.s("id")?;
    Ok(Snapshot {
        created_at: time_col(&id, "created_at", r.s("created_at")?)?,
        name: r.s("name")?,
        sandbox_id: r.s("sandbox_id")?,
        template: r.s("template")?,
        workspace: r.s("workspace")?,
        runtime: r.s("runtime")?,
        id,
    })
}

#[cfg(test)]
mod tests;
