//! The sandbox lifecycle: validating and admitting a create, making it, its time to
//! live and expiry policy, pause/resume, hibernate/wake, and ending it (delete, kill,
//! failure) with its record and events.

use super::*;

impl Manager {
    /// Checks a create request against the server's limits and fills in defaults.
    pub(crate) fn spec(
        &self,
        id: &str,
        req: &CreateRequest,
    ) -> Result<(CreateSpec, f64, u64, u64), CoreError> {
        let c = &self.config;
        let template = req
            .template
            .clone()
            .unwrap_or_else(|| c.default_template.clone());
        if !valid_template_name(&template) {
            return Err(CoreError::Invalid(
                "template must be 1-64 characters of a-z, 0-9, '-' and '_'".into(),
            ));
        }
        let cpu = req.cpu.unwrap_or(c.default_cpu);
        if !(cpu.is_finite() && cpu >= 0.1 && cpu <= c.max_cpu) {
            return Err(CoreError::Invalid(format!(
                "cpu must be between 0.1 and {}",
                c.max_cpu
            )));
        }
        let memory_mb = req.memory_mb.unwrap_or(c.default_memory_mb);
        if memory_mb < c.min_memory_mb || memory_mb > c.max_memory_mb {
            return Err(CoreError::Invalid(format!(
                "memory_mb must be between {} and {}",
                c.min_memory_mb, c.max_memory_mb
            )));
        }
        let disk_mb = req.disk_mb.unwrap_or(c.default_disk_mb);
        if disk_mb < 16 || disk_mb > c.max_disk_mb {
            return Err(CoreError::Invalid(format!(
                "disk_mb must be between 16 and {}",
                c.max_disk_mb
            )));
        }
        let timeout = req.timeout.unwrap_or(c.default_timeout_s);
        if timeout == 0 || timeout > c.max_timeout_s {
            return Err(CoreError::Invalid(format!(
                "timeout must be between 1 and {} seconds",
                c.max_timeout_s
            )));
        }
        if req
            .idle_timeout
            .is_some_and(|t| t == 0 || t > c.max_timeout_s)
        {
            return Err(CoreError::Invalid(format!(
                "idle_timeout must be between 1 and {} seconds",
                c.max_timeout_s
            )));
        }
        check_env(&req.env)?;
        let egress = match &req.egress {
            Some(list) if !list.is_empty() => {
                forkbox_types::egress::Allowlist::parse(list)
                    .map_err(|e| CoreError::Invalid(e.to_string()))?;
                Some(list.clone())
            }
            _ => None,
        };
        crate::volumes::check_mounts(&req.volumes)?;
        let mut env = req.env.clone();
        if egress.is_some() {
            forkbox_types::egress::proxy_env(&mut env);
        }
        Ok((
            CreateSpec {
                id: id.to_owned(),
                template,
                cpu_millis: (cpu * 1000.0).round() as u64,
                memory_bytes: memory_mb * 1024 * 1024,
                disk_bytes: disk_mb << 20,
                pids_max: c.pids_max,
                env,
                snapshot: None,
                egress,
                volumes: req.volumes.clone(),
            },
            cpu,
            memory_mb,
            timeout,
        ))
    }

    /// What it takes to start the sandboxes of `rec` again (wake, adoption).
    pub(super) fn spec_of(&self, rec: &Sandbox) -> CreateSpec {
        CreateSpec {
            id: rec.resource_id.clone(),
            template: rec.template.clone(),
            cpu_millis: (rec.cpu * 1000.0).round() as u64,
            memory_bytes: rec.memory_mb * 1024 * 1024,
            disk_bytes: rec.disk_mb << 20,
            pids_max: self.config.pids_max,
            env: rec.env.clone(),
            snapshot: None,
            egress: rec.egress.clone(),
            volumes: rec.volumes.clone(),
        }
    }

