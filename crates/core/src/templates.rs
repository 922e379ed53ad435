//! Templates built on request (`POST /v1/templates`): Debian packages on a fresh
//! Debian root or layered on an existing template, then setup commands run inside a
//! build sandbox. A build runs in the background (it goes on when the caller hangs
//! up); its progress lines are kept and can be followed from the start by anyone.
//!
//! A build that fails leaves nothing in the runtime; its failure and log stay visible
//! here (status `failed`) until the template is deleted or built again, or the server
//! restarts.

use crate::manager::{valid_template_name, Manager};
use crate::model::ListFilter;
use crate::runtime::{Progress, TemplateInfo, TemplateSpec};
use crate::CoreError;
use futures_util::stream::{BoxStream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

/// The base meaning "Debian from scratch" (mmdebstrap).
pub const DEBIAN_BASE: &str = "debian-bookworm";
/// Most packages, commands and environment variables of one build.
pub const MAX_ITEMS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateStatus {
    Ready,
    Building,
    Failed,
}

impl TemplateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateStatus::Ready => "ready",
            TemplateStatus::Building => "building",
            TemplateStatus::Failed => "failed",
        }
    }
}

/// What is known of a template, built or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: String,
    pub status: TemplateStatus,
    /// [`DEBIAN_BASE`] or the template it was layered on.
    pub base: String,
    /// Packages this template added to its base.
    pub packages: Vec<String>,
    pub run: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// Bytes of its files (built templates, when measured).
    pub size_bytes: Option<u64>,
    /// When it was built (ready) or its build started.
    pub created: OffsetDateTime,
    pub build_seconds: Option<f64>,
    /// Why the build failed.
    pub error: Option<String>,
    /// The OCI image it was imported from.
    pub image: Option<forkbox_types::api::ImageInfo>,
}

/// What an imported template shows as its base.
pub const IMAGE_BASE: &str = "oci-image";

/// A template's base as shown: the template it was layered on, [`IMAGE_BASE`] for an
/// image, else [`DEBIAN_BASE`].
fn shown_base(base: Option<&str>, image: bool) -> String {
    match (base, image) {
        (Some(b), _) => b.to_owned(),
        (None, true) => IMAGE_BASE.to_owned(),
        (None, false) => DEBIAN_BASE.to_owned(),
    }
}

impl Template {
    fn from_info(i: TemplateInfo) -> Template {
        Template {
            name: i.name,
            status: TemplateStatus::Ready,
            base: shown_base(i.base.as_deref(), i.image.is_some()),
            packages: i.packages,
            run: i.run,
            env: i.env,
            workdir: i.workdir,
            size_bytes: i.size_bytes,
            created: i.built_at,
            build_seconds: Some(i.build_seconds),
            error: None,
            image: i.image,
        }
    }
}

/// One event of a build's progress stream; the last one is `Ready` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildEvent {
    Progress(String),
    Ready(Box<Template>),
    Failed(String),
}

/// Builds this server runs or ran (until they succeed or their record is deleted).
#[derive(Default)]
pub(crate) struct Builds {
    map: HashMap<String, Arc<Build>>,
    /// Templates' working directories, as looked up ([`Manager::template_workdir`]);
    /// forgotten when a template of the name is built or deleted.
    workdirs: HashMap<String, Option<String>>,
    /// Names whose image archive is being received (reserved until their build
    /// starts; at most [`MAX_RECEIVING`]).
    receiving: std::collections::HashSet<String>,
}

/// Most image archives received at a time (each up to the API's limit on disk).
pub const MAX_RECEIVING: usize = 2;

