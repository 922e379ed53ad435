//! Templates built on request: a root filesystem made by mmdebstrap (base
//! `debian-bookworm`) or a writable btrfs snapshot of the base template (layering),
//! then, when there is anything to run, a *build sandbox* on that filesystem:
//!
//! - packages on a template base are installed with the template's own apt, by a
//!   process that joins the build sandbox's namespaces and cgroup (root of the
//!   sandbox's user namespace only, inside its pivoted root, network only through the
//!   egress proxy admitting the Debian mirrors) — never by host root in a chroot, since
//!   a template's binaries may have been written by earlier build commands;
//! - the `run` commands (a Dockerfile's steps) run in order, each entered the same way
//!   and confined by `forkbox-agent confine` — seccomp, `no_new_privs`, a container
//!   build's capabilities of the sandbox's user namespace, or a Dockerfile `USER`'s
//!   identity without any —, with the build's env and workdir; the first failure
//!   fails the build.
//!
//! Then the sandbox is stopped, its filesystem is renamed into the templates
//! directory, made read-only, and its record (and build log) written, last. On failure
//! the sandbox and its filesystem are destroyed: nothing is left behind.

use crate::template::{self, TemplateError, TemplateMeta, SUITE};
use crate::{Inner, JailInstance, Origin};
use forkbox_core::runtime::{CreateSpec, Instance as _, Progress, RuntimeError, TemplateSpec};
use forkbox_types::agent::{AgentEvent, ExecRequest};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Resources of a build sandbox.
const BUILD_CPU_MILLIS: u64 = 2000;
const BUILD_MEMORY: u64 = 2 << 30;
const BUILD_PIDS: u64 = 1024;
/// Ids of build sandboxes (`bld-…`): minted here only, never a user sandbox's.
const BUILD_ID_PREFIX: &str = "bld";

/// Whether sandbox `id` is a template build's (its egress proxy trusts the server's
/// package hosts: `forkbox_net::proxy::Policy::trusted`).
pub(crate) fn is_build_sandbox(id: &str) -> bool {
    forkbox_core::ids::is_valid(BUILD_ID_PREFIX, id)
}

/// Longest a single build command may run.
const COMMAND_TIMEOUT_MS: u64 = 3600 * 1000;
/// Hosts apt reaches when installing packages on a template base.
const DEBIAN_MIRRORS: &[&str] = &["deb.debian.org", "security.debian.org"];