    /// Creates a sandbox and waits until its agent answers; a request the warm pool
    /// can serve gets a pool sandbox handed over instead.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<Sandbox, CoreError> {
        let trace = req.traceparent.as_deref().and_then(TraceParent::parse);
        let workspace = if req.workspace.is_empty() {
            DEFAULT_WORKSPACE
        } else {
            req.workspace.as_str()
        };
        if let Some(s) = self.from_pool(&req, workspace, trace.as_ref()).await? {
            return Ok(s);
        }
        let id = ids::new("sbx");
        let span = op_span(trace.as_ref(), "create", &id);
        self.create_in(id, req, trace).instrument(span).await
    }

    /// Gives running pool sandbox `id` its new owner's settings (`set`), in the
    /// database and in memory; `None` when it is no longer there to hand over.
    pub(crate) async fn claim(
        &self,
        id: &str,
        set: impl FnOnce(&mut Sandbox),
    ) -> Result<Option<Sandbox>, CoreError> {
        let Some(live) = self.live(id) else {
            return Ok(None);
        };
        let _op = live.op.lock().await;
        let mut r = live.record();
        if !crate::warm::can_hand_over(&r) {
            return Ok(None);
        }
        set(&mut r);
        if !self.store.hand_over(&r).await? {
            return Ok(None);
        }
        // Its idle clock starts with its new owner.
        live.activity.touch();
        let r2 = r.clone();
        live.update(move |x| *x = r2);
        Ok(Some(r))
    }

    /// Ids of live sandboxes in any of `workspaces`.
    pub(crate) fn live_ids_in(&self, workspaces: &[&str]) -> Vec<String> {
        self.live_map()
            .iter()
            .filter(|(_, l)| workspaces.contains(&l.record().workspace.as_str()))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Logs, counts and announces a sandbox that is ready for its owner.
    pub(crate) fn created(
        &self,
        record: &Sandbox,
        from_snapshot: Option<String>,
        started: Instant,
    ) {
        self.metrics.created.inc();
        self.metrics
            .create_seconds
            .observe(started.elapsed().as_secs_f64());
        self.events.emit(
            &record.id,
            Lifecycle::Created,
            serde_json::json!({"template": record.template, "snapshot": from_snapshot, "boot_ms": record.boot_ms}),
        );
    }

    async fn create_in(
        &self,
        id: String,
        req: CreateRequest,
        trace: Option<TraceParent>,
    ) -> Result<Sandbox, CoreError> {
        let started = Instant::now();
        let mut req = req;
        let snap = match &req.snapshot {
            Some(s) => Some(
                self.store
                    .get_snapshot(s)
                    .await?
                    .ok_or_else(|| CoreError::NoSnapshot(s.clone()))?,
            ),
            None => None,
        };
        if let Some(snap) = &snap {
            match &req.template {
                Some(t) if *t != snap.template => {
                    return Err(CoreError::Invalid(format!(
                        "snapshot {} was taken from template {}, not {t}",
                        snap.id, snap.template
                    )))
                }
                _ => req.template = Some(snap.template.clone()),
            }
            // Made again by the runtime that took it.
            match &req.runtime {
                Some(r) if *r != snap.runtime => {
                    return Err(CoreError::Invalid(format!(
                        "snapshot {} was taken by the {} runtime, not {r}",
                        snap.id, snap.runtime
                    )))
                }
                _ => req.runtime = Some(snap.runtime.clone()),
            }
        }
        let workspace = if req.workspace.is_empty() {
            DEFAULT_WORKSPACE.to_owned()
        } else {
            req.workspace.clone()
        };
        if let Some(snap) = &snap {
            if snap.workspace != workspace {
                return Err(CoreError::NoSnapshot(snap.id.clone()));
            }
            // Its files are on the node that took it.
            self.ensure_here(&snap.id).await?;
        }
        for v in &req.volumes {
            self.volume_of(&workspace, &v.id).await?;
            self.ensure_here(&v.id).await?;
        }
        let (mut spec, cpu, memory_mb, timeout) = self.spec(&id, &req)?;
        spec.snapshot = snap.map(|s| s.id);
        // A template's own environment comes under the sandbox's.
        if let Some(info) = self.host.template_info(&spec.template).await {
            for (k, v) in info.env {
                spec.env.entry(k).or_insert(v);
            }
        }
        let runtime = self.pick_runtime(req.runtime.as_deref())?;
        let _admitted = self.admit(&workspace, 1, memory_mb).await?;
        // Until its record says it mounts them, no other create decides about them.
        let _claims = match spec.volumes.is_empty() {
            true => None,
            false => Some(self.volume_claims.lock().await),
        };
        self.claim_volumes(runtime.as_ref(), &spec.volumes).await?;
        let instance = runtime.create(&spec).await?;
        let from_snapshot = spec.snapshot.clone();
        let created_at = OffsetDateTime::now_utc();
        let record = Sandbox {
            id: id.clone(),
            status: Status::Running,
            runtime: runtime.name().to_owned(),
            template: spec.template.clone(),
            cpu,
            memory_mb,
            timeout,
            metadata: req.metadata,
            created_at,
            expires_at: created_at + time::Duration::seconds(timeout as i64),
            ended_at: None,
            end_reason: None,
            boot_ms: (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0,
            parent: None,
            host_pid: instance.host_pid(),
            resource_id: id.clone(),
            env: spec.env.clone(),
            on_timeout: req.on_timeout,
            traceparent: trace.as_ref().map(TraceParent::header),
            workspace,
            egress: spec.egress.clone(),
            volumes: spec.volumes.clone(),
            disk_mb: spec.disk_bytes >> 20,
            node: Some(self.store.node().to_owned()),
            idle_timeout: req.idle_timeout,
        };
        if let Err(e) = self.store.insert_sandbox(&record).await {
            let _ = instance.destroy().await;
            return Err(e.into());
        }
        self.live_map()
            .insert(id.clone(), Live::new(record.clone(), instance, spec));
        tracing::info!(sandbox = %id, boot_ms = record.boot_ms, "sandbox created");
        // A warm-pool sandbox counts (and is announced) when it is handed over.
        if record.workspace != crate::warm::POOL_WORKSPACE {
            self.created(&record, from_snapshot, started);
        }
        Ok(record)
    }

    /// Gives a sandbox `timeout_s` more seconds of life, counted from now.
    pub async fn set_timeout(&self, id: &SandboxRef, timeout_s: u64) -> Result<Sandbox, CoreError> {
        let id = id.id();
        if timeout_s == 0 || timeout_s > self.config.max_timeout_s {
            return Err(CoreError::Invalid(format!(
                "timeout must be between 1 and {} seconds",
                self.config.max_timeout_s
            )));
        }
        let live = self.running(id).await?;
        let _op = live.op.lock().await;
        let expires_at = OffsetDateTime::now_utc() + time::Duration::seconds(timeout_s as i64);
        self.store.set_expiry(id, timeout_s, expires_at).await?;
        Ok(live.update(|r| {
            r.timeout = timeout_s;
            r.expires_at = expires_at;
        }))
    }

    /// Freezes a running sandbox (409 unless running).
    /// Changes what ends a live sandbox on its own: its idle timeout (`Some(None)`
    /// clears it) and what expiry does.
    pub async fn set_expiry_policy(
        &self,
        id: &SandboxRef,
        idle_timeout: Option<Option<u64>>,
        on_timeout: Option<OnTimeout>,
    ) -> Result<Sandbox, CoreError> {
        let id = id.id();
        if idle_timeout
            .flatten()
            .is_some_and(|t| t == 0 || t > self.config.max_timeout_s)
        {
            return Err(CoreError::Invalid(format!(
                "idle_timeout must be between 1 and {} seconds",
                self.config.max_timeout_s
            )));
        }
        let live = self.running(id).await?;
        let _op = live.op.lock().await;
        let mut r = live.record();
        if let Some(t) = idle_timeout {
            r.idle_timeout = t;
        }
        if let Some(o) = on_timeout {
            r.on_timeout = o;
        }
        self.store
            .set_expiry_policy(id, r.idle_timeout, r.on_timeout)
            .await?;
        let r2 = r.clone();
        live.update(move |x| *x = r2);
        Ok(r)
    }

    pub async fn pause(&self, id: &SandboxRef) -> Result<Sandbox, CoreError> {
        let id = id.id();
        self.transition(id, Status::Running, Status::Paused).await
    }

    /// Thaws a paused sandbox (409 unless paused).
    pub async fn resume(&self, id: &SandboxRef) -> Result<Sandbox, CoreError> {
        let id = id.id();
        self.transition(id, Status::Paused, Status::Running).await
    }

    async fn transition(&self, id: &str, from: Status, to: Status) -> Result<Sandbox, CoreError> {
        let live = self.running(id).await?;
        let _op = live.op.lock().await;
        let status = live.record().status;
        if status != from {
            return Err(CoreError::WrongState {
                id: id.to_owned(),
                status,
            });
        }
        match to {
            Status::Paused => live.instance.pause().await?,
            _ => live.instance.resume().await?,
        }
        self.store.set_status(id, to).await?;
        tracing::info!(sandbox = %id, status = %to, "sandbox state changed");
        self.events.emit(
            id,
            if to == Status::Paused {
                Lifecycle::Paused
            } else {
                Lifecycle::Resumed
            },
            serde_json::Value::Null,
        );
        Ok(live.update(|r| r.status = to))
    }

    /// Stops a running or paused sandbox's processes and frees its memory, keeping its
    /// filesystem; `wake` starts it again. Its time to live stops counting meanwhile.
    pub async fn hibernate(&self, id: &SandboxRef) -> Result<Sandbox, CoreError> {
        let id = id.id();
        let live = self.running(id).await?;
        let _op = live.op.lock().await;
        if self.live(id).is_none_or(|now| !Arc::ptr_eq(&now, &live)) {
            return Err(CoreError::Conflict(format!(
                "{id} changed meanwhile; retry"
            )));
        }
        live.instance.hibernate().await?;
        self.live_map().remove(id);
        self.store.set_status(id, Status::Hibernated).await?;
        tracing::info!(sandbox = %id, "sandbox hibernated");
        self.events
            .emit(id, Lifecycle::Hibernated, serde_json::Value::Null);
        Ok(live.update(|r| {
            r.status = Status::Hibernated;
            r.host_pid = None;
        }))
    }

    /// Starts a hibernated sandbox again on its kept filesystem. In the jail runtime
    /// its memory (REPL state, running processes) was not kept.
    pub async fn wake(&self, id: &SandboxRef) -> Result<Sandbox, CoreError> {
        let id = id.id();
        let rec = self.get_in(id).await?;
        self.ensure_here(id).await?;
        if rec.status != Status::Hibernated {
            return Err(CoreError::WrongState {
                id: id.to_owned(),
                status: rec.status,
            });
        }
        {
            let mut w = match self.waking.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if !w.insert(id.to_owned()) {
                return Err(CoreError::Conflict(format!("{id} is already waking")));
            }
        }
        let out = self.wake_inner(rec).await;
        match self.waking.lock() {
            Ok(mut g) => g.remove(id),
            Err(p) => p.into_inner().remove(id),
        };
        out
    }

    async fn wake_inner(&self, rec: Sandbox) -> Result<Sandbox, CoreError> {
        // A hibernated sandbox already counts as one; waking it adds only its memory.
        let _admitted = self.admit_memory(&rec.workspace, rec.memory_mb).await?;
        let spec = self.spec_of(&rec);
        let runtime = self.runtime_of(&rec);
        let instance = runtime.wake(&spec).await?;
        let expires_at = OffsetDateTime::now_utc() + time::Duration::seconds(rec.timeout as i64);
        if let Err(e) = self
            .store
            .set_woken(&rec.id, instance.host_pid(), expires_at)
            .await
        {
            let _ = instance.hibernate().await;
            return Err(e.into());
        }
        let record = Sandbox {
            status: Status::Running,
            host_pid: instance.host_pid(),
            expires_at,
            ..rec
        };
        self.live_map()
            .insert(record.id.clone(), Live::new(record.clone(), instance, spec));
        tracing::info!(sandbox = %record.id, "sandbox woken");
        self.events.emit(
            &record.id,
            Lifecycle::Woken,
            serde_json::json!({"memory_restored": runtime.capabilities().hibernate_keeps_memory}),
        );
        Ok(record)
    }

    /// Destroys a sandbox; its record stays, marked `deleted`.
    pub async fn delete(&self, id: &SandboxRef) -> Result<(), CoreError> {
        let id = id.id();
        self.end(id, Status::Deleted, "deleted by client").await
    }

    pub(super) async fn end(
        &self,
        id: &str,
        status: Status,
        reason: &str,
    ) -> Result<(), CoreError> {
        self.end_as(id, None, status, reason).await
    }

    /// [`Manager::end`]; with `seen`, only if the sandbox is still that live entry
    /// (the reaper judged that one: if it was hibernated or merged meanwhile, the
    /// verdict no longer applies and nothing happens).
    pub(super) async fn end_as(
        &self,
        id: &str,
        seen: Option<&Arc<Live>>,
        status: Status,
        reason: &str,
    ) -> Result<(), CoreError> {
        let live = {
            let mut map = self.live_map();
            match (seen, map.get(id)) {
                (Some(s), Some(now)) if !Arc::ptr_eq(s, now) => return Ok(()),
                (Some(_), None) => return Ok(()),
                _ => map.remove(id),
            }
        };
        let Some(live) = live else {
            // Not ours: unknown, already ended, hibernated, left running by an
            // earlier server, or another node's.
            let s = self.get_in(id).await?;
            self.ensure_here(id).await?;
            if s.status == Status::Hibernated && self.waking_now(id) {
                return Err(CoreError::Conflict(format!("{id} is waking; retry")));
            }
            if s.status == Status::Hibernated {
                self.runtime_of(&s).cleanup(&s.resource_id).await?;
                return self.record_end(id, status, reason).await;
            }
            if matches!(s.status, Status::Running | Status::Paused) {
                // Someone else is ending it right now.
                return Err(CoreError::Ending(id.to_owned()));
            }
            return Err(CoreError::WrongState {
                id: id.to_owned(),
                status: s.status,
            });
        };
        let _op = live.op.lock().await;
        let destroyed = live.instance.destroy().await;
        self.record_end(id, status, reason).await?;
        destroyed.map_err(CoreError::from)
    }

    /// Records that a sandbox ended: store, log, metrics, lifecycle event.
    async fn record_end(&self, id: &str, status: Status, reason: &str) -> Result<(), CoreError> {
        self.store
            .end_sandbox(id, status, reason, OffsetDateTime::now_utc())
            .await?;
        tracing::info!(sandbox = %id, %status, reason, "sandbox ended");
        self.count_end(status);
        self.events
            .emit(id, status.ended(), serde_json::json!({ "reason": reason }));
        Ok(())
    }

    fn count_end(&self, status: Status) {
        self.metrics
            .ended
            .get_or_create(&StatusLabel {
                status: status.as_str().to_owned(),
            })
            .inc();
    }

    fn waking_now(&self, id: &str) -> bool {
        match self.waking.lock() {
            Ok(g) => g.contains(id),
            Err(p) => p.into_inner().contains(id),
        }
    }
}
