//! The sandbox state machine: create, exec, delete and time-to-live, over one runtime
//! and the store.

use crate::access::{SandboxRef, SnapshotRef};
use crate::auth::{self, NewToken, Principal, Quota, Token, Usage, DEFAULT_WORKSPACE};
use crate::events::EventLog;
use crate::metrics::{KindLabel, Metrics, StatusLabel};
use crate::model::{
    CreateRequest, ExecCommand, ListFilter, OnTimeout, Sandbox, Snapshot, Status, Work,
};
use crate::runtime::{ByteStream, CreateSpec, Instance, Runtime, UploadStream};
use crate::store::Store;
use crate::trace::{op_span, TraceParent};
use crate::{ids, CoreError};
use bytes::Bytes;
use forkbox_types::agent::{
    AgentEvent, BgInfo, ExecRequest, FileOp, FileOpReply, PtyRequest, RunCodeRequest, WriteReply,
};
use forkbox_types::exec::{EventKind, ExecEvent};
use futures_util::stream::{BoxStream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use tracing::Instrument as _;

/// Limits and defaults of one server.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub default_template: String,
    pub default_cpu: f64,
    pub max_cpu: f64,
    pub default_memory_mb: u64,
    pub min_memory_mb: u64,
    pub max_memory_mb: u64,
    pub default_timeout_s: u64,
    pub max_timeout_s: u64,
    pub default_disk_mb: u64,
    pub max_disk_mb: u64,
    pub pids_max: u64,
    /// Languages of the one-shot runner.
    pub languages: Arc<crate::languages::Languages>,
    /// Runtime of sandboxes whose create request names none (`None`: the primary one,
    /// the first given to [`Manager::with_runtimes`]).
    pub default_runtime: Option<String>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            default_template: "python".into(),
            default_cpu: 1.0,
            max_cpu: 8.0,
            default_memory_mb: 512,
            min_memory_mb: 16,
            max_memory_mb: 16 * 1024,
            default_timeout_s: 300,
            max_timeout_s: 24 * 3600,
            default_disk_mb: 8 * 1024,
            max_disk_mb: 1024 * 1024,
            pids_max: 512,
            languages: Arc::new(crate::languages::Languages::builtin().unwrap_or_default()),
            default_runtime: None,
        }
    }
}

struct Live {
    record: Mutex<Sandbox>,
    instance: Arc<dyn Instance>,
    /// What the sandbox was made with; fork children get the same.
    spec: CreateSpec,
    /// Serialises lifecycle operations (pause, resume, timeout, fork, merge, delete) on
    /// one sandbox.
    op: Arc<tokio::sync::Mutex<()>>,
    /// Its use, for `idle_timeout` (`idle.rs`).
    activity: Arc<crate::idle::Activity>,
}

impl Live {
    fn record(&self) -> Sandbox {
        match self.record.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Sandbox)) -> Sandbox {
        let mut g = match self.record.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
        g.clone()
    }
}

pub struct Manager {
    store: Store,
    /// The primary runtime: templates, volumes, snapshots and garbage collection.
    runtime: Arc<dyn Runtime>,
    /// Every runtime sandboxes may be created with, the primary one first.
    runtimes: Vec<Arc<dyn Runtime>>,
    config: ManagerConfig,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Hibernated sandboxes being woken right now.
    waking: Mutex<std::collections::HashSet<String>>,
    events: Arc<EventLog>,
    metrics: Arc<Metrics>,
    /// Workspace quotas, read once from the store and kept up to date by `set_quota`.
    quotas: Mutex<HashMap<String, Quota>>,
    /// Held from a quota check until the sandboxes it admitted are recorded, so two
    /// concurrent creates cannot both take the last place.
    admitting: tokio::sync::Mutex<()>,
    /// The runner's warm pools and template builds.
    warm: Mutex<crate::runner::Warm>,
    /// Template builds (`templates.rs`).
    template_builds: Mutex<crate::templates::Builds>,
}

/// Locks `m`, shrugging off poisoning (the data are plain maps).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Milliseconds since the epoch (event timestamps).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Most children one fork may make.
pub const MAX_FORK: u32 = 32;

/// What a fork made.
#[derive(Debug, Clone)]
pub struct ForkOutcome {
    pub children: Vec<Sandbox>,
    /// What the children inherited, e.g. `filesystem`, `python`.
    pub carried: Vec<String>,
}

/// Exit code reported when the process's fate is unknown (its agent went away).
pub const EXIT_UNKNOWN: i32 = -1;
/// Exit code reported when an exec's timeout killed it (as coreutils `timeout` does).
pub const EXIT_TIMEOUT: i32 = 124;
/// How the stderr line an exec's timeout adds begins (dialects that report timeouts
/// their own way recognise it by this).
pub const TIMEOUT_NOTE: &str = "forkbox: timed out after";

