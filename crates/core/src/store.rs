//! Persistent state through sqlx: SQLite (WAL, one file in the data dir; the default)
//! or PostgreSQL (`--database postgres://…`). Every query is one SQL text for both
//! (`$N` placeholders, which SQLite takes too), run against the backend's own pool by
//! [`on_db!`]: no `Any` driver and no generic bounds; rows are read through [`Cols`],
//! so a column of an unexpected type is an error, not a panic. The migrations come in
//! pairs, one per backend (`migrations/sqlite`, `migrations/postgres`), with the same
//! versions.

use crate::auth::{Quota, Token, Usage};
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

/// A workspace's admission lock across servers ([`Store::lock_workspace`]): held
/// while this lives; dropping it closes its connection, which releases the lock.
pub struct WorkspaceLock {
    _conn: sqlx::PgConnection,
}

/// A node (a server) as the database knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    /// Where other nodes and clients reach it (`serve --advertise`).
    pub url: String,
    pub runtimes: Vec<String>,
    pub started_at: OffsetDateTime,
    /// Its last sign of life.
    pub heartbeat_at: OffsetDateTime,
    /// Sandboxes it ran at its last heartbeat.
    pub sandboxes: u64,
    /// What it offers: CPUs, memory (MiB) and built templates.
    pub cpus: u64,
    pub memory_mb: u64,
    pub templates: Vec<String>,
    /// Takes no new sandboxes (`forkbox node drain`).
    pub draining: bool,
    /// Seconds its sandboxes outlive it (0: until it returns).
    pub orphan_grace_s: u64,
}

/// What a node says of itself when it registers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeInfo {
    pub url: String,
    pub runtimes: Vec<String>,
    pub cpus: u64,
    pub memory_mb: u64,
    pub templates: Vec<String>,
    /// Seconds its sandboxes outlive it (its `--orphan-grace`; 0: until it returns).
    pub orphan_grace_s: u64,
}

