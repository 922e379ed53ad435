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
    /// This node's name.
    pub fn node_name(&self) -> &str {
        self.store.node()
    }

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

/// Which node a request about a sandbox belongs on.
#[derive(Debug, Clone, PartialEq)]
pub enum Owner {
    /// This node runs it, or nobody does (its record, if any, is answered here).
    Here,
    /// Another node runs it.
    Elsewhere { node: String, url: String, up: bool },
}

impl Manager {
    /// Where requests about sandbox `id` belong. A sandbox this node holds is answered
    /// without a database read.
    pub async fn owner(&self, id: &str) -> Result<Owner, CoreError> {
        if self.live(id).is_some() {
            return Ok(Owner::Here);
        }
        let Some(node) = self.store.node_of(id).await? else {
            return Ok(Owner::Here);
        };
        if node == self.store.node() {
            return Ok(Owner::Here);
        }
        let now = OffsetDateTime::now_utc();
        Ok(
            match self
                .store
                .nodes()
                .await?
                .into_iter()
                .find(|n| n.name == node)
            {
                Some(n) => Owner::Elsewhere {
                    up: (now - n.heartbeat_at) <= NODE_DOWN_AFTER,
                    url: n.url,
                    node,
                },
                None => Owner::Elsewhere {
                    node,
                    url: String::new(),
                    up: false,
                },
            },
        )
    }
}
