//! The manager: the one model of sandboxes the API drives, over the runtimes and the
//! store. This module holds its state (live sandboxes, config, runtimes) and the
//! lookups every room shares; each job is a room of its own: [`lifecycle`] (create,
//! pause/resume, hibernate/wake, end), [`family`] (fork, merge), [`snapshots`],
//! [`exec`] (work inside a sandbox), [`admission`] (quotas), [`keys`] (API keys),
//! [`recovery`] (the reaper, restart recovery, shutdown) and [`nodes`] (the servers
//! sharing a database).

mod admission;
pub mod contexts;
mod exec;
mod family;
mod keys;
mod lifecycle;
pub mod nodes;
pub mod previews;
mod recovery;
mod snapshots;
#[cfg(test)]
mod tests;

use crate::access::{SandboxRef, SnapshotRef};
use crate::auth::{self, NewToken, Principal, Quota, Token, Usage, DEFAULT_WORKSPACE};
use crate::events::{EventLog, Lifecycle};
use crate::metrics::{KindLabel, Metrics, StatusLabel};
use crate::model::{
    CreateRequest, ExecCommand, ListFilter, OnTimeout, Sandbox, Snapshot, Status, Work,
};
use crate::runtime::{ByteStream, CreateSpec, HostStores, Instance, Runtime, UploadStream};
use crate::store::Store;
use crate::trace::{op_span, TraceParent};
use crate::{ids, CoreError};
use bytes::Bytes;
use forkbox_types::agent::{
    AgentEvent, BgInfo, ExecRequest, FileOp, FileOpReply, Language, PtyRequest, RunCodeRequest,
    WriteReply,
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
    /// Most ready sandboxes create's warm pool grows to for a burst of takes (never
    /// below its configured size): each costs about 1 MiB of host memory idle. The
    /// runner's pools (warm REPLs, ~18 MiB each) keep their configured size.
    pub warm_pool_max: usize,
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
            warm_pool_max: 32,
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
    /// Its open LSP sessions ([`LSP_PER_SANDBOX`] at most).
    lsp: Arc<tokio::sync::Semaphore>,
}

/// Most LSP sessions one sandbox may have open at a time, and the whole server: each
/// may hold a message of up to [`forkbox_types::lsp::MAX_MESSAGE`] in server memory.
pub const LSP_PER_SANDBOX: usize = 4;
pub const LSP_PER_SERVER: usize = 64;

impl Live {
    /// A sandbox made (created, forked, woken, merged into, adopted) and now live.
    fn new(record: Sandbox, instance: Arc<dyn Instance>, spec: CreateSpec) -> Arc<Live> {
        Arc::new(Live {
            record: Mutex::new(record),
            instance,
            spec,
            op: Arc::new(tokio::sync::Mutex::new(())),
            activity: crate::idle::Activity::new(),
            lsp: Arc::new(tokio::sync::Semaphore::new(LSP_PER_SANDBOX)),
        })
    }

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
    /// The primary runtime (garbage collection and host-wide clean-up first).
    runtime: Arc<dyn Runtime>,
    /// The host stores (kept by the primary runtime).
    host: Arc<dyn HostStores>,
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
    /// Per workspace, held from a quota check until the sandboxes it admitted are
    /// recorded (`admission.rs`).
    admitting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The runner's warm pools and template builds.
    warm: Mutex<crate::runner::Warm>,
    /// Template builds (`templates.rs`).
    template_builds: Mutex<crate::templates::Builds>,
    /// Held by a create with volumes from the check of who mounts them until its
    /// record is written (`volumes.rs`: who may mount a volume beside whom).
    pub(crate) volume_claims: tokio::sync::Mutex<()>,
    /// Work started off the request path (pool refills, template builds, deleting a
    /// runner's sandbox, releasing a merge's old state): `shutdown` waits for it.
    tasks: tokio_util::task::TaskTracker,
    /// Set by `shutdown`: no new background work (a refill stops).
    closing: std::sync::atomic::AtomicBool,
    /// Whether other nodes were up at the last heartbeat (placement looks further
    /// only then).
    peers: std::sync::atomic::AtomicBool,
    /// How long this node may go without a heartbeat before it fences itself (its
    /// orphan grace, from `register_node`), and the sandboxes it fenced whose records
    /// are still to be written.
    fence_after: std::sync::OnceLock<Duration>,
    /// Marks calls between nodes ([`Manager::cluster_secret`]).
    cluster_secret: std::sync::OnceLock<String>,
    fenced: Mutex<Vec<String>>,
    /// The nodes as last read (every heartbeat): where to pass requests on.
    node_cache: Mutex<Vec<nodes::Node>>,
    /// Open LSP sessions of the whole server ([`LSP_PER_SERVER`] at most).
    lsp: Arc<tokio::sync::Semaphore>,
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
    /// What they did not, in the runtime's words.
    pub not_carried: String,
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
    /// A manager over one runtime that also keeps the host stores.
    pub fn new<R: Runtime + HostStores>(
        store: Store,
        runtime: Arc<R>,
        config: ManagerConfig,
    ) -> Arc<Manager> {
        Self::with_runtimes(store, runtime, Vec::new(), config)
    }