/// A node's share of the live sandboxes, for placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    /// Sandboxes not ended (running, paused, hibernated).
    pub sandboxes: u64,
    /// Memory limits of those running or paused, in MiB.
    pub reserved_mb: u64,
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

    /// Claims this store's node for this server until the store is dropped, and
    /// registers it (`url`: where it is reached; `runtimes`: what it runs). Records
    /// without a node (from before nodes) become this node's. PostgreSQL: a session
    /// advisory lock on the node's name, on a connection of its own, so two servers
    /// never run as one node (`InUse`); SQLite: the data dir's lock already says so.
    pub async fn claim(&self, shown: &str, info: &NodeInfo) -> Result<(), StoreError> {
        if let Db::Postgres(pool) = &self.db {
            let mut held = self.claim.lock().await;
            if held.is_none() {
                let mut conn = pool.acquire().await.map_err(q("claim node"))?.detach();
                let got: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                        .bind(format!("forkbox node {}", self.node))
                        .fetch_one(&mut conn)
                        .await
                        .map_err(q("claim node"))?;
                if !got {
                    return Err(StoreError::InUse {
                        node: self.node.to_string(),
                        db: redacted(shown),
                    });
                }
                *held = Some(conn);
            }
        }
        let now = ts(OffsetDateTime::now_utc());
        let runtimes = serde_json::to_string(&info.runtimes).unwrap_or_else(|_| "[]".into());
        let templates = serde_json::to_string(&info.templates).unwrap_or_else(|_| "[]".into());
        on_db!(self, pool => {
            sqlx::query("UPDATE sandboxes SET node = $1 WHERE node IS NULL")
                .bind(&*self.node)
                .execute(pool)
                .await
                .map_err(q("claim old sandboxes"))?;
            sqlx::query(
                "INSERT INTO nodes (name, url, runtimes, started_at, heartbeat_at, sandboxes, \
                 cpus, memory_mb, templates, orphan_grace_s) \
                 VALUES ($1, $2, $3, $4, $4, 0, $5, $6, $7, $8) \
                 ON CONFLICT (name) DO UPDATE SET url = excluded.url, \
                 runtimes = excluded.runtimes, started_at = excluded.started_at, \
                 heartbeat_at = excluded.heartbeat_at, cpus = excluded.cpus, \
                 memory_mb = excluded.memory_mb, templates = excluded.templates, \
                 orphan_grace_s = excluded.orphan_grace_s",
            )
            .bind(&*self.node)
            .bind(&info.url)
            .bind(&runtimes)
            .bind(&now)
            .bind(i64::try_from(info.cpus).unwrap_or(i64::MAX))
            .bind(i64::try_from(info.memory_mb).unwrap_or(i64::MAX))
            .bind(&templates)
            .bind(i64::try_from(info.orphan_grace_s).unwrap_or(i64::MAX))
            .execute(pool)
            .await
            .map_err(q("register node"))?;
            Ok(())
        })
    }

    /// Waits for, then holds, workspace `workspace`'s admission lock across every
    /// server on this database until the returned guard is dropped (PostgreSQL: a
    /// session advisory lock on a connection of its own, released when the guard
    /// closes it). `None` on SQLite: one server per database file, whose own lock
    /// suffices.
    pub async fn lock_workspace(
        &self,
        workspace: &str,
    ) -> Result<Option<WorkspaceLock>, StoreError> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(None);
        };
        use sqlx::Connection as _;
        let opts = pool.connect_options();
        let mut conn = sqlx::PgConnection::connect_with(&opts)
            .await
            .map_err(q("connect for a workspace lock"))?;
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("forkbox workspace {workspace}"))
            .execute(&mut conn)
            .await
            .map_err(q("lock workspace"))?;
        Ok(Some(WorkspaceLock { _conn: conn }))
    }

    /// This node's sign of life, with the number of sandboxes it runs and the
    /// templates it has.
    pub async fn heartbeat(&self, sandboxes: u64, templates: &[String]) -> Result<(), StoreError> {
        let templates = serde_json::to_string(templates).unwrap_or_else(|_| "[]".into());
        on_db!(self, pool => {
            sqlx::query(
                "UPDATE nodes SET heartbeat_at = $1, sandboxes = $2, templates = $3 \
                 WHERE name = $4",
            )
                .bind(ts(OffsetDateTime::now_utc()))
                .bind(i64::try_from(sandboxes).unwrap_or(i64::MAX))
                .bind(&templates)
                .bind(&*self.node)
                .execute(pool)
                .await
                .map_err(q("heartbeat"))?;
            Ok(())
        })
    }

    /// Every node that ever registered, by name.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        on_db!(self, pool => {
            let rows = sqlx::query("SELECT * FROM nodes ORDER BY name")
                .fetch_all(pool)
                .await
                .map_err(q("list nodes"))?;
            rows.iter().map(node_from_row).collect()
        })
    }

    /// Marks node `name` draining (no new sandboxes) or not; false when there is no
    /// such node.
    pub async fn set_draining(&self, name: &str, draining: bool) -> Result<bool, StoreError> {
        on_db!(self, pool => {
            let r = sqlx::query("UPDATE nodes SET draining = $1 WHERE name = $2")
                .bind(draining)
                .bind(name)
                .execute(pool)
                .await
                .map_err(q("drain node"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    /// Every node's live sandboxes and the memory they hold, by node name.
    pub async fn node_loads(
        &self,
    ) -> Result<std::collections::HashMap<String, NodeLoad>, StoreError> {
        on_db!(self, pool => {
            let rows = sqlx::query(
                "SELECT node, COUNT(*) AS n, CAST(COALESCE(SUM(CASE WHEN status IN \
                 ('running', 'paused') THEN memory_mb ELSE 0 END), 0) AS BIGINT) AS mem \
                 FROM sandboxes WHERE status IN ('running', 'paused', 'hibernated') \
                 AND node IS NOT NULL GROUP BY node",
            )
            .fetch_all(pool)
            .await
            .map_err(q("node loads"))?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.s("node")?,
                        NodeLoad {
                            sandboxes: r.i("n")?.max(0) as u64,
                            reserved_mb: r.i("mem")?.max(0) as u64,
                        },
                    ))
                })
                .collect()
        })
    }

    /// Records every sandbox node `node` runs as lost (`reason`); how many.
    pub async fn lose_node_sandboxes(&self, node: &str, reason: &str) -> Result<u64, StoreError> {
        on_db!(self, pool => {
            let r = sqlx::query(
                "UPDATE sandboxes SET status = 'lost', end_reason = $1, ended_at = $2 \
                 WHERE node = $3 AND status IN ('running', 'paused', 'hibernated')",
            )
            .bind(reason)
            .bind(ts(OffsetDateTime::now_utc()))
            .bind(node)
            .execute(pool)
            .await
            .map_err(q("lose a node's sandboxes"))?;
            Ok(r.rows_affected())
        })
    }

    /// The node that runs sandbox `id` (`None`: unknown or ended: its record is
    /// answered anywhere).
    pub async fn node_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        on_db!(self, pool => {
            let row = sqlx::query(
                "SELECT node FROM sandboxes WHERE id = $1 \
                 AND status IN ('running', 'paused', 'hibernated')",
            )
                .bind(id)
                .fetch_optional(pool)
                .await
                .map_err(q("node of sandbox"))?;
            match row {
                Some(r) => r.os("node"),
                None => Ok(None),
            }
        })
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
                "INSERT INTO snapshots (id, name, sandbox_id, template, created_at, workspace) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&s.id)
            .bind(&s.name)
            .bind(&s.sandbox_id)
            .bind(&s.template)
            .bind(ts(s.created_at))
            .bind(&s.workspace)
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

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query("DELETE FROM snapshots WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await
                .map_err(q("delete snapshot"))?;
            Ok(())
        })
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

    pub async fn insert_volume(&self, v: &Volume) -> Result<(), StoreError> {
        on_db!(self, pool => {
            sqlx::query(
                "INSERT INTO volumes (id, name, size_mb, workspace, created_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&v.id)
            .bind(&v.name)
            .bind(v.size_mb as i64)
            .bind(&v.workspace)
            .bind(ts(v.created_at))
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
        on_db!(self, pool => {
            sqlx::query("DELETE FROM volumes WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await
                .map_err(q("delete volume"))?;
            Ok(())
        })
    }

    /// Sandboxes not ended (running, paused, hibernated) that mount volume `id`.
    pub async fn sandboxes_mounting(&self, id: &str) -> Result<Vec<String>, StoreError> {
        // The mounts are a JSON list per sandbox: read here, so the SQL is the same on
        // every backend.
        let live = on_db!(self, pool => {
            let rows = sqlx::query(
                "SELECT id, volumes FROM sandboxes \
                 WHERE status IN ('running', 'paused', 'hibernated')",
            )
            .fetch_all(pool)
            .await
            .map_err(q("sandboxes mounting a volume"))?;
            rows.iter()
                .map(|r| Ok((r.s("id")?, r.s("volumes")?)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        Ok(live
            .into_iter()
            .filter(|(_, vols)| {
                serde_json::from_str::<Vec<crate::model::VolumeMount>>(vols)
                    .is_ok_and(|v| v.iter().any(|m| m.id == id))
            })
            .map(|(sid, _)| sid)
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

fn node_from_row(r: &impl Cols) -> Result<NodeRecord, StoreError> {
    let name = r.s("name")?;
    Ok(NodeRecord {
        url: r.s("url")?,
        runtimes: json_col(&name, "runtimes", &r.s("runtimes")?)?,
        started_at: time_col(&name, "started_at", r.s("started_at")?)?,
        heartbeat_at: time_col(&name, "heartbeat_at", r.s("heartbeat_at")?)?,
        sandboxes: r.i("sandboxes")?.max(0) as u64,
        cpus: r.i("cpus")?.max(0) as u64,
        memory_mb: r.i("memory_mb")?.max(0) as u64,
        templates: json_col(&name, "templates", &r.s("templates")?)?,
        draining: r.b("draining")?,
        orphan_grace_s: r.i("orphan_grace_s")?.max(0) as u64,
        name,
    })
}

/// An RFC 3339 time of row `id`'s column `col`.
fn time_col(id: &str, col: &str, v: String) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(&v, &Rfc3339).map_err(|_| StoreError::Corrupt {
        id: id.to_owned(),
        what: col.to_owned(),
    })
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

fn snapshot_from_row(r: &impl Cols) -> Result<Snapshot, StoreError> {
    let id = r.s("id")?;
    Ok(Snapshot {
        created_at: time_col(&id, "created_at", r.s("created_at")?)?,
        name: r.s("name")?,
        sandbox_id: r.s("sandbox_id")?,
        template: r.s("template")?,
        workspace: r.s("workspace")?,
        id,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A database of each backend for one test: SQLite in `dir`; PostgreSQL, when
    /// `FORKBOX_TEST_DATABASE_URL` names a server (`scripts/with-postgres.sh` starts
    /// one), a fresh database on it. `make test` sets `FORKBOX_REQUIRE_POSTGRES`, so
    /// there a missing server fails instead of skipping. Each store is given with how
    /// to open it again.
    async fn backends(dir: &Path) -> Vec<(Store, String)> {
        let file = dir.join("db.sqlite").display().to_string();
        let mut out = vec![(Store::open_target(&file).await.unwrap(), file)];
        match std::env::var("FORKBOX_TEST_DATABASE_URL") {
            Ok(url) => {
                let name = format!("fbt_{:016x}", rand::random::<u64>());
                let admin = Store::connect(&url).await.unwrap();
                let Db::Postgres(pool) = &admin.db else {
                    panic!("not a PostgreSQL URL: {url}");
                };
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(pool)
                    .await
                    .unwrap();
                let opts = PgConnectOptions::from_str(&url).unwrap().database(&name);
                let store = Store::connect_with(opts, &url).await.unwrap();
                // Reopened by URL: the same server, this database.
                let again = if url.contains('?') {
                    format!("{}&dbname={name}", url)
                } else {
                    format!("{url}?dbname={name}")
                };
                out.push((store, again));
            }
            Err(_) if std::env::var_os("FORKBOX_REQUIRE_POSTGRES").is_some() => {
                panic!("FORKBOX_REQUIRE_POSTGRES is set but FORKBOX_TEST_DATABASE_URL is not")
            }
            Err(_) => eprintln!("PostgreSQL store tests skipped: no FORKBOX_TEST_DATABASE_URL"),
        }
        out
    }

    fn sandbox(id: &str) -> Sandbox {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        Sandbox {
            id: id.into(),
            status: Status::Running,
            runtime: "jail".into(),
            template: "python".into(),
            cpu: 1.0,
            memory_mb: 512,
            timeout: 300,
            metadata: Default::default(),
            created_at: now,
            expires_at: now + time::Duration::seconds(300),
            ended_at: None,
            end_reason: None,
            boot_ms: 1.0,
            parent: None,
            host_pid: None,
            resource_id: id.into(),
            env: Default::default(),
            on_timeout: OnTimeout::Kill,
            traceparent: None,
            workspace: "default".into(),
            egress: None,
            volumes: vec![],
            disk_mb: 8192,
            idle_timeout: None,
            node: Some(LOCAL_NODE.into()),
        }
    }

    #[tokio::test]
    async fn sandboxes_round_trip_and_end() {
        let dir = tempfile::tempdir().unwrap();
        for (store, target) in backends(dir.path()).await {
            round_trip(store, &target).await;
        }
    }

    async fn round_trip(store: Store, target: &str) {
        let backend = store.backend();
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
            node: Some(LOCAL_NODE.into()),
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
        let again = Store::open_target(target).await.unwrap();
        assert_eq!(again.backend(), backend);
        assert_eq!(
            again.get_sandbox(&s.id).await.unwrap().unwrap().status,
            Status::Deleted
        );
    }

    #[tokio::test]
    async fn hand_over_moves_a_sandbox_to_the_end_of_listings() {
        let dir = tempfile::tempdir().unwrap();
        for (store, _) in backends(dir.path()).await {
            for id in ["sbx-a", "sbx-b", "sbx-c"] {
                store.insert_sandbox(&sandbox(id)).await.unwrap();
            }
            let mut a = sandbox("sbx-a");
            a.workspace = "team".into();
            assert!(store.hand_over(&a).await.unwrap());
            let all = ListFilter {
                limit: 10,
                ..Default::default()
            };
            let ids: Vec<String> = store
                .list_sandboxes(&all)
                .await
                .unwrap()
                .0
                .into_iter()
                .map(|s| s.id)
                .collect();
            assert_eq!(ids, ["sbx-b", "sbx-c", "sbx-a"], "{}", store.backend());
            store
                .end_sandbox("sbx-b", Status::Deleted, "gone", OffsetDateTime::now_utc())
                .await
                .unwrap();
            assert!(!store.hand_over(&sandbox("sbx-b")).await.unwrap());
        }
    }

    #[tokio::test]
    async fn workspaces_quotas_usage_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        for (store, _) in backends(dir.path()).await {
            let b = store.backend();
            store.ensure_workspace("team").await.unwrap();
            store.ensure_workspace("team").await.unwrap();
            assert_eq!(store.quota("team").await.unwrap(), Quota::default());
            let quota = Quota {
                max_sandboxes: Some(3),
                max_memory_mb: Some(4096),
            };
            store.set_quota("team", quota).await.unwrap();
            assert_eq!(store.quota("team").await.unwrap(), quota, "{b}");
            for (id, status) in [
                ("sbx-1", Status::Running),
                ("sbx-2", Status::Paused),
                ("sbx-3", Status::Hibernated),
            ] {
                let mut s = sandbox(id);
                s.workspace = "team".into();
                s.status = status;
                store.insert_sandbox(&s).await.unwrap();
            }
            let u = store.usage("team").await.unwrap();
            assert_eq!((u.sandboxes, u.memory_mb), (3, 1024), "{b}");
            let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
            for (id, admin) in [("tok-1", true), ("tok-2", false)] {
                let t = Token {
                    id: id.into(),
                    name: "k".into(),
                    workspace: "team".into(),
                    prefix: "fbk_x".into(),
                    admin,
                    created_at: now,
                    revoked_at: None,
                    expires_at: Some(now + time::Duration::days(1)),
                };
                store.insert_token(&t, &format!("hash-{id}")).await.unwrap();
            }
            let got = store.token_by_hash("hash-tok-1").await.unwrap().unwrap();
            assert!(got.admin, "{b}");
            assert!(!store.get_token("tok-2").await.unwrap().unwrap().admin);
            store.revoke_token("tok-1").await.unwrap();
            assert!(store.token_by_hash("hash-tok-1").await.unwrap().is_none());
            let listed = store.list_tokens(Some("team")).await.unwrap();
            assert_eq!(listed.len(), 2);
            assert!(store.list_tokens(Some("other")).await.unwrap().is_empty());
            assert_eq!(store.list_tokens(None).await.unwrap().len(), 2);
        }
    }

    #[tokio::test]
    async fn volumes_know_who_mounts_them() {
        let dir = tempfile::tempdir().unwrap();
        for (store, _) in backends(dir.path()).await {
            let v = Volume {
                id: "vol-1".into(),
                name: "data".into(),
                size_mb: 64,
                workspace: "default".into(),
                created_at: OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
            };
            store.insert_volume(&v).await.unwrap();
            assert_eq!(
                store.list_volumes(None).await.unwrap(),
                std::slice::from_ref(&v)
            );
            let mut s = sandbox("sbx-m");
            s.volumes = vec![crate::model::VolumeMount {
                id: "vol-1".into(),
                mount: "/data".into(),
                read_only: false,
            }];
            store.insert_sandbox(&s).await.unwrap();
            store.insert_sandbox(&sandbox("sbx-n")).await.unwrap();
            assert_eq!(store.sandboxes_mounting("vol-1").await.unwrap(), ["sbx-m"]);
            store
                .end_sandbox("sbx-m", Status::Killed, "x", OffsetDateTime::now_utc())
                .await
                .unwrap();
            assert!(store.sandboxes_mounting("vol-1").await.unwrap().is_empty());
            assert!(store
                .ended_resource_ids()
                .await
                .unwrap()
                .contains(&"sbx-m".to_owned()));
            store.delete_volume("vol-1").await.unwrap();
            assert!(store.get_volume("vol-1").await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn nodes_claim_their_names_and_see_their_own_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        for (store, target) in backends(dir.path()).await {
            let b = store.backend();
            // A record from before nodes becomes the first claimant's.
            store.insert_sandbox(&sandbox("sbx-old")).await.unwrap();
            on_db!(store, pool => {
                sqlx::query("UPDATE sandboxes SET node = NULL").execute(pool).await.unwrap();
            });
            let a = store.clone().on_node("a");
            let info = |url: &str| NodeInfo {
                url: url.into(),
                runtimes: vec!["jail".into()],
                cpus: 2,
                memory_mb: 4096,
                templates: vec!["python".into()],
                orphan_grace_s: 600,
            };
            a.claim(&target, &info("http://a:7070")).await.unwrap();
            assert_eq!(a.node_of("sbx-old").await.unwrap().as_deref(), Some("a"));
            if b == "postgres" {
                let twin = Store::open_target(&target).await.unwrap().on_node("a");
                assert!(matches!(
                    twin.claim(&target, &info("http://x")).await,
                    Err(StoreError::InUse { .. })
                ));
            }
            let other = Store::open_target(&target).await.unwrap().on_node("b");
            other.claim(&target, &info("http://b:7070")).await.unwrap();
            other.insert_sandbox(&sandbox("sbx-b")).await.unwrap();
            a.insert_sandbox(&sandbox("sbx-a")).await.unwrap();
            let ids = |v: Vec<Sandbox>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
            assert_eq!(
                ids(a.sandboxes_with_status(Status::Running).await.unwrap()),
                ["sbx-old", "sbx-a"],
                "{b}"
            );
            assert_eq!(
                ids(other.sandboxes_with_status(Status::Running).await.unwrap()),
                ["sbx-b"]
            );
            other
                .end_sandbox("sbx-b", Status::Deleted, "x", OffsetDateTime::now_utc())
                .await
                .unwrap();
            assert!(!a
                .ended_resource_ids()
                .await
                .unwrap()
                .contains(&"sbx-b".into()));
            assert!(other
                .ended_resource_ids()
                .await
                .unwrap()
                .contains(&"sbx-b".into()));
            other
                .heartbeat(7, &["python".into(), "base".into()])
                .await
                .unwrap();
            assert!(other.set_draining("b", true).await.unwrap());
            assert!(!other.set_draining("nope", true).await.unwrap());
            let loads = a.node_loads().await.unwrap();
            assert_eq!(
                loads["a"],
                NodeLoad {
                    sandboxes: 2,
                    reserved_mb: 1024
                },
                "{b}"
            );
            assert!(!loads.contains_key("b"));
            let nodes = a.nodes().await.unwrap();
            assert_eq!(
                nodes
                    .iter()
                    .map(|n| (n.name.as_str(), n.url.as_str(), n.sandboxes))
                    .collect::<Vec<_>>(),
                [("a", "http://a:7070", 0), ("b", "http://b:7070", 7)],
                "{b}"
            );
            assert_eq!(nodes[0].runtimes, ["jail"]);
            assert_eq!((nodes[0].cpus, nodes[0].memory_mb), (2, 4096));
            assert_eq!(nodes[1].templates, ["python", "base"]);
            assert!(nodes[1].draining && !nodes[0].draining);
        }
    }

    #[tokio::test]
    async fn workspace_locks_exclude_each_other_across_servers() {
        let dir = tempfile::tempdir().unwrap();
        for (store, target) in backends(dir.path()).await {
            let held = store.lock_workspace("team").await.unwrap();
            if store.backend() == "sqlite" {
                assert!(held.is_none());
                continue;
            }
            let other = Store::open_target(&target).await.unwrap();
            // Another workspace is free; this one waits until the first is let go.
            other.lock_workspace("else").await.unwrap().unwrap();
            let waiting = tokio::spawn(async move { other.lock_workspace("team").await });
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            assert!(!waiting.is_finished());
            drop(held);
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
                .await
                .expect("the lock was not released")
                .unwrap()
                .unwrap();
            assert!(got.is_some());
        }
    }

    #[test]
    fn both_backends_have_the_same_migrations() {
        let versions = |m: &Migrator| {
            m.iter()
                .map(|m| (m.version, m.description.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(versions(&SQLITE_MIGRATIONS), versions(&POSTGRES_MIGRATIONS));
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redacted("postgres://fb:secret@db:5432/forkbox?sslmode=disable"),
            "postgres://fb:***@db:5432/forkbox?sslmode=disable"
        );
        assert_eq!(redacted("postgres://fb@db/x"), "postgres://fb@db/x");
        assert_eq!(
            redacted("/var/lib/forkbox/forkbox.db"),
            "/var/lib/forkbox/forkbox.db"
        );
    }
}
