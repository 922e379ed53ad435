//! The one-shot runner (`/api/v1/execute`): code in a language of `languages.toml`
//! runs in a fresh throw-away sandbox of the language's template, taken from a warm
//! pool when one is kept, and destroyed afterwards.

use crate::access::SandboxRef;
use crate::languages::Language;
use crate::manager::{Manager, EXIT_UNKNOWN};
use crate::model::{CreateRequest, ExecCommand, Work};
use crate::CoreError;
use forkbox_types::exec::{EventKind, ExecEvent};
use futures_util::stream::{BoxStream, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Workspace of the runner's own sandboxes: no key can name it (`@` is not allowed in
/// workspace names), so they are never listed or touched through the API.
pub const RUNNER_WORKSPACE: &str = "@runner";
/// Where the code is written and commands run, inside the sandbox.
pub const RUN_DIR: &str = "/tmp";
/// Most bytes of stdout (and of stderr) kept in one answer.
pub const MAX_OUTPUT: usize = 1 << 20;
/// Longest run.
pub const MAX_TIMEOUT_S: u64 = 600;
/// Ready sandboxes kept per warmed template unless asked otherwise.
pub const DEFAULT_WARM: usize = 2;

/// Output of a command, collected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// Collects an exec's events, keeping at most [`MAX_OUTPUT`] bytes of each stream (a
/// note on stderr says when output was cut).
pub async fn collect(events: BoxStream<'static, ExecEvent>) -> Collected {
    collect_except(events, |_| false).await
}

/// [`collect`], but the stdout lines `aside` takes (returns true for) are left out of
/// the output, however much came before them (a helper's answer line).
pub async fn collect_except(
    mut events: BoxStream<'static, ExecEvent>,
    mut aside: impl FnMut(&str) -> bool,
) -> Collected {
    let mut c = Collected {
        exit_code: EXIT_UNKNOWN,
        ..Default::default()
    };
    let (mut cut_out, mut cut_err) = (false, false);
    while let Some(ev) = events.next().await {
        match ev.kind {
            EventKind::Stdout(d) if aside(&d) => {}
            EventKind::Stdout(d) => push_capped(&mut c.stdout, &d, &mut cut_out),
            EventKind::Stderr(d) => push_capped(&mut c.stderr, &d, &mut cut_err),
            EventKind::Exit(code) => c.exit_code = code,
        }
    }
    for (cut, name) in [(cut_out, "stdout"), (cut_err, "stderr")] {
        if cut {
            c.stderr
                .push_str(&format!("forkbox: {name} was cut at {MAX_OUTPUT} bytes\n"));
        }
    }
    c
}

/// Appends `s` to `buf` up to [`MAX_OUTPUT`] bytes in all (cut on a character
/// boundary); `cut` says whether anything was left out.
pub fn push_capped(buf: &mut String, s: &str, cut: &mut bool) {
    if buf.len() + s.len() <= MAX_OUTPUT {
        buf.push_str(s);
        return;
    }
    let mut room = MAX_OUTPUT.saturating_sub(buf.len());
    while room > 0 && !s.is_char_boundary(room) {
        room -= 1;
    }
    buf.push_str(&s[..room]);
    *cut = true;
}

/// One execute call.
#[derive(Debug, Clone)]
pub struct Execute {
    pub language: String,
    pub code: String,
    /// Seconds for compile and run together.
    pub timeout_s: u64,
}

/// Its answer.
#[derive(Debug, Clone)]
pub struct Executed {
    pub language: String,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    /// Time to a ready sandbox.
    pub load: Duration,
    /// Time writing, compiling and running the code.
    pub exec: Duration,
}

/// Which warm pool: the runner's of a language's template, or create's of a template
/// (crate::warm). Pool sandboxes live in a workspace no key can name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) workspace: &'static str,
    pub(crate) template: String,
}

impl PoolKey {
    pub(crate) fn runner(template: &str) -> PoolKey {
        PoolKey {
            workspace: RUNNER_WORKSPACE,
            template: template.to_owned(),
        }
    }
}

/// Takes from a pool this close together are one burst.
pub const BURST_GAP: Duration = Duration::from_secs(1);
/// How long a pool remembers its largest burst (and stays that big).
pub const DEMAND_MEMORY: Duration = Duration::from_secs(300);
/// The pause in takes a pool's makers wait for while it still holds its configured
/// size.
pub const QUIET: Duration = Duration::from_millis(50);
/// Sandboxes a pool makes at once (one per core here).
const MAKERS: usize = 2;

