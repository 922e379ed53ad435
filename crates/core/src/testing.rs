//! A runtime without sandboxes, so core and the HTTP layer can be tested as an ordinary
//! user (feature `testing`): instances are records in memory, `exec` echoes its
//! command, fork, hibernate/wake and adoption work, and a test can make an instance
//! die, hold creates of the `slow` template until released, or make adoption fail.

use crate::runtime::{
    AgentEvents, CreateSpec, Forked, HostStores, Instance, Progress, Runtime, RuntimeError,
    TemplateInfo, TemplateSpec,
};
use async_trait::async_trait;
use forkbox_types::agent::{AgentEvent, ExecRequest, RunCodeRequest};
use futures_util::StreamExt as _;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Templates the fake runtime knows (`slow`: creates wait for [`FakeRuntime::release`]).
pub const TEMPLATES: [&str; 2] = ["python", "slow"];

/// The pid every fake instance reports (recorded, then given back to `adopt`).
pub const FAKE_PID: i32 = 4242;

pub struct FakeRuntime {
    instances: Mutex<HashMap<String, Arc<FakeInstance>>>,
    slow: tokio::sync::Semaphore,
    adopt_fails: AtomicBool,
    creates: AtomicUsize,
    /// Milliseconds each destroy takes.
    destroy_ms: std::sync::atomic::AtomicU64,
    /// Templates built through [`HostStores::build_template`].
    built: Mutex<HashMap<String, TemplateInfo>>,
    /// Volumes made, with their size in MiB.
    volumes: Mutex<HashMap<String, u64>>,
}

impl FakeRuntime {
    pub fn new() -> Arc<FakeRuntime> {
        Arc::new(FakeRuntime {
            instances: Mutex::new(HashMap::new()),
            slow: tokio::sync::Semaphore::new(0),
            adopt_fails: AtomicBool::new(false),
            creates: AtomicUsize::new(0),
            destroy_ms: std::sync::atomic::AtomicU64::new(0),
            built: Mutex::new(HashMap::new()),
            volumes: Mutex::new(HashMap::new()),
        })
    }

    /// Makes every destroy take `ms` milliseconds (work that outlives a request).
    pub fn set_destroy_ms(&self, ms: u64) {
        self.destroy_ms.store(ms, Ordering::SeqCst);
    }

    /// Lets `n` waiting (or future) creates of `slow` through.
    pub fn release(&self, n: usize) {
        self.slow.add_permits(n);
    }

    /// Whether `adopt` fails (the processes did not survive).
    pub fn set_adopt_fails(&self, fails: bool) {
        self.adopt_fails.store(fails, Ordering::SeqCst);
    }

    /// The instance of runtime resource `id`.
    pub fn instance(&self, id: &str) -> Option<Arc<FakeInstance>> {
        self.lock().get(id).cloned()
    }

    /// How many instances are running.
    pub fn running(&self) -> usize {
        self.lock()
            .values()
            .filter(|i| i.alive.load(Ordering::SeqCst))
            .count()
    }

    /// Creates started so far.
    pub fn creates(&self) -> usize {
        self.creates.load(Ordering::SeqCst)
    }