    /// A manager choosing per sandbox among `primary` and `others` (by
    /// [`Runtime::name`]); `primary` also keeps the host stores (templates, volumes,
    /// snapshots) every runtime's sandboxes are made from.
    pub fn with_runtimes<R: Runtime + HostStores>(
        store: Store,
        primary: Arc<R>,
        others: Vec<Arc<dyn Runtime>>,
        config: ManagerConfig,
    ) -> Arc<Manager> {
        let host: Arc<dyn HostStores> = primary.clone();
        let primary: Arc<dyn Runtime> = primary;
        let mut runtimes = vec![primary.clone()];
        runtimes.extend(others);
        Arc::new(Manager {
            store,
            runtime: primary,
            host,
            runtimes,
            config,
            live: Mutex::new(HashMap::new()),
            waking: Mutex::new(Default::default()),
            events: Arc::default(),
            metrics: Arc::default(),
            quotas: Mutex::new(HashMap::new()),
            admitting: Mutex::new(HashMap::new()),
            tasks: tokio_util::task::TaskTracker::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            peers: std::sync::atomic::AtomicBool::new(false),
            fence_after: std::sync::OnceLock::new(),
            cluster_secret: std::sync::OnceLock::new(),
            fenced: Mutex::new(Vec::new()),
            node_cache: Mutex::new(Vec::new()),
            warm: Mutex::new(Default::default()),
            template_builds: Mutex::new(Default::default()),
            volume_claims: tokio::sync::Mutex::new(()),
            lsp: Arc::new(tokio::sync::Semaphore::new(LSP_PER_SERVER)),
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

    /// Templates, volumes and snapshots.
    pub(crate) fn host_stores(&self) -> &dyn HostStores {
        &*self.host
    }

    pub(crate) fn warm(&self) -> &Mutex<crate::runner::Warm> {
        &self.warm
    }

    /// Runs `work` off the request path, where `shutdown` waits for it.
    pub(crate) fn background<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(work);
    }

    /// Whether the server is shutting down (background work should stop).
    pub(crate) fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
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

    /// Each runtime sandboxes may be created with, and its accelerator if it has one.
    pub fn runtimes_live(&self) -> Vec<(&'static str, Option<&'static str>)> {
        self.runtimes
            .iter()
            .map(|r| (r.name(), r.accelerator()))
            .collect()
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

    /// The runtime that runs `rec` (the primary one if its runtime is not loaded).
    pub(crate) fn runtime_of_record(&self, rec: &Sandbox) -> Arc<dyn Runtime> {
        self.runtime_of(rec)
    }

    /// Every runtime, the primary first.
    pub(crate) fn all_runtimes(&self) -> &[Arc<dyn Runtime>] {
        &self.runtimes
    }

    /// What the runtime of sandbox `rec` keeps.
    pub fn capabilities(&self, rec: &Sandbox) -> crate::runtime::Capabilities {
        self.runtime_of(rec).capabilities()
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
        self.ensure_here(id).await?;
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

    /// A runtime's failure of a call on sandbox `id`: [`CoreError::Ending`] (410) when
    /// the sandbox was ended while the call ran (its agent went with it: a delete
    /// racing a file read is not a broken agent), else the failure itself.
    pub(crate) fn failed(&self, id: &str, e: crate::runtime::RuntimeError) -> CoreError {
        if matches!(e, crate::runtime::RuntimeError::Agent { .. }) && self.live(id).is_none() {
            return CoreError::Ending(id.to_owned());
        }
        e.into()
    }

    /// Refuses work on a sandbox that another node (a server on the same database)
    /// runs: its processes and files are on that node.
    pub(crate) async fn ensure_here(&self, id: &str) -> Result<(), CoreError> {
        match self.store.node_of(id).await? {
            Some(node) if node != self.store.node() => {
                let url = self
                    .store
                    .nodes()
                    .await?
                    .into_iter()
                    .find(|n| n.name == node)
                    .map(|n| n.url);
                Err(CoreError::OtherNode {
                    id: id.to_owned(),
                    node,
                    url,
                })
            }
            _ => Ok(()),
        }
    }

    /// Checks that `id` is running (for calls that must fail before they start).
    pub async fn check_running(&self, id: &SandboxRef) -> Result<(), CoreError> {
        let id = id.id();
        self.running_instance(id).await.map(|_| ())
    }

    /// A running sandbox's instance (409 when paused: its agent is frozen).
    async fn running_instance(&self, id: &str) -> Result<Arc<dyn Instance>, CoreError> {
        Ok(self.running_now(id).await?.instance.clone())
    }

    /// A live sandbox that runs now (409 when paused or hibernated).
    async fn running_now(&self, id: &str) -> Result<Arc<Live>, CoreError> {
        let live = self.running(id).await?;
        let status = live.record().status;
        if status != Status::Running {
            return Err(CoreError::WrongState {
                id: id.to_owned(),
                status,
            });
        }
        Ok(live)
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

    /// Number of live sandboxes.
    pub fn live_count(&self) -> usize {
        self.live_map().len()
    }
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
