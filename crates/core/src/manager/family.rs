//! Fork and merge: children made copy-on-write from a running parent, and a
//! descendant's state committed back into an ancestor.

use super::*;

impl Manager {
    /// Forks a running sandbox into `n` children that start from its current state.
    /// Waits for a running REPL cell and other lifecycle calls on the sandbox first.
    /// Each child's metadata is the parent's with `metadata`'s keys added or replaced.
    pub async fn fork(
        &self,
        id: &SandboxRef,
        n: u32,
        metadata: &BTreeMap<String, String>,
    ) -> Result<ForkOutcome, CoreError> {
        let id = id.id();
        if !(1..=MAX_FORK).contains(&n) {
            return Err(CoreError::Invalid(format!(
                "n must be between 1 and {MAX_FORK}"
            )));
        }
        let live = self.running(id).await?;
        let _op = live.op.lock().await;
        let parent = live.record();
        if parent.status != Status::Running || self.live(id).is_none() {
            return Err(CoreError::WrongState {
                id: id.to_owned(),
                status: parent.status,
            });
        }
        let _admitted = self
            .admit(&parent.workspace, u64::from(n), parent.memory_mb)
            .await?;
        let started = Instant::now();
        let specs: Vec<CreateSpec> = (0..n)
            .map(|_| CreateSpec {
                id: ids::new("sbx"),
                snapshot: None,
                ..live.spec.clone()
            })
            .collect();
        // The runtime's phases (`fork.*` spans) are children of this operation's span.
        let forked = live
            .instance
            .fork(specs.clone())
            .instrument(self.span_of(id, "fork"))
            .await?;
        let boot_ms = (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
        let created_at = OffsetDateTime::now_utc();
        let mut child_metadata = parent.metadata.clone();
        child_metadata.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        let pairs: Vec<(CreateSpec, Arc<dyn Instance>)> =
            specs.into_iter().zip(forked.children).collect();
        let children: Vec<Sandbox> = pairs
            .iter()
            .map(|(spec, instance)| Sandbox {
                id: spec.id.clone(),
                status: Status::Running,
                created_at,
                expires_at: created_at + time::Duration::seconds(parent.timeout as i64),
                ended_at: None,
                end_reason: None,
                boot_ms,
                parent: Some(id.to_owned()),
                host_pid: instance.host_pid(),
                resource_id: spec.id.clone(),
                metadata: child_metadata.clone(),
                ..parent.clone()
            })
            .collect();
        if let Err(e) = self.store.insert_sandboxes(&children).await {
            for (_, i) in pairs {
                let _ = i.destroy().await;
            }
            return Err(e.into());
        }
        {
            let mut map = self.live_map();
            for ((spec, instance), record) in pairs.into_iter().zip(&children) {
                map.insert(record.id.clone(), Live::new(record.clone(), instance, spec));
            }
        }
        self.span_of(id, "fork").in_scope(
            || tracing::info!(n, ms = boot_ms, carried = ?forked.carried, "sandbox forked"),
        );
        self.metrics.forks.inc();
        self.metrics.fork_children.inc_by(u64::from(n));
        self.metrics.created.inc_by(u64::from(n));
        self.metrics
            .fork_seconds
            .observe(started.elapsed().as_secs_f64());
        let ids: Vec<&str> = children.iter().map(|c| c.id.as_str()).collect();
        self.events.emit(
            id,
            Lifecycle::Forked,
            serde_json::json!({"children": ids, "carried": forked.carried, "ms": boot_ms}),
        );
        for c in &children {
            self.events.emit(
                &c.id,
                Lifecycle::Created,
                serde_json::json!({"parent": id, "carried": forked.carried}),
            );
        }
        Ok(ForkOutcome {
            children,
            carried: forked.carried,
            not_carried: forked.not_carried,
        })
    }

    /// Makes `child`'s state (filesystem and REPL) `parent`'s: the parent id now refers
    /// to the child's sandbox, the child id is consumed (410 afterwards), siblings are
    /// untouched. Merges into one parent run one at a time.
    /// Whether `child` is a fork descendant of `ancestor` (any depth).
    async fn descends(&self, child: &str, ancestor: &str) -> bool {
        let mut up = self.any_record_in(child).await.ok().and_then(|r| r.parent);
        for _ in 0..64 {
            match up {
                Some(p) if p == ancestor => return true,
                Some(p) => up = self.any_record_in(&p).await.ok().and_then(|r| r.parent),
                None => return false,
            }
        }
        false
    }

    /// Commits fork descendant `child`'s state as `parent`'s
    /// (`POST /v1/sandboxes/{parent}/merge_into/{child}`).
    pub async fn merge_into(
        &self,
        child: &SandboxRef,
        parent: &SandboxRef,
    ) -> Result<Sandbox, CoreError> {
        let (child, parent) = (child.id(), parent.id());
        if child == parent {
            return Err(CoreError::Conflict(format!(
                "{child} cannot be merged into itself"
            )));
        }
        // Both must exist and be live (404 / 410 otherwise).
        self.get_in(child).await?;
        self.get_in(parent).await?;
        let descends = self.descends(child, parent).await;
        if !descends {
            // The other way round is the usual slip (the order is the seed's: the
            // ancestor first, `/{id}/merge_into/{winner}`).
            let hint = match self.get_in(parent).await.map(|p| p.parent) {
                Ok(Some(_)) if self.descends(parent, child).await => {
                    format!(" (it is the other way round: POST /v1/sandboxes/{child}/merge_into/{parent} merges {parent} into {child})")
                }
                _ => String::new(),
            };
            return Err(CoreError::Conflict(format!(
                "{child} does not descend from {parent}; only a fork descendant can be merged into its ancestor{hint}"
            )));
        }
        // A merge swaps the parent's entry: whoever waited on the old one looks again.
        let mut attempts = 0;
        let (p_live, c_live, _p_op, _c_op) = loop {
            attempts += 1;
            let p_live = self.running(parent).await?;
            let c_live = self.running(child).await?;
            // Ancestor first, always: no lock-order cycles between merges.
            let p_op = p_live.op.clone().lock_owned().await;
            let c_op = c_live.op.clone().lock_owned().await;
            let current =
                |id: &str, l: &Arc<Live>| self.live(id).is_some_and(|now| Arc::ptr_eq(&now, l));
            if current(parent, &p_live) && current(child, &c_live) {
                break (p_live, c_live, p_op, c_op);
            }
            if attempts >= 8 {
                return Err(CoreError::Conflict(
                    "the sandboxes kept changing during the merge; retry".into(),
                ));
            }
        };
        let c_rec = c_live.record();
        let now = OffsetDateTime::now_utc();
        self.store.merge(&c_rec, parent, now).await?;
        let merged = p_live.update(|r| {
            r.resource_id = c_rec.resource_id.clone();
            r.host_pid = c_rec.host_pid;
            r.status = c_rec.status;
        });
        {
            let mut map = self.live_map();
            map.remove(child);
            map.insert(
                parent.to_owned(),
                Live::new(merged.clone(), c_live.instance.clone(), c_live.spec.clone()),
            );
            for l in map.values() {
                if l.record().parent.as_deref() == Some(child) {
                    l.update(|r| r.parent = Some(parent.to_owned()));
                }
            }
        }
        // The old state of the parent goes (kept hollow by the runtime while fork
        // descendants, like the merged child, still hang off it), off the request path.
        let old = p_live.instance.clone();
        let pid = parent.to_owned();
        self.background(async move {
            if let Err(e) = old.destroy().await {
                tracing::warn!(sandbox = %pid, error = %e, "releasing the state replaced by a merge");
            }
        });
        self.span_of(parent, "merge")
            .in_scope(|| tracing::info!(child, "merged"));
        self.metrics.merges.inc();
        self.events.emit(
            parent,
            Lifecycle::Merged,
            serde_json::json!({"from": child}),
        );
        self.events.emit(
            child,
            Lifecycle::Merged,
            serde_json::json!({"into": parent}),
        );
        Ok(merged)
    }
}