/// How a pool is asked for: the burst going on and the largest recent one. A pool
/// keeps as many ready as its largest burst of the last [`DEMAND_MEMORY`] took (within
/// its ceiling), so the next burst like it finds them ready.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Demand {
    last: Instant,
    run: usize,
    peak: usize,
    peak_at: Instant,
}

impl Demand {
    fn new(now: Instant) -> Demand {
        Demand {
            last: now,
            run: 0,
            peak: 0,
            peak_at: now,
        }
    }

    /// A take (ready or not) at `now`.
    pub(crate) fn take(&mut self, now: Instant) {
        self.run = if now.duration_since(self.last) <= BURST_GAP {
            self.run + 1
        } else {
            1
        };
        self.last = now;
        if self.run >= self.peak || now.duration_since(self.peak_at) > DEMAND_MEMORY {
            self.peak = self.run;
            self.peak_at = now;
        }
    }

    /// How many to keep ready at `now`: `floor`, or the largest recent burst up to
    /// `ceiling`.
    pub(crate) fn want(&self, floor: usize, ceiling: usize, now: Instant) -> usize {
        if floor == 0 {
            return 0;
        }
        let recent = if now.duration_since(self.peak_at) <= DEMAND_MEMORY {
            self.peak
        } else {
            0
        };
        recent.min(ceiling).max(floor)
    }
}

/// Sandboxes kept ready per pool, and how many to keep.
#[derive(Default)]
pub(crate) struct Warm {
    ready: HashMap<PoolKey, VecDeque<String>>,
    /// The configured size of each pool: it never keeps fewer (0: off).
    target: HashMap<PoolKey, usize>,
    demand: HashMap<PoolKey, Demand>,
    /// Commands run in a new pool sandbox before it counts as ready.
    warmups: HashMap<PoolKey, Vec<Work>>,
    /// Pool sandboxes being made right now.
    pending: HashMap<PoolKey, usize>,
    /// Makers ([`Manager::refill`]) running per pool.
    makers: HashMap<PoolKey, usize>,
    /// Templates being built in the background, with the last failure if any.
    pub(crate) building: HashMap<String, Option<String>>,
}

impl Warm {
    /// Ready sandboxes of pool `key`.
    fn ready_len(&self, key: &PoolKey) -> usize {
        self.ready.get(key).map_or(0, VecDeque::len)
    }

    /// Ready and being made.
    fn have(&self, key: &PoolKey) -> usize {
        self.ready_len(key) + self.pending.get(key).copied().unwrap_or(0)
    }

    /// How many pool `key` keeps ready now.
    fn want(&self, key: &PoolKey, ceiling: usize, now: Instant) -> usize {
        let floor = self.target.get(key).copied().unwrap_or(0);
        // The runner's pools (warm REPLs, ~18 MiB each) keep their configured size.
        if key.workspace != crate::warm::POOL_WORKSPACE {
            return floor;
        }
        self.demand
            .get(key)
            .map_or(floor, |d| d.want(floor, ceiling.max(floor), now))
    }
}

fn lock(m: &Mutex<Warm>) -> std::sync::MutexGuard<'_, Warm> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The state of a language's template.
#[derive(Debug, Clone, PartialEq)]
pub enum RootfsState {
    Ready(Box<crate::runtime::TemplateInfo>),
    Building,
    Failed(String),
    Missing,
}

/// A warm pool's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPool {
    pub template: String,
    pub ready: usize,
    /// Its configured size.
    pub target: usize,
    /// What it keeps now: `target`, or more after a burst of takes.
    pub keeping: usize,
}

impl Manager {
    /// A language by name or alias, or `NoLanguage`.
    pub fn language(&self, name: &str) -> Result<Language, CoreError> {
        self.config()
            .languages
            .find(name)
            .cloned()
            .ok_or_else(|| CoreError::NoLanguage(name.to_owned()))
    }

    /// Every language, in file order.
    pub fn languages(&self) -> Vec<Language> {
        self.config().languages.all().to_vec()
    }

    /// Whether `lang`'s template is built, being built, or neither.
    pub async fn rootfs_state(&self, lang: &Language) -> RootfsState {
        if let Some(info) = self.host_stores().template_info(&lang.template).await {
            return RootfsState::Ready(Box::new(info));
        }
        match lock(self.warm()).building.get(&lang.template) {
            Some(None) => RootfsState::Building,
            Some(Some(e)) => RootfsState::Failed(e.clone()),
            None => RootfsState::Missing,
        }
    }