    fn is_built(&self, name: &str) -> bool {
        lock(&self.built).contains_key(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<FakeInstance>>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(self: &Arc<Self>, id: &str) -> Arc<FakeInstance> {
        let inst = Arc::new(FakeInstance {
            id: id.to_owned(),
            alive: AtomicBool::new(true),
            runtime: Arc::downgrade(self),
        });
        self.lock().insert(id.to_owned(), inst.clone());
        inst
    }
}

/// A fake runtime as the trait object the manager takes.
pub struct Fake(pub Arc<FakeRuntime>);

#[async_trait]
impl Runtime for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn prepare_template(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn create(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError> {
        if !TEMPLATES.contains(&spec.template.as_str()) && !self.0.is_built(&spec.template) {
            return Err(RuntimeError::UnknownTemplate(spec.template.clone()));
        }
        self.0.creates.fetch_add(1, Ordering::SeqCst);
        if spec.template == "slow" {
            let permit = self.0.slow.acquire().await;
            if let Ok(p) = permit {
                p.forget();
            }
        }
        Ok(self.0.start(&spec.id))
    }
    async fn wake(&self, spec: &CreateSpec) -> Result<Arc<dyn Instance>, RuntimeError> {
        Ok(self.0.start(&spec.id))
    }
    async fn adopt(
        &self,
        spec: &CreateSpec,
        host_pid: i32,
        _paused: bool,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        if self.0.adopt_fails.load(Ordering::SeqCst) || host_pid != FAKE_PID {
            return Err(RuntimeError::Unavailable("its processes are gone".into()));
        }
        Ok(self.0.start(&spec.id))
    }
    async fn cleanup(&self, id: &str) -> Result<(), RuntimeError> {
        self.0.lock().remove(id);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A template as the fake keeps it.
fn fake_template(name: &str, spec: Option<&TemplateSpec>) -> TemplateInfo {
    TemplateInfo {
        name: name.to_owned(),
        size_bytes: None,
        packages: spec.map(|s| s.packages.clone()).unwrap_or_default(),
        built_at: time::OffsetDateTime::UNIX_EPOCH,
        path: format!("/fake/templates/{name}"),
        base: spec.and_then(|s| s.base.clone()),
        run: spec.map(|s| s.run.clone()).unwrap_or_default(),
        env: spec.map(|s| s.env.clone()).unwrap_or_default(),
        workdir: spec.and_then(|s| s.workdir.clone()),
        build_seconds: 0.0,
        image: None,
    }
}

/// In memory: the fixed [`TEMPLATES`] and what was built; volumes as sizes; snapshots
/// have no storage of their own.
#[async_trait]
impl HostStores for Fake {
    async fn template_info(&self, template: &str) -> Option<TemplateInfo> {
        if TEMPLATES.contains(&template) {
            return Some(fake_template(template, None));
        }
        lock(&self.0.built).get(template).cloned()
    }
    async fn templates(&self) -> Vec<TemplateInfo> {
        let mut all: Vec<TemplateInfo> = TEMPLATES.iter().map(|t| fake_template(t, None)).collect();
        all.extend(lock(&self.0.built).values().cloned());
        all
    }
    async fn build_template(
        &self,
        spec: &TemplateSpec,
        progress: Progress,
    ) -> Result<TemplateInfo, RuntimeError> {
        for cmd in &spec.run {
            progress(&format!("$ {cmd}"));
        }
        let info = fake_template(&spec.name, Some(spec));
        lock(&self.0.built).insert(spec.name.clone(), info.clone());
        Ok(info)
    }
    async fn template_log(&self, template: &str) -> Option<String> {
        self.0.is_built(template).then(String::new)
    }
    async fn delete_template(&self, template: &str) -> Result<(), RuntimeError> {
        match lock(&self.0.built).remove(template) {
            Some(_) => Ok(()),
            None => Err(RuntimeError::UnknownTemplate(template.to_owned())),
        }
    }
    async fn create_volume(&self, id: &str, size_mb: u64) -> Result<(), RuntimeError> {
        lock(&self.0.volumes).insert(id.to_owned(), size_mb);
        Ok(())
    }
    async fn delete_volume(&self, id: &str) -> Result<(), RuntimeError> {
        lock(&self.0.volumes).remove(id);
        Ok(())
    }
    async fn volume_used(&self, id: &str) -> Option<u64> {
        lock(&self.0.volumes).get(id).map(|_| 0)
    }
    async fn delete_snapshot(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn detach_volume(&self, id: &str, _: bool) -> Result<std::path::PathBuf, RuntimeError> {
        Ok(std::path::PathBuf::from(crate::volumes::image_file(id)))
    }
}

pub struct FakeInstance {
    id: String,
    alive: AtomicBool,
    runtime: std::sync::Weak<FakeRuntime>,
}

impl FakeInstance {
    /// Its processes die (the reaper should notice).
    pub fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }
}

#[async_trait]
impl Instance for FakeInstance {
    fn host_pid(&self) -> Option<i32> {
        Some(FAKE_PID)
    }
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
    fn oom_kills(&self) -> u64 {
        0
    }
    async fn exec(&self, req: ExecRequest) -> Result<AgentEvents, RuntimeError> {
        if req.cmd == "die" {
            // The agent vanishes mid-stream.
            let s = futures_util::stream::iter(vec![
                Ok(AgentEvent::Stdout {
                    data: "partial\n".into(),
                }),
                Err(RuntimeError::Agent {
                    id: self.id.clone(),
                    source: "connection reset".into(),
                }),
            ]);
            return Ok(s.boxed());
        }
        let s = futures_util::stream::iter(vec![
            Ok(AgentEvent::Stdout {
                data: format!("{}\n", req.cmd),
            }),
            Ok(AgentEvent::Exit {
                code: 0,
                signal: None,
                timed_out: false,
                oom_kills: None,
            }),
        ]);
        Ok(s.boxed())
    }
    async fn run_code(&self, req: RunCodeRequest) -> Result<AgentEvents, RuntimeError> {
        self.exec(ExecRequest {
            cmd: req.code,
            ..Default::default()
        })
        .await
    }
    async fn pause(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn resume(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn fork(&self, children: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        let rt = self
            .runtime
            .upgrade()
            .ok_or_else(|| RuntimeError::Unavailable("runtime gone".into()))?;
        Ok(Forked {
            children: children
                .iter()
                .map(|c| rt.start(&c.id) as Arc<dyn Instance>)
                .collect(),
            carried: vec!["filesystem".into()],
            not_carried: "processes".into(),
        })
    }
    async fn hibernate(&self) -> Result<(), RuntimeError> {
        self.alive.store(false, Ordering::SeqCst);
        Ok(())
    }
    async fn snapshot(&self, _: &str, _: bool) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn destroy(&self) -> Result<(), RuntimeError> {
        let ms = self
            .runtime
            .upgrade()
            .map_or(0, |rt| rt.destroy_ms.load(Ordering::SeqCst));
        if ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        self.alive.store(false, Ordering::SeqCst);
        if let Some(rt) = self.runtime.upgrade() {
            rt.lock().remove(&self.id);
        }
        Ok(())
    }
}