struct Build {
    /// What was asked for (base `None`: [`DEBIAN_BASE`]).
    req: TemplateSpec,
    started: OffsetDateTime,
    state: Mutex<BuildState>,
    /// Bumped whenever `state` changes.
    tick: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct BuildState {
    log: Vec<String>,
    outcome: Option<Result<Template, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Build {
    fn push(&self, line: &str) {
        lock(&self.state).log.push(line.to_owned());
        self.tick.send_modify(|t| *t += 1);
    }

    fn finish(&self, outcome: Result<Template, String>) {
        if let Err(e) = &outcome {
            lock(&self.state).log.push(format!("build failed: {e}"));
        }
        lock(&self.state).outcome = Some(outcome);
        self.tick.send_modify(|t| *t += 1);
    }

    fn view(&self) -> Template {
        let st = lock(&self.state);
        let (status, error) = match &st.outcome {
            None => (TemplateStatus::Building, None),
            Some(Ok(t)) => return t.clone(),
            Some(Err(e)) => (TemplateStatus::Failed, Some(e.clone())),
        };
        Template {
            name: self.req.name.clone(),
            status,
            base: shown_base(self.req.base.as_deref(), self.req.image.is_some()),
            packages: self.req.packages.clone(),
            run: self.req.run.clone(),
            env: self.req.env.clone(),
            workdir: self.req.workdir.clone(),
            size_bytes: None,
            created: self.started,
            build_seconds: None,
            error,
            image: None,
        }
    }

    /// The whole log so far, then new lines as they come, then the outcome.
    fn follow(self: Arc<Self>) -> BoxStream<'static, BuildEvent> {
        let rx = self.tick.subscribe();
        futures_util::stream::unfold(
            (self, rx, 0usize, false),
            |(b, mut rx, next, done)| async move {
                if done {
                    return None;
                }
                loop {
                    rx.borrow_and_update();
                    let ev = {
                        let st = lock(&b.state);
                        if let Some(l) = st.log.get(next) {
                            Some((BuildEvent::Progress(l.clone()), next + 1, false))
                        } else {
                            st.outcome.as_ref().map(|o| match o {
                                Ok(t) => (BuildEvent::Ready(Box::new(t.clone())), next, true),
                                Err(e) => (BuildEvent::Failed(e.clone()), next, true),
                            })
                        }
                    };
                    if let Some((ev, next, done)) = ev {
                        return Some((ev, (b, rx, next, done)));
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )
        .boxed()
    }
}

/// Names that cannot be templates are not found (never turned into paths).
fn known_name(name: &str) -> Result<(), CoreError> {
    if valid_template_name(name) {
        Ok(())
    } else {
        Err(CoreError::NoTemplate(name.to_owned()))
    }
}

fn invalid(msg: impl Into<String>) -> CoreError {
    CoreError::Invalid(msg.into())
}

/// A Debian package name (optionally `=version`); never an option.
fn valid_package(p: &str) -> bool {
    let (name, version) = match p.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (p, None),
    };
    let name_ok = name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.len() <= 128
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.~:".contains(&b))
    });
    name_ok && version_ok
}

fn validate(t: &TemplateSpec) -> Result<(), CoreError> {
    if !valid_template_name(&t.name) {
        return Err(invalid(
            "name must be 1-64 characters of a-z, 0-9, '-' and '_'",
        ));
    }
    if t.name == DEBIAN_BASE {
        return Err(invalid(format!("{DEBIAN_BASE} is the name of a base")));
    }
    if t.base.as_deref().is_some_and(|b| !valid_template_name(b)) {
        return Err(invalid(format!(
            "base must be {DEBIAN_BASE} or a template name"
        )));
    }
    if t.base.is_some() && t.image.is_some() {
        return Err(invalid("give a base template or an image, not both"));
    }
    if t.base.as_deref() == Some(t.name.as_str()) {
        return Err(invalid("a template cannot be its own base"));
    }
    if t.packages.len() > MAX_ITEMS || t.run.len() > MAX_ITEMS || t.env.len() > MAX_ITEMS {
        return Err(invalid(format!(
            "at most {MAX_ITEMS} packages, commands and env variables"
        )));
    }
    if let Some(p) = t.packages.iter().find(|p| !valid_package(p)) {
        return Err(invalid(format!("{p:?} is not a Debian package name")));
    }
    if t.run
        .iter()
        .any(|c| c.trim().is_empty() || c.contains('\0'))
    {
        return Err(invalid("run commands must be non-empty and contain no NUL"));
    }
    for (k, v) in &t.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(
                "env names must be non-empty and contain no '=' or NUL; values no NUL",
            ));
        }
    }
    if let Some(w) = &t.workdir {
        if !w.starts_with('/') || w.contains('\0') {
            return Err(invalid("workdir must be an absolute path"));
        }
    }
    if let Some(list) = &t.egress {
        forkbox_types::egress::Allowlist::parse(list)
            .map_err(|e| CoreError::Invalid(e.to_string()))?;
    }
    Ok(())
}

