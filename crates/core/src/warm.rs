//! The warm pool of create: ready sandboxes of a template kept in a workspace no key
//! can name, so that a plain create is a hand-over (the record changes owner, nothing
//! starts). Pool sandboxes hold nothing of anyone until handed over; requests that
//! need a sandbox made differently (limits, environment, egress, volumes, snapshot)
//! are made cold as before.

use crate::manager::Manager;
use crate::model::{CreateRequest, Sandbox, Status};
use crate::runner::{PoolKey, WarmPool};
use crate::trace::TraceParent;
use crate::CoreError;
use std::sync::Arc;
use std::time::Instant;
use time::OffsetDateTime;

/// Workspace of create's pool sandboxes (`@` is not allowed in workspace names).
pub const POOL_WORKSPACE: &str = "@pool";

fn key(template: &str) -> PoolKey {
    PoolKey {
        workspace: POOL_WORKSPACE,
        template: template.to_owned(),
    }
}

impl Manager {
    /// Keeps `n` ready sandboxes of `template` for create (0 stops).
    pub fn keep_create_pool(self: &Arc<Self>, template: &str, n: usize) {
        self.keep_ready(key(template), n);
    }

    /// Create's warm pools and their fill.
    pub fn create_pools(&self) -> Vec<WarmPool> {
        self.pools_of(POOL_WORKSPACE)
    }

    /// Whether a pool sandbox is what `req` asks for: everything left to the server's
    /// defaults (the runtime too) except template, timeout, metadata and the timeout
    /// action.
    fn poolable(&self, req: &CreateRequest) -> Option<String> {
        let c = self.config();
        let fits = req.snapshot.is_none()
            && req.env.is_empty()
            && req.egress.as_ref().is_none_or(Vec::is_empty)
            && req.volumes.is_empty()
            && req.cpu.is_none_or(|v| v == c.default_cpu)
            && req.memory_mb.is_none_or(|v| v == c.default_memory_mb)
            && req.disk_mb.is_none_or(|v| v == c.default_disk_mb)
            && !req.workspace.starts_with('@')
            // Pool sandboxes are made in the default runtime.
            && req.runtime.as_deref().is_none_or(|r| {
                r == c.default_runtime.as_deref().unwrap_or(self.runtime_name())
            });
        fits.then(|| {
            req.template
                .clone()
                .unwrap_or_else(|| c.default_template.clone())
        })
    }

    /// Hands a pool sandbox over to `req`'s workspace, or `None` when the request is
    /// not poolable or the pool is empty (the caller makes one cold).
    pub(crate) async fn from_pool(
        self: &Arc<Self>,
        req: &CreateRequest,
        workspace: &str,
        trace: Option<&TraceParent>,
    ) -> Result<Option<Sandbox>, CoreError> {
        let Some(template) = self.poolable(req) else {
            return Ok(None);
        };
        let started = Instant::now();
        let key = key(&template);
        // Checks the request like a cold create would (timeout, names).
        let (_, _, memory_mb, timeout) = self.spec("", req)?;
        let _admitted = self.admit(workspace, 1, memory_mb).await?;
        while let Some(id) = self.take_ready(&key) {
            let now = OffsetDateTime::now_utc();
            let handed = self
                .claim(&id, |r| {
                    r.workspace = workspace.to_owned();
                    r.metadata = req.metadata.clone();
                    r.on_timeout = req.on_timeout;
                    r.idle_timeout = req.idle_timeout;
                    r.traceparent = trace.map(TraceParent::header);
                    r.timeout = timeout;
                    r.created_at = now;
                    r.expires_at = now + time::Duration::seconds(timeout as i64);
                    r.boot_ms = (started.elapsed().as_secs_f64() * 1e5).round() / 100.0;
                })
                .await?;
            let Some(record) = handed else {
                continue; // ended while pooled
            };
            tracing::info!(sandbox = %record.id, boot_ms = record.boot_ms, "sandbox handed over from the warm pool");
            self.metrics().handed_over.inc();
            self.created(&record, None, started);
            return Ok(Some(record));
        }
        Ok(None)
    }

    /// Deletes the pool sandboxes (of create and of the runner) an earlier server left:
    /// nobody holds their ids any more.
    pub async fn discard_stale_pool_sandboxes(&self) -> usize {
        let mut n = 0;
        for id in self.live_ids_in(&[POOL_WORKSPACE, crate::runner::RUNNER_WORKSPACE]) {
            match self.delete(&crate::access::SandboxRef::internal(&id)).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "discarding a stale pool sandbox")
                }
            }
        }
        n
    }
}

/// Whether a record is a running sandbox that can be handed over.
pub(crate) fn can_hand_over(r: &Sandbox) -> bool {
    r.status == Status::Running && r.workspace == POOL_WORKSPACE
}
