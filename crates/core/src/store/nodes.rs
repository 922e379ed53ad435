//! Nodes: the servers sharing one database — their registry, heartbeats, load, the
//! claim on a node's name, the workspace admission lock across servers, and the
//! sandboxes of nodes that stay gone.

use super::{json_col, q, redacted, time_col, ts, Cols, Db, Store, StoreError};
use time::OffsetDateTime;

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
    /// Sandboxes not ended (running, paused, hibernated) and placements in flight.
    pub sandboxes: u64,
    /// Memory limits of those running or paused, and of placements in flight, in MiB.
    pub reserved_mb: u64,
}

impl Store {
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
            for table in ["sandboxes", "volumes", "snapshots"] {
                sqlx::query(&format!("UPDATE {table} SET node = $1 WHERE node IS NULL"))
                    .bind(&*self.node)
                    .execute(pool)
                    .await
                    .map_err(q("claim old records"))?;
            }
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
            let rows = sqlx::query(LOADS)
                .bind(now_ms())
                .fetch_all(pool)
                .await
                .map_err(q("node loads"))?;
            loads(&rows)
        })
    }

    /// Reserves a sandbox of `memory_mb` on the node `choose` picks from the nodes'
    /// loads (reservations in flight included) for `ttl` or until
    /// [`Store::release_placement`]; the reservation's token and node, `None` when
    /// `choose` picks none. Atomic across servers: PostgreSQL runs one placement at a
    /// time (a transaction-scoped advisory lock), so simultaneous creates on
    /// different nodes each see the others' choices.
    pub async fn reserve_placement(
        &self,
        memory_mb: u64,
        ttl: std::time::Duration,
        choose: impl FnOnce(&std::collections::HashMap<String, NodeLoad>) -> Option<String>,
    ) -> Result<Option<(String, String)>, StoreError> {
        let now = now_ms();
        let token = crate::ids::new("plc");
        let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        macro_rules! reserve {
            ($tx:ident) => {{
                sqlx::query("DELETE FROM placements WHERE expires_ms <= $1")
                    .bind(now)
                    .execute(&mut *$tx)
                    .await
                    .map_err(q("expire placements"))?;
                let rows = sqlx::query(LOADS)
                    .bind(now)
                    .fetch_all(&mut *$tx)
                    .await
                    .map_err(q("node loads"))?;
                let Some(node) = choose(&loads(&rows)?) else {
                    return Ok(None);
                };
                sqlx::query(
                    "INSERT INTO placements (token, node, memory_mb, expires_ms) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&token)
                .bind(&node)
                .bind(i64::try_from(memory_mb).unwrap_or(i64::MAX))
                .bind(expires)
                .execute(&mut *$tx)
                .await
                .map_err(q("reserve placement"))?;
                $tx.commit().await.map_err(q("reserve placement"))?;
                Ok(Some((token, node)))
            }};
        }
        match &self.db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(q("reserve placement"))?;
                sqlx::query(
                    "SELECT pg_advisory_xact_lock(hashtextextended('forkbox placement', 0))",
                )
                .execute(&mut *tx)
                .await
                .map_err(q("lock placement"))?;
                reserve!(tx)
            }
            // Taking the write lock first makes placements one at a time.
            Db::Sqlite(pool) => {
                let mut tx = pool
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(q("reserve placement"))?;
                reserve!(tx)
            }
        }
    }

    /// The secret every node on this database marks the calls it passes to another
    /// with: made by the first node to ask, read by the others.
    pub async fn cluster_secret(&self) -> Result<String, StoreError> {
        let fresh: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        on_db!(self, pool => {
            sqlx::query(
                "INSERT INTO cluster_secrets (name, value) VALUES ('forward', $1) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(&fresh)
            .execute(pool)
            .await
            .map_err(q("make cluster secret"))?;
            let row = sqlx::query("SELECT value FROM cluster_secrets WHERE name = 'forward'")
                .fetch_one(pool)
                .await
                .map_err(q("read cluster secret"))?;
            row.s("value")
        })
    }

    /// Ends reservation `token` (its sandbox is recorded, or was not made).
    pub async fn release_placement(&self, token: &str) -> Result<(), StoreError> {
        self.delete_where(
            "DELETE FROM placements WHERE token = $1",
            token,
            "release placement",
        )
        .await
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

    /// The node that runs sandbox `id`, or holds volume `vol-…` or snapshot `snap-…`
    /// (`None`: unknown or ended: its record is answered anywhere).
    pub async fn node_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        let sql = if id.starts_with("vol-") {
            "SELECT node FROM volumes WHERE id = $1"
        } else if id.starts_with("snap-") {
            "SELECT node FROM snapshots WHERE id = $1"
        } else {
            "SELECT node FROM sandboxes WHERE id = $1 \
             AND status IN ('running', 'paused', 'hibernated')"
        };
        on_db!(self, pool => {
            let row = sqlx::query(sql)
                .bind(id)
                .fetch_optional(pool)
                .await
                .map_err(q("node of"))?;
            match row {
                Some(r) => r.os("node"),
                None => Ok(None),
            }
        })
    }
}

/// Each node's live sandboxes and placements in flight (`$1`: now, ms). Warm pools
/// are left out: every node keeps its own, refilled as it hands them out.
pub(super) const LOADS: &str =
    "SELECT node, CAST(SUM(n) AS BIGINT) AS n, CAST(SUM(mem) AS BIGINT) AS mem \
     FROM (SELECT node, 1 AS n, CASE WHEN status IN ('running', 'paused') \
     THEN memory_mb ELSE 0 END AS mem FROM sandboxes \
     WHERE status IN ('running', 'paused', 'hibernated') AND node IS NOT NULL \
     AND workspace <> '@pool' \
     UNION ALL SELECT node, 1 AS n, memory_mb AS mem FROM placements \
     WHERE expires_ms > $1) AS l GROUP BY node";

fn loads(rows: &[impl Cols]) -> Result<std::collections::HashMap<String, NodeLoad>, StoreError> {
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
}

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
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