impl Manager {
    fn builds(&self) -> std::sync::MutexGuard<'_, Builds> {
        lock(self.template_builds())
    }

    fn is_recipe(&self, name: &str) -> bool {
        self.config().languages.recipes().contains_key(name)
    }

    /// Starts building a template (`req.base`: `None` or [`DEBIAN_BASE`] for Debian
    /// from scratch) in the background; its progress from the start.
    /// Bad request: `Invalid`; unknown base: `NoTemplate`; name taken: `Conflict`.
    pub async fn build_template(
        self: &Arc<Self>,
        mut req: TemplateSpec,
    ) -> Result<BoxStream<'static, BuildEvent>, CoreError> {
        req.base = req.base.filter(|b| b != DEBIAN_BASE);
        req.egress = req.egress.filter(|l| !l.is_empty());
        validate(&req)?;
        let name = req.name.clone();
        if self.host_stores().template_info(&name).await.is_some() || self.is_recipe(&name) {
            return Err(CoreError::Conflict(format!(
                "template {name} already exists; delete it first"
            )));
        }
        // What the runtime builds: the request, over its base's environment and
        // working directory.
        let mut spec = TemplateSpec {
            env: BTreeMap::new(),
            ..req.clone()
        };
        let mut base_to_prepare = None;
        if let Some(base_name) = &req.base {
            if matches!(self.builds().map.get(base_name), Some(b) if lock(&b.state).outcome.is_none())
            {
                return Err(CoreError::Conflict(format!(
                    "base template {base_name} is still being built"
                )));
            }
            match self.host_stores().template_info(base_name).await {
                Some(base) => {
                    spec.env = base.env;
                    if spec.workdir.is_none() {
                        spec.workdir = base.workdir;
                    }
                }
                None if self.is_recipe(base_name) => base_to_prepare = Some(base_name.clone()),
                None => return Err(CoreError::NoTemplate(base_name.clone())),
            }
        }
        spec.env.extend(req.env.clone());
        let from_archive = matches!(
            req.image.as_deref(),
            Some(crate::runtime::ImageSource::Archive(_))
        );
        let build = Arc::new(Build {
            req,
            started: OffsetDateTime::now_utc(),
            state: Mutex::default(),
            tick: tokio::sync::watch::Sender::new(0),
        });
        {
            let mut b = self.builds();
            // (An import holds its name while its archive arrives; its own build is
            // the one that follows.)
            if b.receiving.contains(&name) && !from_archive {
                return Err(CoreError::Conflict(format!(
                    "template {name} is being built"
                )));
            }
            if let Some(old) = b.map.get(&name) {
                if lock(&old.state).outcome.is_none() {
                    return Err(CoreError::Conflict(format!(
                        "template {name} is being built"
                    )));
                }
            }
            b.map.insert(name.clone(), build.clone());
        }
        let events = build.clone().follow();
        let me = self.clone();
        self.background(async move {
            let b2 = build.clone();
            let progress: Progress = Arc::new(move |l: &str| b2.push(l));
            let res = async {
                if let Some(base) = base_to_prepare {
                    progress(&format!("building base template {base} first"));
                    me.runtime().prepare_template(&base).await?;
                    if let Some(info) = me.host_stores().template_info(&base).await {
                        let mut env = info.env;
                        env.extend(std::mem::take(&mut spec.env));
                        spec.env = env;
                        if spec.workdir.is_none() {
                            spec.workdir = info.workdir;
                        }
                    }
                }
                let built = me.host_stores().build_template(&spec, progress.clone()).await;
                // An imported image's archive is done with, whatever the outcome (the
                // record of a failed build stays; its archive need not).
                if let Some(crate::runtime::ImageSource::Archive(a)) = spec.image.as_deref() {
                    let _ = tokio::fs::remove_file(&a.path).await;
                }
                built
            }
            .await;
            match res {
                Ok(info) => {
                    tracing::info!(template = %name, seconds = info.build_seconds, "template built");
                    // Its recipe, for the other nodes sharing the database to build too
                    // (not one that needs the build context only this node received).
                    let recipe = match build.req.context.is_some()
                        || !build.req.args.is_empty()
                        || build.req.image.is_some()
                    {
                        true => None,
                        false => Some(serde_json::to_string(&build.req)),
                    };
                    match recipe {
                        Some(Ok(spec)) => {
                            if let Err(e) = me.store().record_template(&name, &spec).await {
                                tracing::warn!(template = %name, error = %e, "recording the template's recipe failed");
                            }
                        }
                        Some(Err(e)) => tracing::warn!(template = %name, error = %e, "template recipe not encodable"),
                        None => {}
                    }
                    build.finish(Ok(Template::from_info(info)));
                    // Built: the runtime knows it from now on.
                    let mut b = me.builds();
                    b.workdirs.remove(&name);
                    if b.map.get(&name).is_some_and(|x| Arc::ptr_eq(x, &build)) {
                        b.map.remove(&name);
                    }
                }
                Err(e) => {
                    tracing::warn!(template = %name, error = %e, "template build failed");
                    build.finish(Err(e.to_string()));
                }
            }
        });
        Ok(events)
    }

    /// Starts a template import: the OCI image archive `archive` (an OCI layout or a
    /// `docker save` tar) is received whole into the runtime's upload directory, then
    /// built like a template (its layers applied, digests checked, its `Env` and
    /// `WorkingDir` kept) in the background; its progress from the start. The archive
    /// goes when the build ends. A failing `archive` stream fails the import (the API
    /// bounds its size).
    pub async fn import_template(
        self: &Arc<Self>,
        name: String,
        reference: Option<String>,
        archive: crate::runtime::UploadStream,
    ) -> Result<BoxStream<'static, BuildEvent>, CoreError> {
        use tokio::io::AsyncWriteExt as _;
        let mut spec = TemplateSpec {
            name,
            ..Default::default()
        };
        validate(&spec)?;
        if let Some(r) = &reference {
            if r.is_empty() || r.len() > 256 || r.chars().any(char::is_control) {
                return Err(invalid(
                    "ref must be 1-256 characters without control characters",
                ));
            }
        }
        if self.host_stores().template_info(&spec.name).await.is_some()
            || self.is_recipe(&spec.name)
        {
            return Err(CoreError::Conflict(format!(
                "template {} already exists; delete it first",
                spec.name
            )));
        }
        // The name is held while the archive arrives (another import or build of it
        // is a 409 now, not after gigabytes), and few arrive at once.
        struct Receiving<'a>(&'a Manager, String);
        impl Drop for Receiving<'_> {
            fn drop(&mut self) {
                self.0.builds().receiving.remove(&self.1);
            }
        }
        let _held_name = {
            let mut b = self.builds();
            let building = b
                .map
                .get(&spec.name)
                .is_some_and(|x| lock(&x.state).outcome.is_none());
            if building || b.receiving.contains(&spec.name) {
                return Err(CoreError::Conflict(format!(
                    "template {} is being built",
                    spec.name
                )));
            }
            if b.receiving.len() >= MAX_RECEIVING {
                return Err(CoreError::Quota(format!(
                    "at most {MAX_RECEIVING} image archives are received at a time; try again"
                )));
            }
            b.receiving.insert(spec.name.clone());
            Receiving(self, spec.name.clone())
        };
        let dir = self
            .host_stores()
            .upload_dir()
            .ok_or_else(|| invalid("this server's runtime does not import images"))?;
        let io = |e: std::io::Error| {
            CoreError::Runtime(crate::runtime::RuntimeError::host(
                "receive image archive",
                &dir.display().to_string(),
                e,
            ))
        };
        tokio::fs::create_dir_all(&dir).await.map_err(io)?;
        // (Removed when dropped: on any failure below, or when the build is done.)
        let held = crate::runtime::ImageArchive {
            path: dir.join(format!("{}.tar", crate::ids::new("img"))),
            reference,
        };
        let mut file = tokio::fs::File::create(&held.path).await.map_err(io)?;
        let mut archive = archive;
        while let Some(chunk) = archive.next().await {
            let chunk = chunk.map_err(|e| invalid(format!("receiving the image archive: {e}")))?;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        drop(file);
        spec.image = Some(Arc::new(crate::runtime::ImageSource::Archive(held)));
        self.build_template(spec).await
    }

    /// Where commands in sandboxes of `template` start when they name no directory:
    /// its working directory (a Dockerfile's `WORKDIR`, an image's `WorkingDir`), or
    /// `None` (the agent's default, `/root`).
    pub(crate) async fn template_workdir(&self, template: &str) -> Option<String> {
        if let Some(w) = self.builds().workdirs.get(template) {
            return w.clone();
        }
        let w = self
            .host_stores()
            .template_info(template)
            .await
            .and_then(|i| i.workdir);
        self.builds()
            .workdirs
            .insert(template.to_owned(), w.clone());
        w
    }

    /// Every template: built ones, and those this server is building or failed to build.
    pub async fn templates(&self) -> Vec<Template> {
        let mut out: BTreeMap<String, Template> = self
            .host_stores()
            .templates()
            .await
            .into_iter()
            .map(|i| (i.name.clone(), Template::from_info(i)))
            .collect();
        let builds: Vec<Arc<Build>> = self.builds().map.values().cloned().collect();
        for b in builds {
            let v = b.view();
            out.entry(v.name.clone()).or_insert(v);
        }
        out.into_values().collect()
    }

    /// One template; `NoTemplate` when it is neither built nor being built.
    pub async fn template(&self, name: &str) -> Result<Template, CoreError> {
        known_name(name)?;
        let b = self.builds().map.get(name).cloned();
        if let Some(b) = b {
            let v = b.view();
            if v.status != TemplateStatus::Ready {
                return Ok(v);
            }
        }
        self.host_stores()
            .template_info(name)
            .await
            .map(Template::from_info)
            .ok_or_else(|| CoreError::NoTemplate(name.to_owned()))
    }

    /// The build log of a template (empty when it was built without one kept).
    pub async fn template_log(&self, name: &str) -> Result<String, CoreError> {
        known_name(name)?;
        let b = self.builds().map.get(name).cloned();
        if let Some(b) = b {
            let st = lock(&b.state);
            return Ok(st.log.iter().map(|l| format!("{l}\n")).collect());
        }
        if let Some(log) = self.host_stores().template_log(name).await {
            return Ok(log);
        }
        self.template(name).await.map(|_| String::new())
    }

    /// Follows a build from its start (a finished one replays its log and outcome).
    pub fn follow_build(&self, name: &str) -> Result<BoxStream<'static, BuildEvent>, CoreError> {
        let b = self.builds().map.get(name).cloned();
        b.map(Build::follow)
            .ok_or_else(|| CoreError::NoTemplate(name.to_owned()))
    }

    /// Deletes a template. `Conflict` while it is being built or live sandboxes
    /// (running, paused, hibernated) were made from it; a failed build's record just
    /// goes. Recipe templates may be deleted too: they are rebuilt on next use.
    pub async fn delete_template(&self, name: &str) -> Result<(), CoreError> {
        known_name(name)?;
        {
            let mut b = self.builds();
            let state = b.map.get(name).map(|x| match &lock(&x.state).outcome {
                None => TemplateStatus::Building,
                Some(Err(_)) => TemplateStatus::Failed,
                Some(Ok(_)) => TemplateStatus::Ready,
            });
            match state {
                Some(TemplateStatus::Building) => {
                    return Err(CoreError::Conflict(format!(
                        "template {name} is being built"
                    )))
                }
                Some(TemplateStatus::Failed) => {
                    b.map.remove(name);
                    return Ok(());
                }
                _ => {}
            }
        }
        if self.host_stores().template_info(name).await.is_none() {
            return Err(CoreError::NoTemplate(name.to_owned()));
        }
        let (users, _) = self
            .store()
            .list_sandboxes(&ListFilter {
                template: Some(name.to_owned()),
                status: None,
                all: false,
                limit: 5,
                after: None,
                workspace: None,
            })
            .await?;
        if !users.is_empty() {
            let ids: Vec<&str> = users.iter().map(|s| s.id.as_str()).collect();
            return Err(CoreError::Conflict(format!(
                "template {name} is used by live sandboxes ({}); delete them first",
                ids.join(", ")
            )));
        }
        self.host_stores().delete_template(name).await?;
        {
            let mut b = self.builds();
            b.map.remove(name);
            b.workdirs.remove(name);
        }
        self.store().forget_template(name).await?;
        tracing::info!(template = %name, "template deleted");
        Ok(())
    }
}

