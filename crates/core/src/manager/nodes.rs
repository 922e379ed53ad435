//! Nodes: the servers sharing one database. This node registers itself at start
//! ([`Manager::register_node`]), then heartbeats; a node whose heartbeat is older than
//! [`NODE_DOWN_AFTER`] is down. Work on another node's sandbox is refused with where
//! it runs ([`Manager::ensure_here`]) until nodes forward requests (docs/cluster.md).

use super::*;
use crate::store::{NodeInfo, NodeRecord};

/// How often a node says it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A node not heard from for this long is down.
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(15);
/// How long a placement's reservation counts when its sandbox is never recorded.
pub const PLACEMENT_TTL: Duration = Duration::from_secs(120);

/// Where a create goes, and the reservation that holds its place there.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub owner: Owner,
    /// Release with [`Manager::release_placement`] once the sandbox is recorded.
    pub token: Option<String>,
}

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

    /// Registers this node (claiming its name in the database) as reached at `url`,
    /// offering `cpus` and `memory_mb` (the host's), its sandboxes outliving it by
    /// `orphan_grace` (`None`: until it returns).
    pub async fn register_node(
        &self,
        shown_db: &str,
        url: &str,
        cpus: u64,
        memory_mb: u64,
        orphan_grace: Option<Duration>,
    ) -> Result<(), CoreError> {
        let info = NodeInfo {
            url: url.to_owned(),
            runtimes: self
                .runtime_names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            cpus,
            memory_mb,
            templates: self.template_names().await,
            orphan_grace_s: orphan_grace.map_or(0, |g| g.as_secs().max(1)),
        };
        if let Some(g) = orphan_grace {
            let _ = self.fence_after.set(g.max(NODE_DOWN_AFTER));
        }
        self.store.claim(shown_db, &info).await?;
        let _ = self.cluster_secret.set(self.store.cluster_secret().await?);
        self.nodes().await?;
        Ok(())
    }

    /// The secret nodes mark the calls they pass to each other with (shared through
    /// the database); `None` before this node registered.
    pub fn cluster_secret(&self) -> Option<&str> {
        self.cluster_secret.get().map(String::as_str)
    }

    /// Whether `given` is the cluster secret (compared in constant time).
    pub fn is_cluster_secret(&self, given: &[u8]) -> bool {
        self.cluster_secret().is_some_and(|s| {
            s.len() == given.len()
                && s.bytes().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
    }

    async fn template_names(&self) -> Vec<String> {
        self.host_stores()
            .templates()
            .await
            .into_iter()
            .map(|t| t.name)
            .collect()
    }

    /// Stops (or resumes) placing new sandboxes on node `name`; what runs there keeps
    /// running.
    pub async fn drain_node(&self, name: &str, draining: bool) -> Result<(), CoreError> {
        if self.store.set_draining(name, draining).await? {
            Ok(())
        } else {
            Err(CoreError::Invalid(format!("no node named {name}")))
        }
    }

    /// Where a new sandbox of `template` on `runtime` (`None`: the default) with a
    /// memory limit of `memory_mb` (`None`: the default) is best made: among the nodes
    /// that are up, not draining, offer the runtime and have the template, the one
    /// with the most memory left after the limits of the sandboxes it runs and of the
    /// creates placed on it in flight, then the fewest of those, then this node (no
    /// hop). The choice is reserved in the database until the sandbox is recorded
    /// ([`Manager::release_placement`] with the token) or [`PLACEMENT_TTL`], so
    /// simultaneous creates on different nodes spread as if made one after another.
    /// `Here` without a token when no other node is up.
    pub async fn place(
        &self,
        template: &str,
        runtime: Option<&str>,
        memory_mb: Option<u64>,
    ) -> Result<Placement, CoreError> {
        let here = Placement {
            owner: Owner::Here,
            token: None,
        };
        if !self.peers.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(here);
        }
        let runtime = runtime
            .map(str::to_owned)
            .or_else(|| self.config.default_runtime.clone())
            .unwrap_or_else(|| self.runtime.name().to_owned());
        let memory_mb = memory_mb.unwrap_or(self.config.default_memory_mb);
        // A request create will refuse is refused where it came in, unreserved.
        if memory_mb < self.config.min_memory_mb || memory_mb > self.config.max_memory_mb {
            return Ok(here);
        }
        let nodes = self.nodes().await?;
        let me = self.store.node().to_owned();
        let eligible: Vec<&Node> = nodes
            .iter()
            .filter(|n| {
                n.up && !n.record.draining
                    && n.record.runtimes.contains(&runtime)
                    && n.record.templates.iter().any(|t| t == template)
            })
            .collect();
        if eligible.is_empty() {
            return Ok(here);
        }
        let reserved = self
            .store
            .reserve_placement(memory_mb, PLACEMENT_TTL, |loads| {
                eligible
                    .iter()
                    .max_by_key(|n| {
                        let load = loads.get(&n.record.name).copied().unwrap_or_default();
                        (
                            n.record.memory_mb as i64 - load.reserved_mb as i64,
                            std::cmp::Reverse(load.sandboxes),
                            n.record.name == me,
                        )
                    })
                    .map(|n| n.record.name.clone())
            })
            .await?;
        let Some((token, node)) = reserved else {
            return Ok(here);
        };
        let owner = match eligible.iter().find(|n| n.record.name == node) {
            Some(n) if node != me => Owner::Elsewhere {
                node,
                url: n.record.url.clone(),
                up: true,
            },
            _ => Owner::Here,
        };
        Ok(Placement {
            owner,
            token: Some(token),
        })
    }

    /// Ends a placement's reservation: its sandbox is recorded (and counts by
    /// itself), or was not made. A failure only leaves it to expire.
    pub async fn release_placement(&self, token: &str) {
        if let Err(e) = self.store.release_placement(token).await {
            tracing::warn!(token, error = %e, "releasing a placement failed; it expires");
        }
    }

    /// Where a sandbox made from `snapshot` or mounting `volumes` must be made: the
    /// node that holds them. Volumes on different nodes cannot be mounted together.
    pub async fn home_of(
        &self,
        snapshot: Option<&str>,
        volumes: &[&str],
    ) -> Result<Owner, CoreError> {
        if volumes.len() > crate::volumes::MAX_MOUNTS {
            // Refused by create itself, without a lookup per id.
            return Ok(Owner::Here);
        }
        let snapshot = snapshot.filter(|s| crate::ids::is_valid("snap", s));
        let volumes = volumes.iter().filter(|v| crate::ids::is_valid("vol", v));
        let mut home: Option<(String, Owner)> = None;
        for id in snapshot.into_iter().chain(volumes.copied()) {
            let owner = self.owner(id).await?;
            let node = match &owner {
                Owner::Here => self.store.node().to_owned(),
                Owner::Elsewhere { node, .. } => node.clone(),
            };
            match &home {
                Some((n, _)) if *n != node => {
                    return Err(CoreError::Invalid(format!(
                        "{id} is on node {node}, not on node {n} with the others: a \
                         sandbox is made where its snapshot and volumes are"
                    )))
                }
                Some(_) => {}
                None => home = Some((node, owner)),
            }
        }
        Ok(home.map_or(Owner::Here, |(_, o)| o))
    }

    /// Says this node is alive every [`HEARTBEAT_EVERY`] until the manager is gone,
    /// and notes whether other nodes are up.
    pub fn spawn_heartbeat(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            let mut last_ok = std::time::Instant::now();
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { break };
                let templates = me.template_names().await;
                match me.store.heartbeat(me.live_count() as u64, &templates).await {
                    Ok(()) => {
                        last_ok = std::time::Instant::now();
                        me.settle_fenced().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "heartbeat failed");
                        if me.fence_after.get().is_some_and(|g| last_ok.elapsed() > *g) {
                            me.fence().await;
                        }
                    }
                }
                match me.nodes().await {
                    Ok(nodes) => me.lose_gone_nodes(&nodes).await,
                    Err(e) => tracing::warn!(error = %e, "reading the nodes failed"),
                }
                if me.peers.load(std::sync::atomic::Ordering::Relaxed) {
                    me.sync_templates().await;
                }
            }
        })
    }

    /// Ends every sandbox this node runs without a word to the database: it has not
    /// heartbeated for longer than its orphan grace, so the other nodes may have
    /// recorded them lost already, and two copies of the truth must not run on. Their
    /// records are written once the database answers again ([`Manager::settle_fenced`]).
    pub async fn fence(&self) {
        let all: Vec<(String, Arc<Live>)> = self.live_map().drain().collect();
        if all.is_empty() {
            return;
        }
        tracing::error!(
            sandboxes = all.len(),
            "no heartbeat for longer than the orphan grace: ending this node's sandboxes"
        );
        for (id, live) in all {
            if let Err(e) = live.instance.destroy().await {
                tracing::warn!(sandbox = %id, error = %e, "fencing: destroy failed");
            }
            lock(&self.fenced).push(id);
        }
    }

    /// Writes the records of sandboxes [`Manager::fence`] ended (lost), now that the
    /// database answers.
    pub async fn settle_fenced(&self) {
        let ids: Vec<String> = std::mem::take(&mut *lock(&self.fenced));
        for id in ids {
            let reason = "lost: node fenced itself (no heartbeat for longer than its orphan grace)";
            match self
                .store
                .end_sandbox(&id, Status::Lost, reason, OffsetDateTime::now_utc())
                .await
            {
                Ok(()) => self.events.emit(
                    &id,
                    Lifecycle::Lost,
                    serde_json::json!({ "reason": reason }),
                ),
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "recording a fenced sandbox failed");
                    lock(&self.fenced).push(id);
                }
            }
        }
    }

    /// Records as lost the sandboxes of every other node gone for longer than its
    /// orphan grace: they have ended themselves by now (their agents' dead-man's
    /// switch), and nothing will adopt them.
    pub async fn lose_gone_nodes(&self, nodes: &[Node]) {
        let now = OffsetDateTime::now_utc();
        for n in nodes.iter().filter(|n| !n.up && !n.this) {
            let grace = n.record.orphan_grace_s;
            let gone = now - n.record.heartbeat_at;
            if grace == 0 || gone <= Duration::from_secs(grace).max(NODE_DOWN_AFTER) {
                continue;
            }
            let reason = format!(
                "node {} gone for longer than its orphan grace ({grace} s)",
                n.record.name
            );
            match self
                .store
                .lose_node_sandboxes(&n.record.name, &reason)
                .await
            {
                Ok(0) => {}
                Ok(count) => {
                    tracing::warn!(node = %n.record.name, count, "a gone node's sandboxes recorded lost")
                }
                Err(e) => {
                    tracing::warn!(node = %n.record.name, error = %e, "recording a gone node's sandboxes lost failed")
                }
            }
        }
    }

    /// Every node of the database, with whether it is up (and notes whether other
    /// nodes are).
    pub async fn nodes(&self) -> Result<Vec<Node>, CoreError> {
        let now = OffsetDateTime::now_utc();
        let nodes: Vec<Node> = self
            .store
            .nodes()
            .await?
            .into_iter()
            .map(|record| Node {
                up: (now - record.heartbeat_at) <= NODE_DOWN_AFTER,
                this: record.name == self.store.node(),
                record,
            })
            .collect();
        let peers = nodes.iter().any(|n| n.up && !n.this);
        self.peers
            .store(peers, std::sync::atomic::Ordering::Relaxed);
        *lock(&self.node_cache) = nodes.clone();
        Ok(nodes)
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
        // The node list as the last heartbeat read it (a node that died since refuses
        // the connection: the caller answers 502 at once); read now if never read.
        let cached = lock(&self.node_cache)
            .iter()
            .find(|n| n.record.name == node)
            .map(|n| (n.record.url.clone(), n.up));
        let found = match cached {
            Some(c) => Some(c),
            None => self
                .nodes()
                .await?
                .into_iter()
                .find(|n| n.record.name == node)
                .map(|n| (n.record.url, n.up)),
        };
        Ok(match found {
            Some((url, up)) => Owner::Elsewhere { node, url, up },
            None => Owner::Elsewhere {
                node,
                url: String::new(),
                up: false,
            },
        })
    }
}