    /// Starts building `lang`'s template in the background unless it is built or being
    /// built; true when a build was started.
    pub fn build_rootfs(self: &Arc<Self>, lang: &Language) -> bool {
        let t = lang.template.clone();
        {
            let mut w = lock(self.warm());
            if matches!(w.building.get(&t), Some(None)) {
                return false;
            }
            w.building.insert(t.clone(), None);
        }
        let me = self.clone();
        self.background(async move {
            let res = me.runtime().prepare_template(&t).await;
            let mut w = lock(me.warm());
            match res {
                Ok(()) => {
                    w.building.remove(&t);
                }
                Err(e) => {
                    tracing::error!(template = %t, error = %e, "template build failed");
                    w.building.insert(t, Some(e.to_string()));
                }
            }
        });
        true
    }

    /// Keeps `n` ready sandboxes of `lang`'s template for execute (0 stops).
    pub fn warm_up(self: &Arc<Self>, lang: &Language, n: usize) {
        let key = PoolKey::runner(&lang.template);
        {
            let mut w = lock(self.warm());
            w.target.insert(key.clone(), n);
            let works = w.warmups.entry(key.clone()).or_default();
            let mut add = |work: Work| {
                if !works.contains(&work) {
                    works.push(work);
                }
            };
            add(Work::Command(lang.warmup_command().to_owned()));
            // A kernel language's kernel is started too (`Language::kernel`).
            if let Some(language) = lang.kernel {
                add(Work::Code {
                    language,
                    code: "pass".into(),
                });
            }
        }
        self.refill(&key);
    }

    /// Keeps `n` ready sandboxes in pool `key` (0 stops), without warm-up commands.
    pub(crate) fn keep_ready(self: &Arc<Self>, key: PoolKey, n: usize) {
        lock(self.warm()).target.insert(key.clone(), n);
        self.refill(&key);
    }

    /// The runner's warm pools and their fill.
    pub fn warm_pools(&self) -> Vec<WarmPool> {
        self.pools_of(RUNNER_WORKSPACE)
    }

    pub(crate) fn pools_of(&self, workspace: &str) -> Vec<WarmPool> {
        let now = Instant::now();
        let w = lock(self.warm());
        let mut v: Vec<WarmPool> = w
            .target
            .iter()
            .filter(|(k, _)| k.workspace == workspace)
            .map(|(k, n)| WarmPool {
                template: k.template.clone(),
                ready: w.ready_len(k),
                target: *n,
                keeping: w.want(k, self.config().warm_pool_max, now),
            })
            .collect();
        v.sort_by(|a, b| a.template.cmp(&b.template));
        v
    }

    /// Tops up pool `key` in the background, never blocking a request.
    pub(crate) fn refill(self: &Arc<Self>, key: &PoolKey) {
        {
            let mut w = lock(self.warm());
            let makers = w.makers.entry(key.clone()).or_default();
            if *makers >= MAKERS {
                return;
            }
            *makers += 1;
        }
        let me = self.clone();
        let key = key.clone();
        self.background(async move {
            me.make_ready(&key).await;
            if let Some(m) = lock(me.warm()).makers.get_mut(&key) {
                *m = m.saturating_sub(1);
            }
        });
    }