pub(crate) fn valid_template_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Manager {
    pub fn new(store: Store, runtime: Arc<dyn Runtime>, config: ManagerConfig) -> Arc<Manager> {
        Self::with_runtimes(store, runtime, Vec::new(), config)
    }

    /// A manager choosing per sandbox among `primary` and `others` (by
    /// [`Runtime::name`]); `primary` also keeps templates, volumes and snapshots.
    pub fn with_runtimes(
        store: Store,
        primary: Arc<dyn Runtime>,
        others: Vec<Arc<dyn Runtime>>,
        config: ManagerConfig,
    ) -> Arc<Manager> {
        let mut runtimes = vec![primary.clone()];
        runtimes.extend(others);
        Arc::new(Manager {
            store,
            runtime: primary,
            runtimes,
            config,
            live: Mutex::new(HashMap::new()),
            waking: Mutex::new(Default::default()),
            events: Arc::default(),
            metrics: Arc::default(),
            quotas: Mutex::new(HashMap::new()),
            admitting: tokio::sync::Mutex::new(()),
            warm: Mutex::new(Default::default()),
            template_builds: Mutex::new(Default::default()),
        })
    }

    /// The template a create that names none gets.
    pub fn default_template(&self) -> String {
        self.config().default_template.clone()
    }

    pub(crate) fn config(&self) -> &ManagerConfig {
        &self.config
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    pub(crate) fn warm(&self) -> &Mutex<crate::runner::Warm> {
        &self.warm
    }

    pub(crate) fn template_builds(&self) -> &Mutex<crate::templates::Builds> {
        &self.template_builds
    }

    /// The manager's metrics, with the live-sandbox gauge brought up to date.
    pub fn metrics(&self) -> &Metrics {
        self.metrics.live.set(self.live_count() as i64);
        &self.metrics
    }

    /// Lifecycle events of every sandbox.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    pub fn runtime_name(&self) -> &'static str {
        self.runtime.name()
    }

    /// Names of the runtimes sandboxes may be created with.
    pub fn runtime_names(&self) -> Vec<&'static str> {
        self.runtimes.iter().map(|r| r.name()).collect()
    }

    /// The runtime a create request asks for (`None`: the server's default).
    fn pick_runtime(&self, name: Option<&str>) -> Result<Arc<dyn Runtime>, CoreError> {
        let name = name.or(self.config.default_runtime.as_deref());
        let Some(name) = name else {
            return Ok(self.runtime.clone());
        };
        self.runtimes
            .iter()
            .find(|r| r.name() == name)
            .cloned()
            .ok_or_else(|| {
                CoreError::Invalid(format!(
                    "unknown runtime {name:?}; this server has: {}",
                    self.runtime_names().join(", ")
                ))
            })
    }

    /// The runtime that made sandbox `rec` (the primary one if it is not loaded).
    /// The runtime that runs `rec`.
    pub(crate) fn runtime_of_record(&self, rec: &Sandbox) -> Arc<dyn Runtime> {
        self.runtime_of(rec)
    }

    /// The runtime that also keeps templates, volumes and snapshots.
    pub(crate) fn primary_runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    /// Every runtime, the primary first.
    pub(crate) fn all_runtimes(&self) -> &[Arc<dyn Runtime>] {
        &self.runtimes
    }

    fn runtime_of(&self, rec: &Sandbox) -> Arc<dyn Runtime> {
        self.runtimes
            .iter()
            .find(|r| r.name() == rec.runtime)
            .cloned()
            .unwrap_or_else(|| self.runtime.clone())
    }

    fn live_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Live>>> {
        match self.live.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.live_map().get(id).cloned()
    }

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
            let proxy = format!("http://{}", forkbox_types::egress::PROXY_ADDR);
            for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                env.entry(k.to_owned()).or_insert_with(|| proxy.clone());
            }
            for k in ["NO_PROXY", "no_proxy"] {
                env.entry(k.to_owned())
                    .or_insert_with(|| "localhost,127.0.0.1,::1".to_owned());
            }
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
    fn spec_of(&self, rec: &Sandbox) -> CreateSpec {
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
            "created",
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
        }
        for v in &req.volumes {
            self.volume_of(&workspace, &v.id).await?;
        }
        let (mut spec, cpu, memory_mb, timeout) = self.spec(&id, &req)?;
        spec.snapshot = snap.map(|s| s.id);
        // A template's own environment comes under the sandbox's.
        if let Some(info) = self.runtime.template_info(&spec.template).await {
            for (k, v) in info.env {
                spec.env.entry(k).or_insert(v);
            }
        }
        let runtime = self.pick_runtime(req.runtime.as_deref())?;
        let _admitted = self.admit(&workspace, 1, memory_mb).await?;
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
            idle_timeout: req.idle_timeout,
        };
        if let Err(e) = self.store.insert_sandbox(&record).await {
            let _ = instance.destroy().await;
            return Err(e.into());
        }
        self.live_map().insert(
            id.clone(),
            Arc::new(Live {
                record: Mutex::new(record.clone()),
                instance,
                spec,
                op: Arc::new(tokio::sync::Mutex::new(())),
                activity: crate::idle::Activity::new(),
            }),
        );
        tracing::info!(sandbox = %id, boot_ms = record.boot_ms, "sandbox created");
        // A warm-pool sandbox counts (and is announced) when it is handed over.
        if record.workspace != crate::warm::POOL_WORKSPACE {
            self.created(&record, from_snapshot, started);
        }
        Ok(record)
    }

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
        let forked = live.instance.fork(specs.clone()).await?;
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
                map.insert(
                    record.id.clone(),
                    Arc::new(Live {
                        record: Mutex::new(record.clone()),
                        instance,
                        spec,
                        op: Arc::new(tokio::sync::Mutex::new(())),
                        activity: crate::idle::Activity::new(),
                    }),
                );
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
            "forked",
            serde_json::json!({"children": ids, "carried": forked.carried, "ms": boot_ms}),
        );
        for c in &children {
            self.events.emit(
                &c.id,
                "created",
                serde_json::json!({"parent": id, "carried": forked.carried}),
            );
        }
        Ok(ForkOutcome {
            children,
            carried: forked.carried,
        })
    }

    /// The span of an operation on a sandbox, under its trace context if it has one.
    fn span_of(&self, id: &str, op: &'static str) -> tracing::Span {
        let tp = self
            .live(id)
            .and_then(|l| l.record().traceparent)
            .and_then(|t| TraceParent::parse(&t));
        op_span(tp.as_ref(), op, id)
    }

    /// A record, live or ended, or 404.
    pub async fn any_record(&self, id: &SandboxRef) -> Result<Sandbox, CoreError> {
        self.any_record_in(id.id()).await
    }

    async fn any_record_in(&self, id: &str) -> Result<Sandbox, CoreError> {
        if let Some(l) = self.live(id) {
            return Ok(l.record());
        }
        self.store
            .get_sandbox(id)
            .await?
            .ok_or_else(|| CoreError::NotFound(id.to_owned()))
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
                Arc::new(Live {
                    record: Mutex::new(merged.clone()),
                    instance: c_live.instance.clone(),
                    spec: c_live.spec.clone(),
                    op: Arc::new(tokio::sync::Mutex::new(())),
                    activity: crate::idle::Activity::new(),
                }),
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
        tokio::spawn(async move {
            if let Err(e) = old.destroy().await {
                tracing::warn!(sandbox = %pid, error = %e, "releasing the state replaced by a merge");
            }
        });
        self.span_of(parent, "merge")
            .in_scope(|| tracing::info!(child, "merged"));
        self.metrics.merges.inc();
        self.events
            .emit(parent, "merged", serde_json::json!({"from": child}));
        self.events
            .emit(child, "merged", serde_json::json!({"into": parent}));
        Ok(merged)
    }

    /// The record of a sandbox; ended sandboxes answer [`CoreError::Gone`].
    pub async fn get(&self, id: &SandboxRef) -> Result<Sandbox, CoreError> {
        self.get_in(id.id()).await
    }

    async fn get_in(&self, id: &str) -> Result<Sandbox, CoreError> {
        if let Some(l) = self.live(id) {
            return Ok(l.record());
        }
        match self.store.get_sandbox(id).await? {
            Some(s) if s.status.is_live() => Ok(s),
            Some(s) => Err(CoreError::Gone {
                id: id.to_owned(),
                status: s.status,
            }),
            None => Err(CoreError::NotFound(id.to_owned())),
        }
    }

    async fn running(&self, id: &str) -> Result<Arc<Live>, CoreError> {
        if let Some(l) = self.live(id) {
            // Every call that uses the sandbox passes here (not status reads): it is
            // not idle.
            l.activity.touch();
            return Ok(l);
        }
        let s = self.get_in(id).await?;
        // Recorded running or paused but no longer held: it is being ended right now
        // (its record changes once its processes are gone); earlier servers' leftovers
        // were settled by `recover` before serving.
        if matches!(s.status, Status::Running | Status::Paused) {
            return Err(CoreError::Ending(id.to_owned()));
        }
        Err(CoreError::WrongState {
            id: id.to_owned(),
            status: s.status,
        })
    }

    /// Runs a command and streams its numbered events; the last one is always `exit`.
    pub async fn exec(
        &self,
        id: &SandboxRef,
        cmd: ExecCommand,
    ) -> Result<BoxStream<'static, ExecEvent>, CoreError> {
        let id = id.id();
        let timeout_ms = match cmd.timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t <= 86400.0 => Some((t * 1000.0) as u64),
            Some(_) => {
                return Err(CoreError::Invalid(
                    "timeout must be between 0 and 86400 seconds".into(),
                ))
            }
        };
        let text = match &cmd.work {
            Work::Command(c) => c,
            Work::Code { code, .. } => code,
        };
        if text.is_empty() {
            return Err(CoreError::Invalid("cmd/code must not be empty".into()));
        }
        if text.contains('\0') {
            return Err(CoreError::Invalid("cmd/code must not contain NUL".into()));
        }
        let live = self.running(id).await?;
        let status = live.record().status;
        if status != Status::Running {
            return Err(CoreError::WrongState {
                id: id.to_owned(),
                status,
            });
        }
        self.span_of(id, "exec").in_scope(|| {
            tracing::info!(
                kind = match &cmd.work {
                    Work::Command(_) => "command",
                    Work::Code { .. } => "code",
                },
                "exec started"
            )
        });
        let oom_before = live.instance.oom_kills();
        self.metrics
            .execs
            .get_or_create(&KindLabel {
                kind: match &cmd.work {
                    Work::Command(_) => "command",
                    Work::Code { .. } => "code",
                }
                .to_owned(),
            })
            .inc();
        let events = match cmd.work {
            Work::Command(c) => {
                live.instance
                    .exec(ExecRequest {
                        cmd: c,
                        cwd: cmd.cwd,
                        env: cmd.env,
                        timeout_ms,
                    })
                    .await?
            }
            Work::Code { language, code } => {
                if cmd.cwd.is_some() || !cmd.env.is_empty() {
                    return Err(CoreError::Invalid(
                        "cwd and env apply to commands; a REPL keeps its own".into(),
                    ));
                }
                live.instance
                    .run_code(RunCodeRequest {
                        language,
                        code,
                        timeout_ms,
                    })
                    .await?
            }
        };
        // In flight (not idle) until the caller has the last event or gives up.
        let busy = live.activity.busy();
        Ok(number_events(
            events,
            Numbering {
                instance: live.instance.clone(),
                oom_before,
                memory_mb: live.record().memory_mb,
                timeout_s: cmd.timeout.unwrap_or(0.0),
                log: self.events.clone(),
                metrics: self.metrics.clone(),
                sandbox: id.to_owned(),
                expect_exit: true,
            },
        )
        .map(move |e| {
            let _ = &busy;
            e
        })
        .boxed())
    }

    /// Starts a command without waiting for it (`"background": true`).
    pub async fn exec_background(
        &self,
        id: &SandboxRef,
        cmd: ExecCommand,
    ) -> Result<BgInfo, CoreError> {
        let id = id.id();
        let Work::Command(c) = cmd.work else {
            return Err(CoreError::Invalid(
                "background applies to commands (`cmd`), not REPL cells".into(),
            ));
        };
        if c.is_empty() || c.contains('\0') {
            return Err(CoreError::Invalid(
                "cmd must be non-empty and contain no NUL".into(),
            ));
        }
        let timeout_ms = match cmd.timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t <= 86400.0 => Some((t * 1000.0) as u64),
            Some(_) => {
                return Err(CoreError::Invalid(
                    "timeout must be between 0 and 86400 seconds".into(),
                ))
            }
        };
        let inst = self.running_instance(id).await?;
        Ok(inst
            .bg_start(ExecRequest {
                cmd: c,
                cwd: cmd.cwd,
                env: cmd.env,
                timeout_ms,
            })
            .await?)
    }

    /// An interactive terminal in a running sandbox (frames both ways, see
    /// `forkbox_types::pty`).
    pub async fn pty(
        &self,
        id: &SandboxRef,
        req: PtyRequest,
        input: UploadStream,
    ) -> Result<ByteStream, CoreError> {
        let id = id.id();
        if req
            .cmd
            .as_deref()
            .is_some_and(|c| c.is_empty() || c.contains('\0'))
        {
            return Err(CoreError::Invalid(
                "cmd must be non-empty and contain no NUL".into(),
            ));
        }
        if req
            .cwd
            .as_deref()
            .is_some_and(|c| !c.starts_with('/') || c.contains('\0'))
        {
            return Err(CoreError::Invalid(
                "cwd must be an absolute path without NUL".into(),
            ));
        }
        check_env(&req.env)?;
        let out = self.running_instance(id).await?.pty(req, input).await?;
        // An open terminal is in use (not idle) until it ends.
        Ok(self.busy_while(id, out))
    }

    /// `out`, holding sandbox `id` busy (not idle) until it ends or is dropped.
    fn busy_while(&self, id: &str, out: ByteStream) -> ByteStream {
        let Some(busy) = self.live(id).map(|l| l.activity.busy()) else {
            return out;
        };
        out.map(move |b| {
            let _ = &busy;
            b
        })
        .boxed()
    }

    /// A connection to TCP `port` inside a running sandbox (preview ports): `input` is
    /// sent to it, the answer is what it sends back. The sandbox is in use (not idle)
    /// while the connection is open.
    pub async fn tcp(
        &self,
        id: &SandboxRef,
        port: u16,
        input: UploadStream,
    ) -> Result<ByteStream, CoreError> {
        let id = id.id();
        if port == 0 {
            return Err(CoreError::Invalid("port must be 1-65535".into()));
        }
        let out = self.running_instance(id).await?.tcp(port, input).await?;
        Ok(self.busy_while(id, out))
    }

    /// The TCP ports something listens on in a running sandbox.
    pub async fn ports(
        &self,
        id: &SandboxRef,
    ) -> Result<Vec<forkbox_types::agent::ListeningPort>, CoreError> {
        Ok(self.running_instance(id.id()).await?.ports().await?)
    }

    /// A live sandbox's log lines (see [`Instance::logs`]).
    pub async fn logs(
        &self,
        id: &SandboxRef,
        follow: bool,
    ) -> Result<BoxStream<'static, String>, CoreError> {
        let id = id.id();
        Ok(self.running(id).await?.instance.logs(follow).await?)
    }

    /// Changes under a directory of a running sandbox, as they happen.
    pub async fn watch(
        &self,
        id: &SandboxRef,
        path: &str,
        recursive: bool,
    ) -> Result<crate::runtime::WatchEvents, CoreError> {
        let id = id.id();
        Ok(self
            .running_instance(id)
            .await?
            .watch(path, recursive)
            .await?)
    }

    /// Checks that `id` is running (for calls that must fail before they start).
    pub async fn check_running(&self, id: &SandboxRef) -> Result<(), CoreError> {
        let id = id.id();
        self.running_instance(id).await.map(|_| ())
    }

    /// Background commands of a sandbox.
    pub async fn commands(&self, id: &SandboxRef) -> Result<Vec<BgInfo>, CoreError> {
        let id = id.id();
        // A paused sandbox's agent is frozen: answer 409 rather than hang.
        Ok(self.running_instance(id).await?.bg_list().await?)
    }

    pub async fn command_stdin(
        &self,
        id: &SandboxRef,
        pid: i32,
        data: Bytes,
        close: bool,
    ) -> Result<(), CoreError> {
        let id = id.id();
        Ok(self
            .running_instance(id)
            .await?
            .bg_stdin(pid, data, close)
            .await?)
    }

    pub async fn command_signal(
        &self,
        id: &SandboxRef,
        pid: i32,
        signal: i32,
    ) -> Result<(), CoreError> {
        let id = id.id();
        Ok(self
            .running_instance(id)
            .await?
            .bg_signal(pid, signal)
            .await?)
    }

    /// Waits for a background command to exit; its exit code.
    pub async fn command_wait(&self, id: &SandboxRef, pid: i32) -> Result<i32, CoreError> {
        let id = id.id();
        Ok(self.running_instance(id).await?.bg_wait(pid).await?)
    }

    /// A background command's kept output, then (with `follow`) its live output; the
    /// same numbered events as exec.
    pub async fn command_output(
        &self,
        id: &SandboxRef,
        pid: i32,
        follow: bool,
    ) -> Result<BoxStream<'static, ExecEvent>, CoreError> {
        let id = id.id();
        let live = self.running(id).await?;
        if live.record().status != Status::Running {
            return Err(CoreError::WrongState {
                id: id.to_owned(),
                status: live.record().status,
            });
        }
        let events = live.instance.bg_output(pid, follow).await?;
        Ok(number_events(
            events,
            Numbering {
                instance: live.instance.clone(),
                oom_before: u64::MAX,
                memory_mb: live.record().memory_mb,
                timeout_s: 0.0,
                log: self.events.clone(),
                metrics: self.metrics.clone(),
                sandbox: id.to_owned(),
                expect_exit: follow,
            },
        ))
    }

    /// A running sandbox's instance (409 when paused: its agent is frozen).
    async fn running_instance(&self, id: &str) -> Result<Arc<dyn Instance>, CoreError> {
        let live = self.running(id).await?;
        let status = live.record().status;
        if status != Status::Running {
            return Err(CoreError::WrongState {
                id: id.to_owned(),
                status,
            });
        }
        Ok(live.instance.clone())
    }

    /// A metadata operation on a sandbox's files.
    pub async fn file_op(&self, id: &SandboxRef, op: FileOp) -> Result<FileOpReply, CoreError> {
        let id = id.id();
        Ok(self.running_instance(id).await?.file_op(op).await?)
    }

    /// Reads a file of a sandbox, streamed.
    pub async fn read_file(
        &self,
        id: &SandboxRef,
        path: &str,
    ) -> Result<(Option<u64>, ByteStream), CoreError> {
        let id = id.id();
        Ok(self.running_instance(id).await?.read_file(path).await?)
    }

    /// Writes a file of a sandbox from a stream, atomically.
    pub async fn write_file(
        &self,
        id: &SandboxRef,
        path: &str,
        data: UploadStream,
    ) -> Result<WriteReply, CoreError> {
        let id = id.id();
        Ok(self
            .running_instance(id)
            .await?
            .write_file(path, data)
            .await?)
    }

    /// One page of sandboxes (see [`Store::list_sandboxes`]); live records come from
    /// memory so they show their current state.
    pub async fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<(Vec<Sandbox>, Option<i64>), CoreError> {
        let (mut page, next) = self.store.list_sandboxes(filter).await?;
        for s in &mut page {
            if let Some(l) = self.live(&s.id) {
                *s = l.record();
            }
        }
        Ok((page, next))
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
                "paused"
            } else {
                "resumed"
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
        self.events.emit(id, "hibernated", serde_json::Value::Null);
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
        let instance = self.runtime_of(&rec).wake(&spec).await?;
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
        self.live_map().insert(
            record.id.clone(),
            Arc::new(Live {
                record: Mutex::new(record.clone()),
                instance,
                spec,
                op: Arc::new(tokio::sync::Mutex::new(())),
                activity: crate::idle::Activity::new(),
            }),
        );
        tracing::info!(sandbox = %record.id, "sandbox woken");
        self.events.emit(
            &record.id,
            "woken",
            serde_json::json!({"memory_restored": false}),
        );
        Ok(record)
    }

    /// Takes a named, read-only snapshot of a running or paused sandbox's filesystem.
    pub async fn snapshot(&self, id: &SandboxRef, name: &str) -> Result<Snapshot, CoreError> {
        let id = id.id();
        if name.is_empty() || name.len() > 128 || name.contains('\0') {
            return Err(CoreError::Invalid(
                "name must be 1-128 characters without NUL".into(),
            ));
        }
        let live = self.running(id).await?;
        let _op = live.op.lock().await;
        let rec = live.record();
        let snap = Snapshot {
            id: ids::new("snap"),
            name: name.to_owned(),
            sandbox_id: id.to_owned(),
            template: rec.template.clone(),
            created_at: OffsetDateTime::now_utc(),
            workspace: rec.workspace.clone(),
        };
        live.instance
            .snapshot(&snap.id, rec.status == Status::Running)
            .await?;
        if let Err(e) = self.store.insert_snapshot(&snap).await {
            let _ = self.runtime.delete_snapshot(&snap.id).await;
            return Err(e.into());
        }
        tracing::info!(sandbox = %id, snapshot = %snap.id, "snapshot taken");
        self.events.emit(
            id,
            "snapshot",
            serde_json::json!({"id": snap.id, "name": snap.name}),
        );
        Ok(snap)
    }

    /// Snapshots of `workspace` (or of every workspace), oldest first.
    pub async fn snapshots(&self, workspace: Option<&str>) -> Result<Vec<Snapshot>, CoreError> {
        Ok(self.store.list_snapshots(workspace).await?)
    }

    pub async fn get_snapshot(&self, id: &SnapshotRef) -> Result<Snapshot, CoreError> {
        self.get_snapshot_in(id.id()).await
    }

    async fn get_snapshot_in(&self, id: &str) -> Result<Snapshot, CoreError> {
        self.store
            .get_snapshot(id)
            .await?
            .ok_or_else(|| CoreError::NoSnapshot(id.to_owned()))
    }

    /// Deletes a snapshot; sandboxes made from it keep their own copies.
    pub async fn delete_snapshot(&self, id: &SnapshotRef) -> Result<(), CoreError> {
        let id = id.id();
        self.get_snapshot_in(id).await?;
        self.runtime.delete_snapshot(id).await?;
        self.store.delete_snapshot(id).await?;
        Ok(())
    }

    /// Destroys a sandbox; its record stays, marked `deleted`.
    pub async fn delete(&self, id: &SandboxRef) -> Result<(), CoreError> {
        let id = id.id();
        self.end(id, Status::Deleted, "deleted by client").await
    }

    async fn end(&self, id: &str, status: Status, reason: &str) -> Result<(), CoreError> {
        self.end_as(id, None, status, reason).await
    }

    /// [`Manager::end`]; with `seen`, only if the sandbox is still that live entry
    /// (the reaper judged that one: if it was hibernated or merged meanwhile, the
    /// verdict no longer applies and nothing happens).
    async fn end_as(
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
            // Not ours: unknown, already ended, hibernated, or left running by an
            // earlier server.
            let s = self.get_in(id).await?;
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
            .emit(id, status.as_str(), serde_json::json!({ "reason": reason }));
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

    /// Ends sandboxes whose time is up or whose agent died. Runs until the manager is
    /// dropped.
    /// The quota of `workspace`.
    pub async fn quota(&self, workspace: &str) -> Result<Quota, CoreError> {
        if let Some(q) = lock(&self.quotas).get(workspace) {
            return Ok(*q);
        }
        let q = self.store.quota(workspace).await?;
        lock(&self.quotas).insert(workspace.to_owned(), q);
        Ok(q)
    }

    /// What `workspace` holds now.
    pub async fn usage(&self, workspace: &str) -> Result<Usage, CoreError> {
        Ok(self.store.usage(workspace).await?)
    }

    /// Checks that `workspace` may add `n` sandboxes of `memory_mb` each; the guard
    /// must be held until they are recorded. `None` when the workspace is unlimited.
    pub(crate) async fn admit(
        &self,
        workspace: &str,
        n: u64,
        memory_mb: u64,
    ) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>, CoreError> {
        let quota = self.quota(workspace).await?;
        if quota.is_unlimited() {
            return Ok(None);
        }
        let guard = self.admitting.lock().await;
        let usage = self.store.usage(workspace).await?;
        match quota.refuse(workspace, usage, n, memory_mb) {
            Some(why) => Err(CoreError::Quota(why)),
            None => Ok(Some(guard)),
        }
    }

    /// Like [`Manager::admit`] for memory only (waking a sandbox that already counts).
    async fn admit_memory(
        &self,
        workspace: &str,
        memory_mb: u64,
    ) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>, CoreError> {
        let quota = Quota {
            max_sandboxes: None,
            ..self.quota(workspace).await?
        };
        if quota.is_unlimited() {
            return Ok(None);
        }
        let guard = self.admitting.lock().await;
        let usage = self.store.usage(workspace).await?;
        match quota.refuse(workspace, usage, 1, memory_mb) {
            Some(why) => Err(CoreError::Quota(why)),
            None => Ok(Some(guard)),
        }
    }

    /// Sets the quota of `workspace` (admins only).
    pub async fn set_quota(
        &self,
        by: &Principal,
        workspace: &str,
        quota: Quota,
    ) -> Result<(), CoreError> {
        if !by.admin {
            return Err(CoreError::Forbidden(
                "only an admin key may set quotas".into(),
            ));
        }
        if !auth::valid_workspace(workspace) {
            return Err(CoreError::Invalid(
                "workspace must be 1-64 characters of a-z, 0-9, '-' and '_'".into(),
            ));
        }
        self.store.set_quota(workspace, quota).await?;
        lock(&self.quotas).insert(workspace.to_owned(), quota);
        Ok(())
    }

    /// The caller a key stands for, or `None` for an unknown or revoked key.
    pub async fn authenticate(&self, key: &str) -> Result<Option<Principal>, CoreError> {
        if !key.starts_with(auth::KEY_PREFIX) || key.len() > 256 {
            return Ok(None);
        }
        Ok(self
            .store
            .token_by_hash(&auth::hash_key(key))
            .await?
            .map(|t| Principal {
                workspace: t.workspace,
                token_id: Some(t.id),
                token_name: Some(t.name),
                admin: t.admin,
            }))
    }

    /// Makes a key. Non-admin callers may only make non-admin keys of their own
    /// workspace; `workspace` defaults to the caller's.
    pub async fn create_token(
        &self,
        by: &Principal,
        name: &str,
        workspace: Option<&str>,
        admin: bool,
    ) -> Result<NewToken, CoreError> {
        let workspace = workspace.unwrap_or(&by.workspace);
        if !by.admin && (admin || workspace != by.workspace) {
            return Err(CoreError::Forbidden(
                "only an admin key may make admin keys or keys of another workspace".into(),
            ));
        }
        if !auth::valid_workspace(workspace) {
            return Err(CoreError::Invalid(
                "workspace must be 1-64 characters of a-z, 0-9, '-' and '_'".into(),
            ));
        }
        if name.is_empty() || name.len() > 128 || name.contains('\0') {
            return Err(CoreError::Invalid(
                "name must be 1-128 characters without NUL".into(),
            ));
        }
        Ok(self
            .insert_key(&auth::new_key(), name, workspace, admin)
            .await?)
    }

    async fn insert_key(
        &self,
        key: &str,
        name: &str,
        workspace: &str,
        admin: bool,
    ) -> Result<NewToken, crate::store::StoreError> {
        auth::issue(&self.store, key, name, workspace, admin).await
    }

    /// Makes sure `key` (chosen by the operator, e.g. from the environment) is an admin
    /// key of the default workspace.
    pub async fn ensure_admin_key(&self, key: &str, name: &str) -> Result<(), CoreError> {
        if !key.starts_with(auth::KEY_PREFIX) || key.len() < auth::KEY_PREFIX.len() + 20 {
            return Err(CoreError::Invalid(format!(
                "an admin key must start with {} and have at least 20 more characters",
                auth::KEY_PREFIX
            )));
        }
        if self.authenticate(key).await?.is_none() {
            self.insert_key(key, name, DEFAULT_WORKSPACE, true).await?;
        }
        Ok(())
    }

    /// Keys the caller may see: its workspace's, or every key for an admin.
    pub async fn tokens(&self, by: &Principal) -> Result<Vec<Token>, CoreError> {
        let ws = (!by.admin).then_some(by.workspace.as_str());
        Ok(self.store.list_tokens(ws).await?)
    }

    /// Revokes a key the caller may see; it fails from the next request on.
    pub async fn revoke_token(&self, by: &Principal, id: &str) -> Result<Token, CoreError> {
        let t = self
            .store
            .get_token(id)
            .await?
            .filter(|t| by.admin || t.workspace == by.workspace)
            .ok_or_else(|| CoreError::NoToken(id.to_owned()))?;
        self.store.revoke_token(id).await?;
        Ok(self.store.get_token(id).await?.unwrap_or(t))
    }

    /// The workspace owning sandbox `id`, if it exists.
    pub async fn sandbox_workspace(&self, id: &str) -> Result<Option<String>, CoreError> {
        if let Some(l) = self.live(id) {
            return Ok(Some(l.record().workspace));
        }
        Ok(self.store.get_sandbox(id).await?.map(|s| s.workspace))
    }

    /// The workspace owning snapshot `id`, if it exists.
    pub async fn snapshot_workspace(&self, id: &str) -> Result<Option<String>, CoreError> {
        Ok(self.store.get_snapshot(id).await?.map(|s| s.workspace))
    }

    pub fn spawn_reaper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { break };
                me.reap_once().await;
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
                self.events.emit(&id, "timeout", serde_json::Value::Null);
            }
            if reason == "idle timeout" {
                self.events
                    .emit(&id, "idle_timeout", serde_json::Value::Null);
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
                    self.events.emit(&s.id, "adopted", serde_json::Value::Null);
                    self.live_map().insert(
                        s.id.clone(),
                        Arc::new(Live {
                            record: Mutex::new(s),
                            instance,
                            spec,
                            op: Arc::new(tokio::sync::Mutex::new(())),
                            activity: crate::idle::Activity::new(),
                        }),
                    );
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
                    self.events
                        .emit(&s.id, "lost", serde_json::json!({ "reason": reason }));
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

    /// Destroys every live sandbox (server shutdown in tests and benchmarks).
    pub async fn shutdown(&self) {
        let ids: Vec<String> = self.live_map().keys().cloned().collect();
        for id in ids {
            let _ = self.end(&id, Status::Deleted, "server shut down").await;
        }
    }

    /// Number of live sandboxes.
    pub fn live_count(&self) -> usize {
        self.live_map().len()
    }
}

