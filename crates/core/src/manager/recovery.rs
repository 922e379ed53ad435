//! Keeping the server's picture true: the reaper (time to live, idle timeout, lost
//! agents), recovery of sandboxes after a restart, and shutdown.

use super::*;

impl Manager {
    /// Ends sandboxes whose time is up or whose agent died, every `every`. Runs until
    /// the manager is dropped.
    pub fn spawn_reaper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { break };
                me.reap_once().await;
                me.trim_pools().await;
            }
        })
    }

    /// One pass of the reaper.
    pub async fn reap_once(&self) {
        let now = OffsetDateTime::now_utc();
        let due: Vec<(String, Arc<Live>, Status, &'static str)> = self
            .live_map()
            .values()
            .filter_map(|l| {
                let r = l.record();
                let idle = r.status == Status::Running
                    && r.idle_timeout.is_some_and(|t| {
                        l.activity
                            .idle_for()
                            .is_some_and(|d| d >= Duration::from_secs(t))
                    });
                let reason = if r.expires_at <= now {
                    "timeout expired"
                } else {
                    "idle timeout"
                };
                if (r.expires_at <= now || idle) && r.on_timeout == OnTimeout::Hibernate {
                    Some((r.id, l.clone(), Status::Hibernated, reason))
                } else if r.expires_at <= now || idle {
                    Some((r.id, l.clone(), Status::Killed, reason))
                } else if !l.instance.is_alive() && l.op.try_lock().is_ok() {
                    // (With a lifecycle operation in progress — hibernate stops the
                    // processes on purpose — that operation decides what it becomes.)
                    Some((r.id, l.clone(), Status::Failed, "agent exited"))
                } else {
                    None
                }
            })
            .collect();
        for (id, seen, status, reason) in due {
            if reason == "timeout expired" {
                self.events
                    .emit(&id, Lifecycle::Timeout, serde_json::Value::Null);
            }
            if reason == "idle timeout" {
                self.events
                    .emit(&id, Lifecycle::IdleTimeout, serde_json::Value::Null);
            }
            if status == Status::Hibernated {
                if let Err(e) = self.hibernate(&SandboxRef::internal(&id)).await {
                    tracing::warn!(sandbox = %id, error = %e, "hibernating an expired sandbox failed; killing it");
                    let _ = self.end(&id, Status::Killed, reason).await;
                }
                continue;
            }
            if let Err(e) = self.end_as(&id, Some(&seen), status, reason).await {
                tracing::warn!(sandbox = %id, error = %e, "ending sandbox failed");
            }
        }
    }

    /// Takes over the sandboxes an earlier server left running or paused: each one whose
    /// agent still answers is adopted as it is (processes, REPL state, pause); the others
    /// have their leftovers freed and are marked `lost` with the reason — never silently
    /// forgotten. Returns (adopted, lost).
    pub async fn recover(&self) -> Result<(usize, usize), CoreError> {
        let mut stale = self.store.sandboxes_with_status(Status::Running).await?;
        stale.extend(self.store.sandboxes_with_status(Status::Paused).await?);
        let (mut adopted, mut lost) = (0, 0);
        for s in stale {
            if self.live(&s.id).is_some() {
                continue;
            }
            let spec = self.spec_of(&s);
            let outcome = match s.host_pid {
                Some(pid) => {
                    self.runtime_of(&s)
                        .adopt(&spec, pid, s.status == Status::Paused)
                        .await
                }
                None => Err(crate::RuntimeError::Unavailable(
                    "no process recorded".into(),
                )),
            };
            match outcome {
                Ok(instance) => {
                    tracing::info!(sandbox = %s.id, status = %s.status, "adopted a sandbox of an earlier server");
                    self.events
                        .emit(&s.id, Lifecycle::Adopted, serde_json::Value::Null);
                    self.live_map()
                        .insert(s.id.clone(), Live::new(s, instance, spec));
                    adopted += 1;
                    self.metrics.adopted.inc();
                }
                Err(e) => {
                    let reason =
                        format!("lost: its processes did not survive the server restart ({e})");
                    tracing::warn!(sandbox = %s.id, %reason, "marking a sandbox lost");
                    if let Err(e) = self.runtime_of(&s).cleanup(&s.resource_id).await {
                        tracing::error!(sandbox = %s.id, error = %e, "cleaning up after an earlier server");
                    }
                    self.store
                        .end_sandbox(&s.id, Status::Lost, &reason, OffsetDateTime::now_utc())
                        .await?;
                    self.events.emit(
                        &s.id,
                        Lifecycle::Lost,
                        serde_json::json!({ "reason": reason }),
                    );
                    lost += 1;
                    self.metrics.lost.inc();
                }
            }
        }
        // Then the leftovers: ended sandboxes' resources a crash kept, hollow fork
        // ancestors (taken back while descendants live), interrupted forks' staging.
        let mut keep = std::collections::HashSet::new();
        for st in [Status::Running, Status::Paused, Status::Hibernated] {
            for s in self.store.sandboxes_with_status(st).await? {
                keep.insert(s.resource_id);
            }
        }
        let candidates = self.store.ended_resource_ids().await?;
        for rt in &self.runtimes {
            match rt.collect_garbage(&keep, candidates.clone()).await {
                Ok(r) if r != Default::default() => {
                    self.metrics.gc_freed.inc_by((r.freed + r.staging) as u64);
                    self.metrics.gc_kept.inc_by(r.kept as u64);
                    tracing::info!(
                        runtime = rt.name(),
                        freed = r.freed,
                        kept_hollow = r.kept,
                        staging = r.staging,
                        "garbage collected"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(runtime = rt.name(), error = %e, "garbage collection failed")
                }
            }
        }
        Ok((adopted, lost))
    }

    /// Stops background work and waits for it (at most `within`): refills stop,
    /// builds, deletions and releases in flight finish. Returns whether all did.
    pub async fn drain(&self, within: Duration) -> bool {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.tasks.close();
        let done = tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                pending = self.tasks.len(),
                "background work still running at shutdown"
            );
        }
        done
    }

    /// Destroys every live sandbox after background work ended (server shutdown in
    /// tests and benchmarks, or `--on-exit destroy`).
    pub async fn shutdown(&self) {
        self.drain(Duration::from_secs(30)).await;
        let ids: Vec<String> = self.live_map().keys().cloned().collect();
        for id in ids {
            let _ = self.end(&id, Status::Deleted, "server shut down").await;
        }
    }
}