    /// One maker of pool `key`: makes sandboxes until the pool holds what it wants.
    /// While a burst of takes goes on and the pool still holds its configured size,
    /// it waits for a pause of [`QUIET`]: making a sandbox takes a core, and the
    /// burst's hand-overs need them more.
    async fn make_ready(self: &Arc<Self>, key: &PoolKey) {
        loop {
            if self.closing() {
                return;
            }
            let pause = {
                let mut w = lock(self.warm());
                let now = Instant::now();
                let ready = w.ready_len(key);
                if w.want(key, self.config().warm_pool_max, now) <= w.have(key) {
                    return;
                }
                let floor = w.target.get(key).copied().unwrap_or(0);
                let since = w.demand.get(key).map(|d| now.duration_since(d.last));
                match since {
                    Some(s) if s < QUIET && ready >= floor.max(1) => Some(QUIET - s),
                    _ => {
                        *w.pending.entry(key.clone()).or_default() += 1;
                        None
                    }
                }
            };
            if let Some(p) = pause {
                tokio::time::sleep(p).await;
                continue;
            }
            let done = |w: &mut Warm| {
                if let Some(p) = w.pending.get_mut(key) {
                    *p = p.saturating_sub(1);
                }
            };
            let req = self.pool_request(key, self.config().max_timeout_s);
            let s = match self.create(req).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(template = %key.template, pool = key.workspace, error = %e, "warm pool refill");
                    done(&mut lock(self.warm()));
                    return;
                }
            };
            let warmups = lock(self.warm())
                .warmups
                .get(key)
                .cloned()
                .unwrap_or_default();
            for work in warmups {
                // A REPL keeps its own directory.
                let cwd = matches!(work, Work::Command(_)).then(|| RUN_DIR.to_owned());
                let run = ExecCommand {
                    work,
                    cwd,
                    env: Default::default(),
                    timeout: Some(30.0),
                };
                if let Ok(events) = self.exec(&SandboxRef::internal(&s.id), run).await {
                    collect(events).await;
                }
            }
            let mut w = lock(self.warm());
            done(&mut w);
            w.ready.entry(key.clone()).or_default().push_back(s.id);
        }
    }

    fn pool_request(&self, key: &PoolKey, timeout_s: u64) -> CreateRequest {
        CreateRequest {
            template: Some(key.template.clone()),
            timeout: Some(timeout_s),
            workspace: key.workspace.to_owned(),
            ..Default::default()
        }
    }

    /// The id of a ready sandbox from pool `key`, if one is there (a refill starts).
    /// It may have ended meanwhile: callers check.
    /// Every take counts towards the pool's demand, found ready or not: a burst
    /// grows create's pool up to `warm_pool_max` (refilled by [`MAKERS`] at once,
    /// after the burst while it still holds its configured size), and it shrinks
    /// back ([`Manager::trim_pools`]) once no such burst came for [`DEMAND_MEMORY`].
    pub(crate) fn take_ready(self: &Arc<Self>, key: &PoolKey) -> Option<String> {
        let now = Instant::now();
        let (id, short) = {
            let mut w = lock(self.warm());
            // A pool turned off learns nothing.
            if w.target.get(key).is_some_and(|n| *n > 0) {
                w.demand
                    .entry(key.clone())
                    .or_insert_with(|| Demand::new(now))
                    .take(now);
            }
            let id = w.ready.get_mut(key).and_then(VecDeque::pop_front);
            let want = w.want(key, self.config().warm_pool_max, now);
            (id, want.saturating_sub(w.have(key)))
        };
        for _ in 0..short.min(MAKERS) {
            self.refill(key);
        }
        id
    }

    /// Ends the ready sandboxes pools keep beyond what they want now (a burst they
    /// grew for is forgotten); the reaper calls it.
    pub async fn trim_pools(&self) {
        let now = Instant::now();
        let extra: Vec<String> = {
            let mut w = lock(self.warm());
            let wants: Vec<(PoolKey, usize)> = w
                .ready
                .keys()
                .map(|k| (k.clone(), w.want(k, self.config().warm_pool_max, now)))
                .collect();
            let mut extra = Vec::new();
            for (k, want) in wants {
                if let Some(q) = w.ready.get_mut(&k) {
                    while q.len() > want {
                        if let Some(id) = q.pop_back() {
                            extra.push(id);
                        }
                    }
                }
            }
            extra
        };
        for id in extra {
            if let Err(e) = self.delete(&SandboxRef::internal(&id)).await {
                tracing::warn!(sandbox = %id, error = %e, "trimming a warm pool");
            }
        }
    }

    /// A ready sandbox of `template` from its warm pool, if one is there and alive.
    async fn take_warm(self: &Arc<Self>, template: &str, timeout_s: u64) -> Option<String> {
        let key = PoolKey::runner(template);
        loop {
            let id = self.take_ready(&key)?;
            if self
                .set_timeout(&SandboxRef::internal(&id), timeout_s)
                .await
                .is_ok()
            {
                return Some(id);
            }
        }
    }

    /// Runs `req` in a throw-away sandbox. Unknown language: `NoLanguage`; template not
    /// built: a build starts and the call answers `Conflict` (try again when built).
    pub async fn execute(self: &Arc<Self>, req: Execute) -> Result<Executed, CoreError> {
        let lang = self.language(&req.language)?;
        if req.timeout_s == 0 || req.timeout_s > MAX_TIMEOUT_S {
            return Err(CoreError::Invalid(format!(
                "timeout must be between 1 and {MAX_TIMEOUT_S} seconds"
            )));
        }
        if req.code.contains('\0') {
            return Err(CoreError::Invalid("code must not contain NUL".into()));
        }
        if self
            .host_stores()
            .template_info(&lang.template)
            .await
            .is_none()
        {
            let started = self.build_rootfs(&lang);
            return Err(CoreError::Conflict(format!(
                "the rootfs of {} (template {}) is not built yet; {} — see GET /api/v1/rootfs",
                lang.name,
                lang.template,
                if started {
                    "its build started now"
                } else {
                    "it is being built"
                }
            )));
        }
        let t0 = Instant::now();
        let life = req.timeout_s + 60;
        let key = PoolKey::runner(&lang.template);
        let (id, in_kernel) = match self.take_warm(&lang.template, life).await {
            // Its kernel already runs when the pool started it (`Language::kernel`).
            Some(id) => {
                let warmed = lock(self.warm()).warmups.get(&key).is_some_and(|ws| {
                    ws.iter().any(|w| {
                        matches!(w, Work::Code { language, .. } if Some(*language) == lang.kernel)
                    })
                });
                (id, warmed)
            }
            None => (self.create(self.pool_request(&key, life)).await?.id, false),
        };
        let load = t0.elapsed();
        let out = self.run_in(&id, &lang, &req, in_kernel).await;
        let exec = t0.elapsed() - load;
        let me = self.clone();
        self.background(async move {
            if let Err(e) = me.delete(&SandboxRef::internal(&id)).await {
                tracing::warn!(sandbox = %id, error = %e, "delete after execute");
            }
            // No client can name a runner sandbox: its events would only take memory.
            me.events().forget(&id);
        });
        let out = out?;
        Ok(Executed {
            language: lang.name,
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
            load,
            exec,
        })
    }

    async fn run_in(
        &self,
        id: &str,
        lang: &Language,
        req: &Execute,
        in_kernel: bool,
    ) -> Result<Collected, CoreError> {
        let path = format!("{RUN_DIR}/{}", lang.file_name());
        let code = bytes::Bytes::from(req.code.clone().into_bytes());
        self.write_file(
            &SandboxRef::internal(id),
            &path,
            futures_util::stream::once(async move { Ok(code) }).boxed(),
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(req.timeout_s);
        let sh = |cmd: &str| ExecCommand {
            work: Work::Command(cmd.to_owned()),
            cwd: Some(RUN_DIR.to_owned()),
            env: Default::default(),
            timeout: Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
                    .max(0.001),
            ),
        };
        let mut built = Collected::default();
        if let Some(compile) = &lang.compile {
            built = collect(self.exec(&SandboxRef::internal(id), sh(compile)).await?).await;
            if built.exit_code != 0 {
                return Ok(built);
            }
        }
        let run = match (
            in_kernel,
            lang.kernel,
            lang.kernel_cell(RUN_DIR, &lang.file_name()),
        ) {
            (true, Some(language), Some(code)) => ExecCommand {
                work: Work::Code { language, code },
                cwd: None,
                ..sh("")
            },
            _ => sh(&lang.run),
        };
        let mut ran = collect(self.exec(&SandboxRef::internal(id), run).await?).await;
        // Compiler warnings come first, as a terminal would show them.
        built.stdout.push_str(&ran.stdout);
        built.stderr.push_str(&ran.stderr);
        ran.stdout = built.stdout;
        ran.stderr = built.stderr;
        Ok(ran)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_capped_on_a_char_boundary() {
        let mut buf = "x".repeat(MAX_OUTPUT - 1);
        let mut cut = false;
        push_capped(&mut buf, "é", &mut cut);
        assert!(cut);
        assert_eq!(buf.len(), MAX_OUTPUT - 1);
        let mut small = String::new();
        let mut cut2 = false;
        push_capped(&mut small, "hi", &mut cut2);
        assert_eq!((small.as_str(), cut2), ("hi", false));
    }

    #[test]
    fn a_pool_grows_to_its_largest_recent_burst_then_shrinks_back() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut d = Demand::new(t0);
        assert_eq!(d.want(2, 32, t0), 2);
        // 30 takes 2 ms apart: one burst of 30.
        for i in 0..30 {
            d.take(ms(i * 2));
        }
        assert_eq!(d.want(2, 32, ms(100)), 30);
        assert_eq!(d.want(2, 16, ms(100)), 16, "the ceiling bounds it");
        assert_eq!(d.want(0, 32, ms(100)), 0, "a pool turned off stays off");
        // Takes more than a second apart are bursts of one: the peak stays.
        d.take(ms(5_000));
        d.take(ms(10_000));
        assert_eq!(d.want(2, 32, ms(10_000)), 30);
        // Remembered for DEMAND_MEMORY after the burst, then back to the floor.
        let later = ms(60) + DEMAND_MEMORY + Duration::from_secs(1);
        assert_eq!(d.want(2, 32, later), 2);
        // A new burst after that sets a new, smaller peak.
        for i in 0..5 {
            d.take(later + Duration::from_millis(i * 10));
        }
        assert_eq!(d.want(2, 32, later + Duration::from_secs(1)), 5);
    }
}