/// `egress` with the Debian mirrors and the hosts the built-in recipes' commands reach
/// (named by the operator's languages file, e.g. the npm registry) trusted: a build
/// reaches them wherever the host's resolver puts them (a mirror on a private address
/// included), as the host itself does.
pub(crate) fn with_mirrors<'a>(
    egress: &forkbox_net::EgressConfig,
    recipes: impl IntoIterator<Item = &'a TemplateSpec>,
) -> forkbox_net::EgressConfig {
    let mut e = egress.clone();
    e.trusted_names
        .extend(DEBIAN_MIRRORS.iter().map(|m| (*m).to_owned()));
    for r in recipes {
        for host in r.egress.iter().flatten() {
            if !e.trusted_names.contains(host) {
                e.trusted_names.push(host.clone());
            }
        }
    }
    e
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("template {0} already exists")]
    Exists(String),
    #[error("base template {0} does not exist")]
    NoBase(String),
    #[error("installing packages failed (exit {code:?}); last output:\n{tail}")]
    Packages { code: Option<i32>, tail: String },
    #[error("build command {index} ({cmd:?}) failed with exit code {code}")]
    Command {
        index: usize,
        cmd: String,
        code: i32,
    },
    #[error("build command {index} ({cmd:?}) could not run: {message}")]
    CommandError {
        index: usize,
        cmd: String,
        message: String,
    },
    #[error("run apt in the build sandbox: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Btrfs(#[from] forkbox_sys::btrfs::BtrfsError),
    #[error("importing the image: {0}")]
    Image(#[from] forkbox_oci::OciError),
    #[error("importing the image: {0}")]
    ImageTask(String),
    #[error("importing the image: {0}")]
    Unpack(#[from] forkbox_oci::unpack::UnpackError),
}

impl BuildError {
    pub fn into_runtime(self, name: &str) -> RuntimeError {
        match self {
            BuildError::Exists(_) => RuntimeError::Conflict(self.to_string()),
            BuildError::NoBase(b) => RuntimeError::UnknownTemplate(b),
            BuildError::Runtime(r) => r,
            other => RuntimeError::host("build template", name, other),
        }
    }
}

/// Collects what a build reports, for its kept log.
struct Log {
    lines: Mutex<Vec<String>>,
    progress: Progress,
}

/// Longest line of build output kept (longer ones are split).
const MAX_LINE: usize = 4096;
/// Most lines a build's kept log holds (its first ones, then a note of how many more).
const MAX_LOG_LINES: usize = 20_000;

impl Log {
    fn line(&self, l: &str) {
        let mut g = match self.lines.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match g.len() {
            n if n < MAX_LOG_LINES => g.push(l.to_owned()),
            n if n == MAX_LOG_LINES => g.push(format!(
                "(more than {MAX_LOG_LINES} lines: the rest is not kept)"
            )),
            _ => return,
        }
        drop(g);
        (self.progress)(l);
    }

    fn text(&self) -> String {
        let g = match self.lines.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.iter().map(|l| format!("{l}\n")).collect()
    }
}

impl Inner {
    pub(crate) async fn build_template(
        self: &Arc<Self>,
        spec: &TemplateSpec,
        progress: Progress,
    ) -> Result<TemplateMeta, BuildError> {
        let started = std::time::Instant::now();
        let name = spec.name.as_str();
        let log = Log {
            lines: Mutex::default(),
            progress,
        };
        if self.pool.template(name).exists() || self.pool.template_meta(name).exists() {
            return Err(BuildError::Exists(name.into()));
        }
        let id = forkbox_core::ids::new(BUILD_ID_PREFIX);
        let rootfs = self.pool.sandbox(&id);
        // An imported image's configuration under what the request says.
        let mut spec = std::borrow::Cow::Borrowed(spec);
        let mut imported = None;
        // Where the commands run (from an image: its working directory, as Docker's
        // RUN; a Dockerfile's WORKDIR is in their text).
        let mut steps_cwd = None;
        // Steps are kept for later builds when asked (a Dockerfile's) and only on a
        // template base (a Debian root made from scratch is not reproducible by name).
        let mut steps = StepKeys::default();
        // 1. The filesystem.
        // (An image is never given with a base: core refuses that.)
        match (spec.base.clone(), spec.image.clone()) {
            (None, Some(source)) => {
                log.line(&format!("template {name}: unpacking the image into {id}"));
                forkbox_sys::btrfs::create_subvolume(&rootfs)?;
                match self.import_image(&source, &id, &rootfs, &log).await {
                    Ok(image) => {
                        steps_cwd = Some(image.workdir.clone().unwrap_or_else(|| "/".to_owned()));
                        let s = spec.to_mut();
                        let mut env = image.env;
                        env.extend(std::mem::take(&mut s.env));
                        s.env = env;
                        if s.workdir.is_none() {
                            s.workdir = image.workdir;
                        }
                        imported = Some(image.info);
                    }
                    Err(e) => {
                        let _ = crate::delete_subvolume_patiently(&rootfs);
                        return Err(e);
                    }
                }
            }
            (None, None) => {
                forkbox_sys::btrfs::create_subvolume(&rootfs)?;
                let made =
                    template::debootstrap(&rootfs, name, &spec.packages, self.uid_base, &|l| {
                        log.line(l)
                    })
                    .await;
                if let Err(e) = made {
                    let _ = crate::delete_subvolume_patiently(&rootfs);
                    return Err(e.into());
                }
            }
            (Some(base), _) => {
                let Some(meta) = template::built(&self.pool, &base, self.uid_base) else {
                    return Err(BuildError::NoBase(base));
                };
                if spec.keep_steps {
                    steps = StepKeys::new(&meta, &spec);
                }
                // The longest run of steps an earlier build kept: start from there.
                let from_cache = steps
                    .cached(&self.pool)
                    .filter(|(_, from)| forkbox_sys::btrfs::snapshot(from, &rootfs, false).is_ok());
                match from_cache {
                    Some((done, from)) => {
                        // Used: the last to go.
                        let _ = std::fs::write(from.with_extension("kept"), b"");
                        log.line(&format!(
                            "template {name}: steps 1-{done} of {} cached (btrfs snapshot)",
                            spec.run.len()
                        ));
                        steps.done = done;
                    }
                    // (None, or the kept step went meanwhile: from the base.)
                    None => {
                        log.line(&format!("template {name}: copying {base} (btrfs snapshot)"));
                        forkbox_sys::btrfs::snapshot(&self.pool.template(&base), &rootfs, false)?;
                    }
                }
            }
        }
        // 2. Packages and commands in a build sandbox.
        // (A kept step holds the packages already: they were installed before it.)
        let layered_packages = (spec.base.is_some() || spec.image.is_some())
            && !spec.packages.is_empty()
            && steps.done == 0;
        if layered_packages || steps.done < spec.run.len() {
            if let Err(e) = self
                .in_build_sandbox(
                    &id,
                    &spec,
                    layered_packages,
                    &steps,
                    steps_cwd.as_deref(),
                    &log,
                )
                .await
            {
                // The failed sandbox took its filesystem with it; make sure.
                let _ = crate::delete_subvolume_patiently(&rootfs);
                return Err(e);
            }
        }
        // 3. Publish.
        let published = self.publish(&id, &spec, started, &log, imported).await;
        if published.is_err() {
            let _ = crate::delete_subvolume_patiently(&rootfs);
        }
        published
    }

    /// Unpacks the image (received whole, or pulled from its registry first) into
    /// `rootfs` (a fresh subvolume) as host root, but never outside it
    /// (`forkbox_oci::unpack`): the image chosen, its manifest and configuration
    /// checked, every layer checked against its digest before any is applied, owners
    /// shifted into the sandboxes' range; then the directories a sandbox needs made
    /// where the image has none.
    async fn import_image(
        &self,
        source: &forkbox_core::runtime::ImageSource,
        id: &str,
        rootfs: &std::path::Path,
        log: &Log,
    ) -> Result<forkbox_oci::Image, BuildError> {
        use forkbox_core::runtime::ImageSource;
        /// A pulled layout, removed when done with.
        struct Pulled(std::path::PathBuf);
        impl Drop for Pulled {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let (path, reference, pulled) = match source {
            ImageSource::Archive(a) => (a.path.clone(), a.reference.clone(), None),
            ImageSource::Registry { reference, auth } => {
                let dir = Pulled(self.run_dir.join(crate::UPLOADS).join(format!("{id}.pull")));
                let say = |l: &str| log.line(l);
                forkbox_oci::registry::pull(reference, auth.as_ref(), &dir.0, &say).await?;
                (dir.0.clone(), None, Some(dir))
            }
        };
        let is_dir = pulled.is_some();
        let (root, base) = (rootfs.to_path_buf(), self.uid_base);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut task = tokio::task::spawn_blocking(
            move || -> Result<forkbox_oci::Image, BuildError> {
                let say = |l: &str| {
                    let _ = tx.send(l.to_owned());
                };
                let a = match is_dir {
                    true => forkbox_oci::Archive::open_dir(&path),
                    false => forkbox_oci::Archive::open(&path)?,
                };
                let image = a.image(reference.as_deref())?;
                say(&format!(
                    "image {}{}: {} layers",
                    image.info.digest,
                    image
                        .info
                        .reference
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                    image.info.layers
                ));
                a.verify_layers(&image, &say)?;
                let done = a.unpack(&image, &root, base, &say)?;
                if done.skipped > 0 || done.xattrs_skipped > 0 {
                    say(&format!(
                    "not applied: {} device nodes or other special files, extended attributes of {} files",
                    done.skipped, done.xattrs_skipped
                ));
                }
                // What a sandbox needs, and the image's working directory, where missing.
                let t = forkbox_oci::unpack::Target::open(&root, base)?;
                for (dir, mode) in SANDBOX_DIRS {
                    t.ensure_dir(std::path::Path::new(dir), *mode)?;
                }
                if let Some(w) = &image.workdir {
                    t.ensure_dir(std::path::Path::new(w), 0o755)?;
                }
                Ok(image)
            },
        );
        let res = loop {
            tokio::select! {
                Some(l) = rx.recv() => log.line(&l),
                r = &mut task => break r,
            }
        };
        while let Ok(l) = rx.try_recv() {
            log.line(&l);
        }
        drop(pulled);
        res.map_err(|e| BuildError::ImageTask(e.to_string()))?
    }

    async fn in_build_sandbox(
        self: &Arc<Self>,
        id: &str,
        spec: &TemplateSpec,
        packages: bool,
        steps: &StepKeys,
        steps_cwd: Option<&str>,
        log: &Log,
    ) -> Result<(), BuildError> {
        let name = spec.name.as_str();
        let mut allow: Vec<String> = spec.egress.clone().unwrap_or_default();
        if packages {
            for m in DEBIAN_MIRRORS {
                if !allow.iter().any(|a| a == m) {
                    allow.push((*m).to_owned());
                }
            }
        }
        log.line(&format!(
            "template {name}: starting build sandbox {id}{}",
            if allow.is_empty() {
                " (no network)".to_owned()
            } else {
                format!(" (egress to {})", allow.join(", "))
            }
        ));
        let cspec = CreateSpec {
            id: id.to_owned(),
            template: name.to_owned(),
            cpu_millis: BUILD_CPU_MILLIS,
            memory_bytes: BUILD_MEMORY,
            // Not applied: a build sandbox runs on an existing subvolume.
            disk_bytes: 0,
            pids_max: BUILD_PIDS,
            env: spec.env.clone(),
            snapshot: None,
            egress: (!allow.is_empty()).then_some(allow),
            volumes: Vec::new(),
        };
        let inst = self.start(&cspec, Origin::Existing).await?;
        let res = async {
            if packages {
                self.apt_install(&inst, &spec.packages, log).await?;
            }
            self.run_commands(&inst, id, spec, steps, steps_cwd, log)
                .await
        }
        .await;
        match res {
            Ok(()) => {
                log.line(&format!("template {name}: stopping the build sandbox"));
                // Everything goes but the filesystem.
                inst.hibernate().await?;
                Ok(())
            }
            Err(e) => {
                if let Err(d) = inst.destroy().await {
                    tracing::error!(sandbox = %id, error = %d, "destroying a failed build sandbox");
                }
                Err(e)
            }
        }
    }

    /// `apt-get install` in the build sandbox (see [`Self::confined`]): content of a
    /// `run`-built base (an apt hook, a replaced `dpkg`) runs exactly that confined.
    async fn apt_install(
        &self,
        inst: &JailInstance,
        packages: &[String],
        log: &Log,
    ) -> Result<(), BuildError> {
        log.line(&format!(
            "installing {} with apt in the build sandbox",
            packages.join(" ")
        ));
        let proxy = format!("http://{}", forkbox_types::egress::PROXY_ADDR);
        let script = format!(
            "cd / && apt-get -q -o Acquire::http::Proxy={proxy} -o APT::Sandbox::User=root update \
             && apt-get -q -y --no-install-recommends -o Acquire::http::Proxy={proxy} \
             -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 install -- \"$@\" \
             && apt-get clean && rm -rf /var/lib/apt/lists/*"
        );
        let env = BTreeMap::from([
            ("DEBIAN_FRONTEND".to_owned(), "noninteractive".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ]);
        let mut argv = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            script,
            "sh".to_owned(),
        ];
        argv.extend(packages.iter().cloned());
        let (code, tail) = self
            .confined(inst, &argv, &env, "/", None, COMMAND_TIMEOUT_MS, log)
            .await?;
        if code != Some(0) {
            return Err(BuildError::Packages { code, tail });
        }
        Ok(())
    }

    /// Runs `argv` in the build sandbox by a process that joins its namespaces and
    /// cgroup and is then confined like sandbox code but for a container build's
    /// capabilities (`forkbox-agent confine`: `no_new_privs`, the sandbox's seccomp
    /// filters, `setns` denied, only `forkbox_sys::caps::PACKAGE_CAPS`, all of them the
    /// user namespace's; as `user`, none), with exactly `env` (and the default `PATH`
    /// and `LANG` unless it sets them), in `cwd`; its output lines go to the log. Its
    /// exit code (`None`: killed, or past `timeout_ms`) and its last 20 lines.
    #[allow(clippy::too_many_arguments)]
    async fn confined(
        &self,
        inst: &JailInstance,
        argv: &[String],
        env: &BTreeMap<String, String>,
        cwd: &str,
        user: Option<&str>,
        timeout_ms: u64,
        log: &Log,
    ) -> Result<(Option<i32>, String), BuildError> {
        use std::os::unix::process::CommandExt as _;
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
        let procs: Vec<std::ffi::CString> = inst
            .cgroup
            .procs_files()
            .iter()
            .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok())
            .collect();
        // The sealed agent image, executed after nsenter through our own fd (the magic
        // link resolves in the sandbox's /proc too): nothing of the host's filesystem.
        let image_fd = self
            .agent
            .as_ref()
            .ok_or_else(|| {
                BuildError::Spawn(std::io::Error::other(
                    "this runtime was opened for clean-up only",
                ))
            })?
            .raw_fd();
        let confine = format!("/proc/self/fd/{image_fd}");
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--target={}", inst.pid)).args([
            "--user", "--mount", "--pid", "--net", "--uts", "--ipc", "--cgroup", "--root", "--wd",
            "--", &confine, "confine",
        ]);
        let mut all = BTreeMap::from([
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ]);
        all.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        // The environment on confine's standard input, not on the host's process list
        // (build arguments may be secrets).
        let mut env_blob = Vec::new();
        for (k, v) in &all {
            env_blob.extend_from_slice(format!("{k}={v}").as_bytes());
            env_blob.push(0);
        }
        cmd.arg("--env-stdin").args(["--cwd", cwd]);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        cmd.arg("--")
            .args(argv)
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only open/write/close on paths prepared before the fork.
        unsafe {
            cmd.as_std_mut().pre_exec(move || {
                // The agent image stays open across nsenter's exec.
                if libc::fcntl(image_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Join the sandbox's cgroup (its limits) before entering it.
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(BuildError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt as _;
            stdin
                .write_all(&env_blob)
                .await
                .map_err(BuildError::Spawn)?;
            drop(stdin);
        }
        let tail = Mutex::new(std::collections::VecDeque::<String>::new());
        let pump = |r: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
            let tail = &tail;
            async move {
                let Some(r) = r else { return };
                // Lines of at most MAX_LINE bytes (longer ones split), any bytes (shown
                // lossily): a step's output never grows the server unboundedly.
                let mut r = tokio::io::BufReader::new(r);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    let got = (&mut r)
                        .take(MAX_LINE as u64)
                        .read_until(b'\n', &mut buf)
                        .await;
                    match got {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let text = String::from_utf8_lossy(&buf);
                    let l = text.strip_suffix('\n').unwrap_or(&text).to_owned();
                    log.line(&l);
                    let mut t = match tail.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    t.push_back(l);
                    if t.len() > 20 {
                        t.pop_front();
                    }
                }
            }
        };
        let out = child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
        let err = child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
        let run = async {
            tokio::join!(pump(out), pump(err));
            child.wait().await
        };
        let code =
            match tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), run).await {
                Ok(status) => status.map_err(BuildError::Spawn)?.code(),
                Err(_) => {
                    log.line(&format!("timed out after {} s", timeout_ms / 1000));
                    None
                }
            };
        let t = match tail.into_inner() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        Ok((code, Vec::from(t).join("\n")))
    }

    /// Runs the build's commands, in order, each as [`Self::confined`] (a
    /// Dockerfile's `USER` steps as that user); the first that fails fails the build.
    /// A step that copies from the build context gets it first (removed before any
    /// other step, and before a step is kept).
    async fn run_commands(
        &self,
        inst: &JailInstance,
        id: &str,
        spec: &TemplateSpec,
        steps: &StepKeys,
        steps_cwd: Option<&str>,
        log: &Log,
    ) -> Result<(), BuildError> {
        let mut env: BTreeMap<String, String> = spec.env.clone();
        if spec.egress.as_ref().is_some_and(|l| !l.is_empty()) {
            forkbox_types::egress::proxy_env(&mut env);
        }
        // Build arguments: the commands' environment, under the template's.
        for (k, v) in &spec.args {
            env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut cmds: Vec<(usize, String, String)> = Vec::new();
        // A Dockerfile's steps change to their directory themselves (making it, or
        // after a USER, having it made for the user); they start in the image's
        // working directory, or `/`. A `run` list's commands start in `workdir`, made
        // first if missing.
        let dockerfile = spec.keep_steps;
        if let Some(w) = spec.workdir.as_ref().filter(|_| !dockerfile) {
            let dir = forkbox_types::shell::quote(w);
            cmds.push((0, format!("mkdir -p {dir}"), "/".to_owned()));
        }
        for (i, c) in spec.run.iter().enumerate().skip(steps.done) {
            let cwd = match (steps_cwd, dockerfile) {
                (Some(d), _) => d.to_owned(),
                (None, true) => "/".to_owned(),
                (None, false) => spec.workdir.clone().unwrap_or_else(|| "/root".to_owned()),
            };
            cmds.push((i + 1, c.clone(), cwd));
        }
        let context_at = forkbox_types::api::BUILD_CONTEXT_TAR;
        let mut context_put = false;
        for (index, cmd, cwd) in cmds {
            // The build context, for the steps that copy from it (from the first that
            // names it on), and gone after them.
            if let Some(ctx) = spec.context.as_ref().filter(|_| !context_put) {
                if index > 0 && cmd.starts_with(forkbox_types::api::BUILD_COPY_STEP) {
                    log.line(&format!("build context: {} bytes", ctx.len()));
                    let bytes = bytes::Bytes::from(ctx.as_ref().clone());
                    let upload: forkbox_core::runtime::UploadStream =
                        Box::pin(futures_util::stream::once(async move { Ok(bytes) }));
                    inst.write_file(context_at, upload).await?;
                    context_put = true;
                }
            }
            if index > 0 {
                log.line(&format!("$ {cmd}"));
            }
            let user = forkbox_types::api::step_user(&cmd);
            let mut step_env = env.clone();
            if user.is_none() {
                step_env
                    .entry("HOME".to_owned())
                    .or_insert_with(|| "/root".to_owned());
            }
            let argv = ["/bin/sh".to_owned(), "-c".to_owned(), cmd.clone()];
            let (code, _) = self
                .confined(inst, &argv, &step_env, &cwd, user, COMMAND_TIMEOUT_MS, log)
                .await?;
            match code {
                Some(0) => {}
                Some(code) => return Err(BuildError::Command { index, cmd, code }),
                None => {
                    return Err(BuildError::CommandError {
                        index,
                        cmd,
                        message: "killed, or past its time limit".into(),
                    })
                }
            }
            // Kept for later builds: the filesystem after this step.
            if index > 0 {
                if let Some(key) = steps.key(index) {
                    if context_put {
                        self.run_quiet(
                            inst,
                            &format!("rm -f {}", forkbox_types::shell::quote(context_at)),
                        )
                        .await?;
                        context_put = false;
                    }
                    let (pool, id, key) = (self.pool.clone(), id.to_owned(), key);
                    let _ = tokio::task::spawn_blocking(move || keep_step(&pool, &id, &key)).await;
                }
            }
        }
        if context_put {
            self.run_quiet(
                inst,
                &format!("rm -f {}", forkbox_types::shell::quote(context_at)),
            )
            .await?;
        }
        Ok(())
    }

    /// Runs `cmd` in the build sandbox; fails unless it exits 0.
    async fn run_quiet(&self, inst: &JailInstance, cmd: &str) -> Result<(), BuildError> {
        let mut events = inst
            .exec(ExecRequest {
                cmd: cmd.to_owned(),
                cwd: Some("/".to_owned()),
                env: Default::default(),
                timeout_ms: Some(COMMAND_TIMEOUT_MS),
            })
            .await?;
        let mut code = -1;
        while let Some(ev) = events.next().await {
            if let AgentEvent::Exit { code: c, .. } = ev? {
                code = c;
            }
        }
        match code {
            0 => Ok(()),
            code => Err(BuildError::Command {
                index: 0,
                cmd: cmd.to_owned(),
                code,
            }),
        }
    }

    /// Moves the finished filesystem into place and writes its record.
    async fn publish(
        &self,
        id: &str,
        spec: &TemplateSpec,
        started: std::time::Instant,
        log: &Log,
        image: Option<forkbox_types::api::ImageInfo>,
    ) -> Result<TemplateMeta, BuildError> {
        let name = spec.name.as_str();
        let rootfs = self.pool.sandbox(id);
        let measured = rootfs.clone();
        let size_bytes = tokio::task::spawn_blocking(move || template::tree_size(&measured))
            .await
            .ok();
        let lock = template::lock_pool(&self.pool, name).await?;
        let final_path = self.pool.template(name);
        if final_path.exists() || self.pool.template_meta(name).exists() {
            return Err(BuildError::Exists(name.into()));
        }
        std::fs::rename(&rootfs, &final_path).map_err(|e| TemplateError::Io(name.into(), e))?;
        let meta = TemplateMeta {
            name: name.into(),
            suite: SUITE.into(),
            packages: spec.packages.clone(),
            uid_base: self.uid_base,
            built_at: time::OffsetDateTime::now_utc(),
            build_seconds: started.elapsed().as_secs_f64(),
            size_bytes,
            base: spec.base.clone(),
            run: spec.run.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.clone(),
            image,
        };
        let finish = || -> Result<(), BuildError> {
            forkbox_sys::btrfs::set_readonly(&final_path, true)?;
            log.line(&format!(
                "template {name}: ready in {:.0}s",
                meta.build_seconds
            ));
            std::fs::write(self.pool.template_log(name), log.text())
                .map_err(|e| TemplateError::Io(name.into(), e))?;
            template::write_meta(&self.pool, &meta)?;
            Ok(())
        };
        if let Err(e) = finish() {
            let _ = std::fs::remove_file(self.pool.template_log(name));
            let _ = crate::delete_subvolume_patiently(&final_path);
            return Err(e);
        }
        drop(lock);
        Ok(meta)
    }

    /// Deletes a template's record, log and filesystem (record first, so a half-deleted
    /// template never looks built).
    pub(crate) async fn delete_template(&self, name: &str) -> Result<(), BuildError> {
        let _lock = template::lock_pool(&self.pool, name).await?;
        // Sandboxes and snapshots standing on this build keep it, among the layers.
        let built = crate::layers::template_built(&self.pool, name);
        let meta = self.pool.template_meta(name);
        if meta.exists() {
            std::fs::remove_file(&meta).map_err(|e| TemplateError::Io(name.into(), e))?;
        }
        let _ = std::fs::remove_file(self.pool.template_log(name));
        let pool = self.pool.clone();
        let path = self.pool.template(name);
        let n = name.to_owned();
        tokio::task::spawn_blocking(move || match built {
            Some(b) => {
                let _lock = crate::layers::PoolLock::exclusive(&pool)
                    .map_err(|e| TemplateError::Io(n.clone(), std::io::Error::other(e)))?;
                let in_use = crate::layers::template_in_use(&pool, &n, b);
                crate::layers::retire(
                    &pool,
                    &path,
                    &crate::layers::retired_template(&n, b),
                    in_use,
                )
                .map_err(|e| TemplateError::Io(n, std::io::Error::other(e)))
            }
            None => crate::delete_subvolume_patiently(&path)
                .map_err(|e| TemplateError::Io(n, std::io::Error::other(e))),
        })
        .await
        .map_err(|e| TemplateError::Io(name.into(), std::io::Error::other(e)))??;
        Ok(())
    }
}

/// The directories every sandbox root has (mount points and the commands' home), made
/// in an imported image that lacks them, owned by the sandbox's root.
const SANDBOX_DIRS: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("etc", 0o755),
];