impl Manager {
    /// Builds, in the background, the templates other nodes built through the API
    /// that this node lacks (from the recipe they recorded), one at a time; a failed
    /// build is not retried until the template is deleted.
    pub async fn sync_templates(self: &Arc<Self>) {
        let recipes = match self.store().template_recipes().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading template recipes failed");
                return;
            }
        };
        if self
            .builds()
            .map
            .values()
            .any(|b| lock(&b.state).outcome.is_none())
        {
            return;
        }
        for (name, spec) in recipes {
            if self.builds().map.contains_key(&name)
                || self.host_stores().template_info(&name).await.is_some()
            {
                continue;
            }
            let spec: TemplateSpec = match serde_json::from_str(&spec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(template = %name, error = %e, "unreadable template recipe");
                    continue;
                }
            };
            tracing::info!(template = %name, "building a template another node built");
            if let Err(e) = self.build_template(spec).await {
                tracing::warn!(template = %name, error = %e, "building another node's template failed to start");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_are_checked() {
        for ok in ["jq", "python3-pip", "g++", "libc6=2.36-9+deb12u4", "lib.x"] {
            assert!(valid_package(ok), "{ok}");
        }
        for bad in ["", "j", "-oAPT::x=1", "Jq", "jq;rm", "a b", "jq=", "x/y"] {
            assert!(!valid_package(bad), "{bad}");
        }
    }

    #[test]
    fn requests_are_validated() {
        let ok = TemplateSpec {
            name: "t1".into(),
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            TemplateSpec {
                name: "Bad Name".into(),
                ..ok.clone()
            },
            TemplateSpec {
                name: DEBIAN_BASE.into(),
                ..ok.clone()
            },
            TemplateSpec {
                base: Some("t1".into()),
                ..ok.clone()
            },
            TemplateSpec {
                base: Some("Bad Base".into()),
                ..ok.clone()
            },
            TemplateSpec {
                run: vec![" ".into()],
                ..ok.clone()
            },
            TemplateSpec {
                workdir: Some("rel".into()),
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(validate(&bad), Err(CoreError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
