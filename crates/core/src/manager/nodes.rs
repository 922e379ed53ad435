//! Nodes: the servers sharing one database. This node registers itself at start
//! ([`Manager::register_node`]), then heartbeats; a node whose heartbeat is older than
//! [`NODE_DOWN_AFTER`] is down. Work on another node's sandbox is refused with where
//! it runs ([`Manager::ensure_here`]) until nodes forward requests (docs/cluster.md).

use super::*;
use crate::store::NodeRecord;

/// How often a node says it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A node not heard from for this long is down.
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(15);

/// A node as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub record: NodeRecord,
    /// Heard from within [`NODE_DOWN_AFTER`].
    pub up: bool,
    /// The node answering.
    pub this: bool,
}

impl Manager {
    /// Registers this node (claiming its name in the database) as reached at `url`.
    pub async fn register_node(&self, shown_db: &str, url: &str) -> Result<(), CoreError> {
        let runtimes: Vec<String> = self
            .runtime_names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        self.store.claim(shown_db, url, &runtimes).await?;
        Ok(())
    }

    /// Says this node is alive every [`HEARTBEAT_EVERY`] until the manager is gone.
    pub fn spawn_heartbeat(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { break };
                if let Err(e) = me.store.heartbeat(me.live_count() as u64).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        })
    }

    /// Every node of the database, with whether it is up.
    pub async fn nodes(&self) -> Result<Vec<Node>, CoreError> {
        let now = OffsetDateTime::now_utc();
        Ok(self
            .store
            .nodes()
            .await?
            .into_iter()
            .map(|record| Node {
                up: (now - record.heartbeat_at) <= NODE_DOWN_AFTER,
                this: record.name == self.store.node(),
                record,
            })
            .collect())
    }
}