/// The version of how build steps run, part of every kept step's key.
const STEP_SEMANTICS: u32 = 2;

/// Most kept build steps; past it the least recently made go.
const MAX_KEPT_STEPS: usize = 64;

/// The keys of a build's steps: step `i`'s is a hash of its base template (name and
/// when it was built), the build's environment, working directory, network and
/// packages, and every command up to `i` (a step that copies from the build context
/// names a digest of what it copies in its text: `forkbox_dockerfile`).
#[derive(Default)]
struct StepKeys {
    keys: Vec<String>,
    /// Steps done already (from a kept one).
    done: usize,
}

impl StepKeys {
    fn new(base: &TemplateMeta, spec: &TemplateSpec) -> StepKeys {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let head = serde_json::json!({
            // How steps are run: bumped when that changes, so that steps kept by an
            // earlier forkbox are not taken for this one's (2: run confined with a
            // build's capabilities, `USER`, a Dockerfile's directories its own).
            "semantics": STEP_SEMANTICS,
            "base": base.name,
            "built_at": base.built_at.unix_timestamp_nanos().to_string(),
            "env": spec.env,
            "workdir": spec.workdir,
            "egress": spec.egress,
            "packages": spec.packages,
            "args": spec.args,
        });
        h.update(head.to_string().as_bytes());
        let mut keys = Vec::with_capacity(spec.run.len());
        for cmd in &spec.run {
            h.update(b"\0step\0");
            h.update(cmd.as_bytes());
            let d = h.clone().finalize();
            keys.push(d.iter().map(|b| format!("{b:02x}")).collect());
        }
        StepKeys { keys, done: 0 }
    }