/// How agent events become numbered exec events.
struct Numbering {
    instance: Arc<dyn Instance>,
    /// OOM kills counted before the call (`u64::MAX`: do not report OOM kills).
    oom_before: u64,
    memory_mb: u64,
    timeout_s: f64,
    log: Arc<EventLog>,
    metrics: Arc<Metrics>,
    sandbox: String,
    /// Whether the stream must end with an exit event (one is made up if missing).
    expect_exit: bool,
}

/// Numbers agent events, turning timeouts, OOM kills and lost agents into stderr lines
/// and exit codes; the last event is `exit` when `expect_exit`.
fn number_events(
    events: crate::runtime::AgentEvents,
    n: Numbering,
) -> BoxStream<'static, ExecEvent> {
    let Numbering {
        instance,
        oom_before,
        memory_mb,
        timeout_s,
        log,
        metrics,
        sandbox,
        expect_exit,
    } = n;
    let mut seq = 0u64;
    let mut next = move |kind: EventKind| {
        seq += 1;
        ExecEvent {
            kind,
            seq,
            ts: now_ms(),
        }
    };
    async_stream(events, move |ev, out| match ev {
        Some(Ok(AgentEvent::Stdout { data })) => out.push(next(EventKind::Stdout(data))),
        Some(Ok(AgentEvent::Stderr { data })) => out.push(next(EventKind::Stderr(data))),
        Some(Ok(AgentEvent::Error { message })) => {
            out.push(next(EventKind::Stderr(format!("forkbox: {message}\n"))))
        }
        Some(Ok(AgentEvent::Exit {
            code, timed_out, ..
        })) => {
            let code = if timed_out {
                out.push(next(EventKind::Stderr(format!(
                    "{TIMEOUT_NOTE} {timeout_s}s; process tree killed\n"
                ))));
                EXIT_TIMEOUT
            } else {
                if oom_before != u64::MAX && instance.oom_kills() > oom_before {
                    metrics.oom_kills.inc();
                    log.emit(
                        &sandbox,
                        "oom",
                        serde_json::json!({ "memory_mb": memory_mb }),
                    );
                    out.push(next(EventKind::Stderr(format!(
                        "forkbox: killed by the out-of-memory killer (memory limit {memory_mb} MiB)\n"
                    ))));
                }
                code
            };
            out.push(next(EventKind::Exit(code)));
        }
        Some(Err(e)) => {
            out.push(next(EventKind::Stderr(format!("forkbox: {e}\n"))));
            out.push(next(EventKind::Exit(EXIT_UNKNOWN)));
        }
        None if expect_exit => {
            out.push(next(EventKind::Stderr(
                "forkbox: the sandbox's agent ended the stream without an exit status\n".into(),
            )));
            out.push(next(EventKind::Exit(EXIT_UNKNOWN)));
        }
        None => {}
    })
}