    /// Key of step `index` (1-based), when steps are kept.
    fn key(&self, index: usize) -> Option<String> {
        self.keys.get(index.checked_sub(1)?).cloned()
    }

    /// The last step an earlier build kept and where (its count, its snapshot).
    fn cached(&self, pool: &crate::pool::Pool) -> Option<(usize, std::path::PathBuf)> {
        (1..=self.keys.len()).rev().find_map(|i| {
            let p = pool.build_step(&self.keys[i - 1]);
            (p.is_dir() && p.with_extension("kept").exists()).then_some((i, p))
        })
    }
}

/// Keeps the build sandbox `id`'s filesystem as step `key` (read-only), and drops the
/// least recently kept past [`MAX_KEPT_STEPS`]. Best effort: a build does not fail for
/// its cache.
fn keep_step(pool: &crate::pool::Pool, id: &str, key: &str) {
    let dest = pool.build_step(key);
    if dest.exists() {
        return;
    }
    if let Some(dir) = dest.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = forkbox_sys::btrfs::snapshot(&pool.sandbox(id), &dest, true) {
        tracing::warn!(key, error = %e, "keeping a build step");
        return;
    }
    // When it was kept: a file of the host's beside it (a snapshot's own times are its
    // source's, or what a step set).
    let _ = std::fs::write(dest.with_extension("kept"), b"");
    let Some(dir) = dest.parent() else { return };
    let mut kept: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_none())
        .map(|e| {
            let at = std::fs::metadata(e.path().with_extension("kept"))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (at, e.path())
        })
        .collect();
    if kept.len() > MAX_KEPT_STEPS {
        kept.sort_by_key(|k| std::cmp::Reverse(k.0));
        for (_, p) in kept.into_iter().skip(MAX_KEPT_STEPS) {
            let _ = crate::delete_subvolume_patiently(&p);
            let _ = std::fs::remove_file(p.with_extension("kept"));
        }
    }
}