/// Maps each item of `input` (and its end, as `None`) to zero or more output events;
/// the output ends after the first `exit`.
fn async_stream<F>(input: crate::runtime::AgentEvents, f: F) -> BoxStream<'static, ExecEvent>
where
    F: FnMut(Option<Result<AgentEvent, crate::RuntimeError>>, &mut Vec<ExecEvent>) + Send + 'static,
{
    struct St<F> {
        input: crate::runtime::AgentEvents,
        f: F,
        queue: std::collections::VecDeque<ExecEvent>,
        finished: bool,
    }
    let st = St {
        input,
        f,
        queue: Default::default(),
        finished: false,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.queue.pop_front() {
                if matches!(ev.kind, EventKind::Exit(_)) {
                    st.finished = true;
                    st.queue.clear();
                }
                return Some((ev, st));
            }
            if st.finished {
                return None;
            }
            let item = st.input.next().await;
            let end = item.is_none();
            let mut out = Vec::new();
            (st.f)(item, &mut out);
            st.queue.extend(out);
            if end && st.queue.is_empty() {
                return None;
            }
        }
    })
    .boxed()
}

/// Environment variables a caller may set: names non-empty without `=` or NUL, values
/// without NUL.
fn check_env(env: &BTreeMap<String, String>) -> Result<(), CoreError> {
    if env
        .keys()
        .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(CoreError::Invalid(
            "env names must be non-empty and contain no '=' or NUL".into(),
        ));
    }
    if env.values().any(|v| v.contains('\0')) {
        return Err(CoreError::Invalid("env values must not contain NUL".into()));
    }
    Ok(())
}
