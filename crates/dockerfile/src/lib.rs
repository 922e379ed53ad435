//! A Dockerfile read into the steps of a forkbox template build: the template to
//! layer on, the commands to run in the build sandbox, and the environment and working
//! directory its sandboxes start with. Parsed with `parse-dockerfile`; what forkbox
//! cannot do yet is refused naming the instruction and its line.
//!
//! Semantics, as Docker's where they apply:
//! - one stage; `FROM <template>` layers on a forkbox template, `FROM debian` /
//!   `debian:bookworm` builds on Debian from scratch; `FROM` of any other image (a
//!   name with a registry, a path, a tag or a digest: `python:3.11-slim`,
//!   `ghcr.io/org/img`) starts from that OCI image, pulled from its registry;
//! - `ARG name[=default]` (before `FROM` too), overridden by the build's arguments;
//!   seen by later instructions' `$name`/`${name}` and by later `RUN`s as environment,
//!   not kept in the template;
//! - `ENV` (`k=v …`, or the old `k v`), `WORKDIR` (made if missing; relative to the
//!   previous), with `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}` expanded;
//!   each `RUN` sees exactly the environment and directory set before it, and the
//!   template keeps the last ones;
//! - `RUN` in shell or exec form, run by `/bin/sh -c` in the build sandbox;
//! - `LABEL`, `MAINTAINER`, `EXPOSE`, `CMD`, `ENTRYPOINT`, `STOPSIGNAL`,
//!   `HEALTHCHECK`: accepted and recorded as labels or dropped (a sandbox has no main
//!   process to start);
//! - `COPY` and `ADD` from the build context (`ADD` unpacks a local tar archive,
//!   plain or compressed, into the destination; no URLs);
//! - `USER name[:group]`: the `RUN` steps after it run as that user (resolved in the
//!   image's `/etc/passwd`), the others as root with a container build's capabilities;
//!   a `WORKDIR` made after it is that user's; the template's sandboxes still run as
//!   their root;
//! - refused:
//!   `VOLUME`, `SHELL`, `ONBUILD`, `RUN` options (`--mount`, …) and here-documents,
//!   `FROM` options and a second `FROM`.

use std::collections::BTreeMap;

pub mod context;
pub use context::{Context, ContextError, CONTEXT_TAR};

/// A Dockerfile that cannot be built, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct DockerfileError {
    /// 1-based; 0 when the whole file is at fault.
    pub line: usize,
    pub message: String,
}

/// How every `COPY` step starts (and no `RUN` step does: those start with their
/// environment or directory): the build gives the context to these steps only.
pub use forkbox_types::api::BUILD_COPY_STEP as COPY_STEP;

/// Largest Dockerfile read.
pub const MAX_DOCKERFILE: usize = 1 << 20;
/// Largest value a variable expands to.
const MAX_VALUE: usize = 64 * 1024;
/// Most steps (`RUN`, `COPY`) and most bytes of rendered steps.
const MAX_STEPS: usize = 256;
const MAX_RENDERED: usize = 4 << 20;

/// What a Dockerfile builds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipe {
    /// The forkbox template to layer on; `None`: Debian from scratch (or `image`).
    pub base: Option<String>,
    /// The OCI image to start from (a registry reference), instead of a template.
    pub image: Option<String>,
    /// Debian packages: the build's package step, from `RUN apt-get install …` lines
    /// that come before any other step (installed with the package manager's
    /// capabilities, which a `RUN` does not have).
    pub packages: Vec<String>,
    /// Shell commands, in order, each setting its own environment and directory first.
    pub run: Vec<String>,
    /// The environment the template's sandboxes start with (`ENV`, not `ARG`).
    pub env: BTreeMap<String, String>,
    /// The working directory at the end (`WORKDIR`).
    pub workdir: Option<String>,
    /// `LABEL`s (and `MAINTAINER` as `maintainer`).
    pub labels: BTreeMap<String, String>,
    /// The `ARG` values of the stage: every step's environment during the build (not
    /// in the steps' text, nor kept in the template).
    pub args: BTreeMap<String, String>,
}

/// Reads `text` (a Dockerfile) with the build's `args` (`--build-arg`), without a build
/// context (`COPY` and `ADD` are refused).
pub fn read(text: &str, args: &BTreeMap<String, String>) -> Result<Recipe, DockerfileError> {
    read_with(text, args, None)
}

/// Reads `text` with the build's `args` and `context`: a `COPY` is a step that takes its
/// sources from the context's tar, put at [`CONTEXT_TAR`] in the build sandbox.
pub fn read_with(
    text: &str,
    args: &BTreeMap<String, String>,
    context: Option<&Context>,
) -> Result<Recipe, DockerfileError> {
    use parse_dockerfile::Instruction as I;
    if text.len() > MAX_DOCKERFILE {
        return Err(DockerfileError {
            line: 0,
            message: format!("larger than {MAX_DOCKERFILE} bytes"),
        });
    }
    let file = parse_dockerfile::parse(text).map_err(|e| DockerfileError {
        line: e.line(),
        message: format!("{e:#}"),
    })?;
    let line = |at: usize| {
        let before = &text.as_bytes()[..at.min(text.len())];
        before.iter().filter(|b| **b == b'\n').count() + 1
    };
    let refuse = |at: usize, message: String| DockerfileError {
        line: line(at),
        message,
    };
    let mut st = State::default();
    let mut recipe = Recipe::default();
    let mut seen_from = false;
    // Each step's command and, for a RUN, the ENV names set before it.
    // (step, the ENV names set before it (RUN steps), the USER it runs as)
    let mut steps: Vec<(String, Option<Vec<String>>, Option<String>)> = Vec::new();
    for ins in &file.instructions {
        match ins {
            I::Arg(a) => {
                let (name, default) = match a.arguments.value.split_once('=') {
                    Some((n, d)) => (n.trim(), Some(unquote(d.trim()))),
                    None => (a.arguments.value.trim(), None),
                };
                if !is_name(name) {
                    return Err(refuse(a.arg.span.start, format!("bad ARG name {name:?}")));
                }
                let default = default
                    .map(|d| st.expand(&d))
                    .transpose()
                    .map_err(|m| refuse(a.arg.span.start, m))?;
                if let Some(v) = args.get(name).cloned().or(default) {
                    st.args.insert(name.to_owned(), v);
                } else {
                    st.args.remove(name);
                }
            }
            I::From(f) => {
                if seen_from {
                    return Err(refuse(
                        f.from.span.start,
                        "multi-stage builds are not supported (one FROM)".into(),
                    ));
                }
                seen_from = true;
                if let Some(o) = f.options.first() {
                    return Err(refuse(
                        o.span().start,
                        format!("FROM --{} is not supported", o.name.value),
                    ));
                }
                let image = st
                    .expand(&f.image.value)
                    .map_err(|m| refuse(f.from.span.start, m))?;
                match base_of(&image).map_err(|m| refuse(f.image.span.start, m))? {
                    From::Debian => {}
                    From::Template(t) => recipe.base = Some(t),
                    From::Image(i) => {
                        recipe.image = Some(i);
                        st.from_image = true;
                    }
                }
                // Only the build's arguments and ARGs redeclared in the stage go on.
                st.args.retain(|_, _| false);
            }
            _ if !seen_from => {
                return Err(refuse(
                    span_of(ins).start,
                    "only ARG may come before the first FROM".into(),
                ))
            }
            I::Env(e) => {
                for (k, v) in pairs(&e.arguments.value).map_err(|m| refuse(e.env.span.start, m))? {
                    if !is_name(&k) {
                        return Err(refuse(e.env.span.start, format!("bad ENV name {k:?}")));
                    }
                    let v = st.expand(&v).map_err(|m| refuse(e.env.span.start, m))?;
                    st.env.insert(k, v);
                }
            }
            I::Workdir(w) => {
                let dir = st
                    .expand(w.arguments.value.trim())
                    .map_err(|m| refuse(w.workdir.span.start, m))?;
                let dir = unquote(&dir);
                let abs = if dir.starts_with('/') {
                    dir
                } else {
                    format!("{}/{dir}", st.workdir.as_deref().unwrap_or("/"))
                };
                if abs.contains('\0') {
                    return Err(refuse(w.workdir.span.start, "bad WORKDIR".into()));
                }
                let dir = normalize(&abs);
                // After a USER, a missing WORKDIR is made by root and given to that
                // user (as BuildKit does): the user's own steps could not make it.
                if let Some(u) = &st.user {
                    let (d, q) = (shell_quote(&dir), shell_quote(u));
                    steps.push((
                        format!("[ -d {d} ] || {{ mkdir -p {d} && chown -- {q} {d}; }}"),
                        None,
                        None,
                    ));
                }
                st.workdir = Some(dir);
            }
            I::User(u) => {
                let at = u.user.span.start;
                let spec = st
                    .expand(u.arguments.value.trim())
                    .map_err(|m| refuse(at, m))?;
                let spec = unquote(spec.trim());
                let ok = !spec.is_empty()
                    && !spec.starts_with('-')
                    && !spec.contains(":-")
                    && spec.len() <= 64
                    && spec
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
                    && spec.split(':').count() <= 2;
                if !ok {
                    return Err(refuse(at, format!("USER {spec:?} is not a user[:group]")));
                }
                // Root is every step's user anyway (with a build's capabilities).
                let root = matches!(spec.as_str(), "root" | "0" | "root:root" | "0:0");
                if !root && st.user.is_none() {
                    // The working directory so far exists before the user's steps.
                    if let Some(w) = &st.workdir {
                        steps.push((format!("mkdir -p {}", shell_quote(w)), None, None));
                    }
                }
                st.user = (!root).then_some(spec);
            }
            I::Run(r) => {
                if let Some(o) = r.options.first() {
                    return Err(refuse(
                        o.span().start,
                        format!("RUN --{} is not supported", o.name.value),
                    ));
                }
                if !r.here_docs.is_empty() {
                    return Err(refuse(
                        r.run.span.start,
                        "here-documents are not supported".into(),
                    ));
                }
                if let parse_dockerfile::Command::Shell(s) = &r.arguments {
                    if let Some(pkgs) = apt_install(s.value) {
                        if !steps.is_empty() {
                            return Err(refuse(
                                r.run.span.start,
                                "apt-get install after other RUN or COPY steps is not \
                                 supported: put it first"
                                    .into(),
                            ));
                        }
                        recipe.packages.extend(pkgs);
                        continue;
                    }
                }
                let cmd = match &r.arguments {
                    parse_dockerfile::Command::Shell(s) => s.value.to_owned(),
                    parse_dockerfile::Command::Exec(v) => v
                        .value
                        .iter()
                        .map(|a| shell_quote(&a.value))
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => {
                        return Err(refuse(
                            r.run.span.start,
                            "this form of RUN is not supported".into(),
                        ))
                    }
                };
                steps.push((
                    st.command(&cmd),
                    Some(st.env.keys().cloned().collect()),
                    st.user.clone(),
                ));
                if steps.len() > MAX_STEPS {
                    return Err(refuse(
                        r.run.span.start,
                        format!("more than {MAX_STEPS} steps"),
                    ));
                }
            }
            I::Label(l) => {
                for (k, v) in
                    pairs(&l.arguments.value).map_err(|m| refuse(l.label.span.start, m))?
                {
                    let v = st.expand(&v).map_err(|m| refuse(l.label.span.start, m))?;
                    recipe.labels.insert(k, v);
                }
            }
            I::Maintainer(m) => {
                recipe
                    .labels
                    .insert("maintainer".into(), m.name.value.to_string());
            }
            // A sandbox has no main process; these describe one.
            I::Expose(_) | I::Cmd(_) | I::Entrypoint(_) | I::Stopsignal(_) | I::Healthcheck(_) => {}
            I::Copy(_) | I::Add(_) => {
                // ADD is COPY that unpacks local tar archives (no URLs).
                let (word, at, options, src, dest, unpack) = match ins {
                    I::Copy(c) => (
                        "COPY",
                        c.copy.span.start,
                        &c.options,
                        &c.src,
                        &c.dest,
                        false,
                    ),
                    I::Add(a) => ("ADD", a.add.span.start, &a.options, &a.src, &a.dest, true),
                    _ => unreachable!("matched above"),
                };
                let Some(ctx) = context else {
                    return Err(refuse(
                        at,
                        format!("{word} needs a build context (a tar of the files it copies)"),
                    ));
                };
                if let Some(o) = options.first() {
                    return Err(refuse(
                        o.span().start,
                        format!("{word} --{} is not supported", o.name.value),
                    ));
                }
                let mut sources = Vec::with_capacity(src.len());
                for s in src {
                    let parse_dockerfile::Source::Path(p) = s else {
                        return Err(refuse(at, "here-documents are not supported".into()));
                    };
                    let v = st.expand(&p.value).map_err(|m| refuse(at, m))?;
                    sources.push(ctx.source(&unquote(&v)).map_err(|m| refuse(at, m))?);
                }
                let dest = st.expand(&dest.value).map_err(|m| refuse(at, m))?;
                let dest = unquote(dest.trim());
                let step = st
                    .copy(ctx, &sources, &dest, unpack)
                    .map_err(|m| refuse(at, m))?;
                steps.push((step, None, None));
                if steps.len() > MAX_STEPS {
                    return Err(refuse(at, format!("more than {MAX_STEPS} steps")));
                }
            }
            other => {
                return Err(refuse(
                    span_of(other).start,
                    format!("{} is not supported", keyword(other)),
                ))
            }
        }
    }
    if !seen_from {
        return Err(DockerfileError {
            line: 0,
            message: "no FROM instruction".into(),
        });
    }
    // The template's environment is every step's too (the build sets it): a step does
    // not see what is set only after it.
    recipe.run = steps
        .into_iter()
        .map(|(cmd, before, user)| {
            let cmd = match before {
                None => cmd,
                Some(before) => {
                    let later: Vec<&str> = st
                        .env
                        .keys()
                        .filter(|k| before.binary_search(k).is_err())
                        .map(String::as_str)
                        .collect();
                    match later.is_empty() {
                        true => cmd,
                        false => format!("unset {}; {cmd}", later.join(" ")),
                    }
                }
            };
            match user {
                Some(u) => format!("{}{u}\n{cmd}", forkbox_types::api::BUILD_USER_STEP),
                None => cmd,
            }
        })
        .collect();
    if recipe.run.iter().map(String::len).sum::<usize>() > MAX_RENDERED {
        return Err(DockerfileError {
            line: 0,
            message: format!("its steps come to more than {MAX_RENDERED} bytes"),
        });
    }
    recipe.env = st.env;
    recipe.workdir = st.workdir;
    recipe.args = st.args;
    Ok(recipe)
}

/// The packages of a `RUN` that only installs Debian packages (`apt-get update`,
/// `apt-get install [-y] [--no-install-recommends] pkg…`, `apt-get clean`,
/// `rm -rf /var/lib/apt/lists/*`, joined by `&&` or `;`), if it is one.
fn apt_install(cmd: &str) -> Option<Vec<String>> {
    let mut pkgs = Vec::new();
    let mut installs = false;
    for part in cmd.replace('\\', " ").split(['&', ';']) {
        let words: Vec<&str> = part.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            ["apt-get" | "apt", "update", rest @ ..] if rest.iter().all(|w| w.starts_with('-')) => {
            }
            ["apt-get" | "apt", "clean"] => {}
            ["rm", "-rf", "/var/lib/apt/lists/*"] => {}
            ["apt-get" | "apt", "install", rest @ ..] => {
                installs = true;
                for w in rest {
                    if w.starts_with('-') {
                        if !matches!(
                            *w,
                            "-y" | "--yes"
                                | "-q"
                                | "-qq"
                                | "--no-install-recommends"
                                | "-yq"
                                | "-qy"
                        ) {
                            return None;
                        }
                    } else if is_package(w) {
                        pkgs.push((*w).to_owned());
                    } else {
                        return None;
                    }
                }
            }
            _ => return None,
        }
    }
    (installs && !pkgs.is_empty()).then_some(pkgs)
}

/// A Debian package name, optionally `=version`.
fn is_package(w: &str) -> bool {
    let (name, version) = w.split_once('=').unwrap_or((w, "0"));
    let version_ok = !version.is_empty()
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+.~:-".contains(&b));
    version_ok
        && name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// What a `FROM` starts from.
enum From {
    Debian,
    Template(String),
    /// An OCI image in a registry.
    Image(String),
}

/// What `FROM image` starts from: a forkbox template is a bare name (`python`); a
/// name with a tag, digest or path is an OCI image.
fn base_of(image: &str) -> Result<From, String> {
    match image {
        "debian" | "debian:bookworm" | "debian-bookworm" => return Ok(From::Debian),
        "scratch" => return Err("FROM scratch is not supported: start FROM debian".into()),
        _ => {}
    }
    if image.is_empty()
        || image.len() > 512
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("FROM {image:?} names no image"));
    }
    if image.contains([':', '/', '@']) {
        return Ok(From::Image(image.to_owned()));
    }
    let template = image.len() <= 64
        && image
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if template {
        Ok(From::Template(image.to_owned()))
    } else {
        Err(format!(
            "FROM {image} is neither a forkbox template name (a-z, 0-9, - and _) nor an \
             image reference"
        ))
    }
}

/// What is set before an instruction.
#[derive(Default)]
struct State {
    args: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    /// The `USER` of the steps from here (`None`: root).
    user: Option<String>,
    /// `FROM` an OCI image: until a `WORKDIR`, steps run where the image's working
    /// directory is (the build knows it; this reading does not).
    from_image: bool,
}

impl State {
    /// Expands `$VAR`, `${VAR}`, `${VAR:-default}` and `${VAR:+alt}` from the
    /// environment, then the arguments; `\$` is a literal `$`.
    fn expand(&self, s: &str) -> Result<String, String> {
        let get = |k: &str| self.env.get(k).or_else(|| self.args.get(k)).cloned();
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'$') => {
                    out.push('$');
                    chars.next();
                }
                '$' if chars.peek() == Some(&'{') => {
                    chars.next();
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => inner.push(c),
                            None => return Err(format!("unterminated ${{ in {s:?}")),
                        }
                    }
                    let (name, op) = match inner.find(':') {
                        Some(i) => (&inner[..i], Some(&inner[i + 1..])),
                        None => (inner.as_str(), None),
                    };
                    if !is_name(name) {
                        return Err(format!("bad variable ${{{inner}}}"));
                    }
                    let v = get(name).filter(|v| !v.is_empty());
                    match op {
                        None => out.push_str(&v.unwrap_or_default()),
                        Some(o) if o.starts_with('-') => {
                            out.push_str(&v.unwrap_or_else(|| o[1..].to_owned()))
                        }
                        Some(o) if o.starts_with('+') => {
                            if v.is_some() {
                                out.push_str(&o[1..]);
                            }
                        }
                        Some(_) => return Err(format!("unsupported ${{{inner}}}")),
                    }
                }
                '$' if chars
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphabetic() || *c == '_') =>
                {
                    let mut name = String::new();
                    while let Some(c) = chars.peek() {
                        if c.is_ascii_alphanumeric() || *c == '_' {
                            name.push(*c);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    out.push_str(&get(&name).unwrap_or_default());
                }
                c => out.push(c),
            }
            if out.len() > MAX_VALUE {
                return Err(format!("a value longer than {MAX_VALUE} bytes"));
            }
        }
        Ok(out)
    }

    /// A `COPY` of `sources` (paths of `ctx`; `None`: all of it) to `dest` (relative
    /// ones from the working directory), as Docker copies: a directory's contents into
    /// the destination directory; a file into it when it ends in `/` or there are
    /// several sources, else to that path. Owned by root, modes kept.
    fn copy(
        &self,
        ctx: &Context,
        sources: &[Option<String>],
        dest: &str,
        unpack: bool,
    ) -> Result<String, String> {
        if dest.is_empty() || dest.contains('\0') {
            return Err("COPY needs a destination".into());
        }
        if !dest.starts_with('/') && self.workdir.is_none() && self.from_image {
            return Err(
                "COPY to a relative destination after FROM an image needs a WORKDIR first".into(),
            );
        }
        // (ADD of an archive: unpacked into the destination directory.)
        let unpacked = |p: &str| unpack && ctx.is_archive(p);
        let into_dir = dest.ends_with('/')
            || dest == "."
            || sources.len() > 1
            || sources
                .iter()
                .any(|s| s.as_deref().is_none_or(|p| ctx.is_dir(p) || unpacked(p)));
        let abs = if dest.starts_with('/') {
            dest.to_owned()
        } else {
            format!("{}/{dest}", self.workdir.as_deref().unwrap_or("/"))
        };
        let target = normalize(&abs);
        let q = shell_quote;
        let d = q(&target);
        let mut script = format!("{COPY_STEP}{} -C \"$t\"", q(CONTEXT_TAR));
        if sources.iter().all(Option::is_some) {
            script.push_str(" --");
            for p in sources.iter().flatten() {
                script.push(' ');
                script.push_str(&q(p));
            }
        }
        for s in sources {
            let part = match s {
                None => format!("mkdir -p {d} && cp -a \"$t\"/. {d}/"),
                Some(p) if ctx.is_dir(p) => format!("mkdir -p {d} && cp -a \"$t\"/{}/. {d}/", q(p)),
                Some(p) if unpacked(p) => format!(
                    "mkdir -p {d} && tar -x --no-same-owner -f \"$t\"/{} -C {d}",
                    q(p)
                ),
                Some(p) if into_dir => format!("mkdir -p {d} && cp -a \"$t\"/{} {d}/", q(p)),
                Some(p) => {
                    let parent = match target.rsplit_once('/') {
                        Some(("", _)) | None => "/",
                        Some((a, _)) => a,
                    };
                    format!("mkdir -p {} && cp -a \"$t\"/{} {d}", q(parent), q(p))
                }
            };
            script.push_str(" && ");
            script.push_str(&part);
        }
        // What it copies, by content: the step's text (and so a kept build step's
        // key) changes when those files do, not when the rest of the context does.
        script.push_str(&format!(" && rm -rf \"$t\" # {}", ctx.digest_of(sources)));
        Ok(script)
    }

    /// `cmd` as a step: the environment and directory set so far, then the command
    /// (`read` unsets what the template sets only later; `ARG` values are the build's
    /// environment, not the step's text, which a template shows).
    fn command(&self, cmd: &str) -> String {
        let mut pre = String::new();
        for (k, v) in &self.env {
            pre.push_str(&format!("export {k}={}; ", shell_quote(v)));
        }
        if self.workdir.is_none() && self.from_image {
            return format!("{pre}{cmd}");
        }
        let dir = self.workdir.as_deref().unwrap_or("/root");
        let dir = shell_quote(dir);
        format!("{pre}mkdir -p {dir} && cd {dir} && {cmd}")
    }
}

/// The `k=v` pairs of `ENV`/`LABEL` (values may be quoted), or the old `ENV k v`.
fn pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let s = s.trim();
    let first = s.split_whitespace().next().unwrap_or_default();
    if !first.contains('=') {
        // ENV key value (the rest of the line is the value).
        let (k, v) = s.split_once(char::is_whitespace).unwrap_or((s, ""));
        if !is_name(k) {
            return Err(format!("bad name {k:?}"));
        }
        return Ok(vec![(k.to_owned(), v.trim().to_owned())]);
    }
    let mut out = Vec::new();
    for word in words(s)? {
        let (k, v) = word
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, not {word:?}"))?;
        let k = unquote(k);
        if k.is_empty() || k.contains(['\0', '\n']) {
            return Err(format!("bad name in {word:?}"));
        }
        out.push((k, v.to_owned()));
    }
    Ok(out)
}

/// Splits on unquoted whitespace, removing the quotes (and backslash escapes).
fn words(s: &str) -> Result<Vec<String>, String> {
    let (mut out, mut cur, mut quote) = (Vec::new(), String::new(), None::<char>);
    let mut started = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                started = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                started = true;
            }
            (_, c) => {
                cur.push(c);
                started = true;
            }
        }
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in {s:?}"));
    }
    if started {
        out.push(cur);
    }
    Ok(out)
}

fn unquote(s: &str) -> String {
    words(s)
        .ok()
        .map(|w| w.join(" "))
        .unwrap_or_else(|| s.to_owned())
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `/a/./b/../c` → `/a/c`.
fn normalize(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `s` as one `sh` word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn span_of(i: &parse_dockerfile::Instruction<'_>) -> std::ops::Range<usize> {
    use parse_dockerfile::Instruction as I;
    match i {
        I::Add(x) => x.add.span.clone(),
        I::Arg(x) => x.arg.span.clone(),
        I::Cmd(x) => x.cmd.span.clone(),
        I::Copy(x) => x.copy.span.clone(),
        I::Entrypoint(x) => x.entrypoint.span.clone(),
        I::Env(x) => x.env.span.clone(),
        I::Expose(x) => x.expose.span.clone(),
        I::From(x) => x.from.span.clone(),
        I::Healthcheck(x) => x.healthcheck.span.clone(),
        I::Label(x) => x.label.span.clone(),
        I::Maintainer(x) => x.maintainer.span.clone(),
        I::Onbuild(x) => x.onbuild.span.clone(),
        I::Run(x) => x.run.span.clone(),
        I::Shell(x) => x.shell.span.clone(),
        I::Stopsignal(x) => x.stopsignal.span.clone(),
        I::User(x) => x.user.span.clone(),
        I::Volume(x) => x.volume.span.clone(),
        I::Workdir(x) => x.workdir.span.clone(),
        _ => 0..0,
    }
}

fn keyword(i: &parse_dockerfile::Instruction<'_>) -> &'static str {
    use parse_dockerfile::Instruction as I;
    match i {
        I::Add(_) => "ADD",
        I::Arg(_) => "ARG",
        I::Cmd(_) => "CMD",
        I::Copy(_) => "COPY",
        I::Entrypoint(_) => "ENTRYPOINT",
        I::Env(_) => "ENV",
        I::Expose(_) => "EXPOSE",
        I::From(_) => "FROM",
        I::Healthcheck(_) => "HEALTHCHECK",
        I::Label(_) => "LABEL",
        I::Maintainer(_) => "MAINTAINER",
        I::Onbuild(_) => "ONBUILD",
        I::Run(_) => "RUN",
        I::Shell(_) => "SHELL",
        I::Stopsignal(_) => "STOPSIGNAL",
        I::User(_) => "USER",
        I::Volume(_) => "VOLUME",
        I::Workdir(_) => "WORKDIR",
        _ => "this instruction",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn read0(text: &str) -> Result<Recipe, DockerfileError> {
        read(text, &BTreeMap::new())
    }

    #[test]
    fn a_one_stage_dockerfile_becomes_steps_with_their_own_env_and_dir() {
        let r = read(
            "# syntax=docker/dockerfile:1\nARG BASE=python\nFROM ${BASE}\nARG GREETING=hi\n\
             ENV APP=/srv/app LEVEL=\"very high\"\nWORKDIR $APP\nRUN echo \"$GREETING\" > g.txt\n\
             WORKDIR sub/..//lib\nENV LATER=1\nRUN [\"python3\", \"-c\", \"print('x y')\"]\n\
             LABEL org.example.v=\"1.0\"\nCMD [\"python3\"]\nEXPOSE 8000\n",
            &BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
        )
        .unwrap();
        assert_eq!(r.base.as_deref(), Some("python"));
        assert_eq!(
            r.env,
            BTreeMap::from([
                ("APP".into(), "/srv/app".into()),
                ("LATER".into(), "1".into()),
                ("LEVEL".into(), "very high".into()),
            ])
        );
        assert_eq!(r.workdir.as_deref(), Some("/srv/app/lib"));
        assert_eq!(r.labels["org.example.v"], "1.0");
        assert_eq!(r.run.len(), 2);
        // The first step: the build's argument, the ENV so far, its directory; not LATER.
        assert_eq!(
            r.run[0],
            "unset LATER; export APP='/srv/app'; export LEVEL='very high'; \
             mkdir -p '/srv/app' && cd '/srv/app' && echo \"$GREETING\" > g.txt"
        );
        // The argument is the build's environment, not the step's text.
        assert_eq!(r.args["GREETING"], "hello");
        assert!(r.run[1].starts_with("export APP="), "{}", r.run[1]);
        assert!(r.run[1].contains("export LATER='1'"));
        assert!(r.run[1].ends_with("cd '/srv/app/lib' && 'python3' '-c' 'print('\\''x y'\\'')'"));
    }

    #[test]
    fn apt_get_install_first_is_the_package_step() {
        let r = read0(
            "FROM python\nENV DEBIAN_FRONTEND=noninteractive\n\
             RUN apt-get update && apt-get install -y --no-install-recommends jq curl=7.88* \\\n && rm -rf /var/lib/apt/lists/*\n\
             RUN jq --version\n",
        );
        // A version pattern is no package name: that RUN stays a command.
        assert_eq!(r.unwrap().packages, Vec::<String>::new());
        let r = read0(
            "FROM python\nRUN apt-get update && apt-get install -y --no-install-recommends jq \\\n && rm -rf /var/lib/apt/lists/*\n\
             RUN jq --version\n",
        )
        .unwrap();
        assert_eq!(r.packages, ["jq"]);
        assert_eq!(r.run.len(), 1);
        let e = read0("FROM python\nRUN true\nRUN apt-get install -y jq\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("put it first"), "{e}");
        assert_eq!(apt_install("apt-get install -y jq; echo hi"), None);
        assert_eq!(apt_install("apt-get update"), None);
    }

    #[test]
    fn user_steps_run_as_the_user_and_their_directories_are_made_for_them() {
        let r = read0(
            "FROM python\nWORKDIR /srv\nRUN useradd -m app\nUSER app\nRUN id -un > me\n\
             WORKDIR /srv/app\nRUN touch x\nUSER root\nRUN id -u\n",
        )
        .unwrap();
        assert_eq!(
            r.run,
            [
                "mkdir -p '/srv' && cd '/srv' && useradd -m app",
                "mkdir -p '/srv'",
                "#forkbox-user app\nmkdir -p '/srv' && cd '/srv' && id -un > me",
                "[ -d '/srv/app' ] || { mkdir -p '/srv/app' && chown -- 'app' '/srv/app'; }",
                "#forkbox-user app\nmkdir -p '/srv/app' && cd '/srv/app' && touch x",
                "mkdir -p '/srv/app' && cd '/srv/app' && id -u",
            ]
        );
        assert_eq!(forkbox_types::api::step_user(&r.run[2]), Some("app"));
        let r = read0("FROM python\nARG U=1000:1000\nUSER $U\nRUN true\n").unwrap();
        assert_eq!(forkbox_types::api::step_user(&r.run[0]), Some("1000:1000"));
        for bad in [
            "USER a b",
            "USER a:b:c",
            "USER ''",
            "USER $(id)",
            "USER -R",
            "USER a:-x",
        ] {
            let e = read0(&format!("FROM python\n{bad}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}: {e}");
        }
    }

    #[test]
    fn debian_and_defaults() {
        let r = read0("FROM debian:bookworm\nRUN true\n").unwrap();
        assert_eq!(r.base, None);
        assert_eq!(r.image, None);
        assert_eq!(r.run, ["mkdir -p '/root' && cd '/root' && true"]);
        let r = read0("FROM python:3.11-slim\nRUN true\n").unwrap();
        assert_eq!(
            (r.base, r.image.as_deref()),
            (None, Some("python:3.11-slim"))
        );
        let r = read0("ARG REG=127.0.0.1:5000\nFROM ${REG}/team/app:v1\n").unwrap();
        assert_eq!(r.image.as_deref(), Some("127.0.0.1:5000/team/app:v1"));
        assert_eq!(read0("FROM python\nENV A b c\n").unwrap().env["A"], "b c");
        assert_eq!(
            read0("FROM python\nARG X\nENV Y=${X:-dflt} Z=${X:+set}\n")
                .unwrap()
                .env,
            BTreeMap::from([("Y".into(), "dflt".into()), ("Z".into(), "".into())])
        );
    }

    #[test]
    fn what_cannot_be_built_is_refused_with_its_line() {
        let cases = [
            ("FROM python\nCOPY app.py /srv/\n", 2, "build context"),
            ("FROM python\n\nADD x /y\n", 3, "ADD"),
            ("FROM python\nUSER no body\n", 2, "USER"),
            (
                "FROM python\nRUN --mount=type=cache,target=/c true\n",
                2,
                "--mount",
            ),
            ("FROM python AS a\nRUN true\nFROM a\n", 3, "multi-stage"),
            ("FROM Python\n", 1, "neither"),
            ("FROM scratch\n", 1, "scratch"),
            ("RUN true\n", 1, "FROM"),
            ("FROM python\nENV ${\n", 2, ""),
            ("FROM python\nSHELL [\"/bin/bash\", \"-c\"]\n", 2, "SHELL"),
            (
                "FROM python\nRUN <<EOF\necho hi\nEOF\n",
                2,
                "here-documents",
            ),
        ];
        for (text, line, what) in cases {
            let e = read0(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(what), "{text:?}: {e}");
            assert!(e
                .to_string()
                .starts_with(&format!("Dockerfile line {line}:")));
        }
        assert_eq!(read0("# only a comment\n").unwrap_err().line, 0);
        // What the parser refuses, with its line too.
        let bad = read0("FROM python\nRUN true\nFROBNICATE x\n").unwrap_err();
        assert_eq!(bad.line, 3, "{bad}");
    }

    #[test]
    fn copy_takes_its_sources_from_the_context() {
        let tar = context::tests::tar_of(&[
            ("app.py", Some(b"print(42)".as_slice())),
            ("lib/", None),
            ("lib/util.py", Some(b"X = 1".as_slice())),
            ("conf.toml", Some(b"a = 1".as_slice())),
        ]);
        let ctx = Context::read(&tar).unwrap();
        let r = read_with(
            "FROM python\nWORKDIR /srv/app\nCOPY app.py .\nCOPY lib lib\n\
             COPY conf.toml /etc/app.toml\nCOPY app.py conf.toml /opt/\nCOPY . /all\n",
            &BTreeMap::new(),
            Some(&ctx),
        )
        .unwrap();
        let x = "unset TAR_OPTIONS; t=$(mktemp -d) && tar -x --no-same-owner -f \
                 '/.forkbox-context.tar' -C \"$t\"";
        let end = "&& rm -rf \"$t\"";
        assert_eq!(r.run.len(), 5);
        // Each step ends with a digest of what it copies; the rest is the copy.
        let run: Vec<&str> = r
            .run
            .iter()
            .map(|s| {
                let (step, digest) = s.rsplit_once(" # ").unwrap();
                assert_eq!(digest.len(), 64, "{s}");
                step
            })
            .collect();
        assert_eq!(
            run[0],
            format!(
                "{x} -- 'app.py' && mkdir -p '/srv/app' && cp -a \"$t\"/'app.py' '/srv/app'/ {end}"
            )
        );
        assert_eq!(
            run[1],
            format!("{x} -- 'lib' && mkdir -p '/srv/app/lib' && cp -a \"$t\"/'lib'/. '/srv/app/lib'/ {end}")
        );
        assert_eq!(
            run[2],
            format!("{x} -- 'conf.toml' && mkdir -p '/etc' && cp -a \"$t\"/'conf.toml' '/etc/app.toml' {end}")
        );
        assert_eq!(
            run[3],
            format!(
                "{x} -- 'app.py' 'conf.toml' && mkdir -p '/opt' && cp -a \"$t\"/'app.py' '/opt'/ \
                 && mkdir -p '/opt' && cp -a \"$t\"/'conf.toml' '/opt'/ {end}"
            )
        );
        assert_eq!(
            run[4],
            format!("{x} && mkdir -p '/all' && cp -a \"$t\"/. '/all'/ {end}")
        );
        // ADD: a local tar archive is unpacked into the destination; another file is
        // copied as COPY does.
        let inner = context::tests::tar_of(&[("x.txt", Some(b"x".as_slice()))]);
        let ctx = Context::read(&context::tests::tar_of(&[
            ("vendor.tar", Some(inner.as_slice())),
            ("app.py", Some(b"print(42)".as_slice())),
        ]))
        .unwrap();
        let r = read_with(
            "FROM python\nADD vendor.tar /opt/vendor\nADD app.py /srv/app.py\n",
            &BTreeMap::new(),
            Some(&ctx),
        )
        .unwrap();
        assert!(
            r.run[0].contains("&& mkdir -p '/opt/vendor' && tar -x --no-same-owner -f \"$t\"/'vendor.tar' -C '/opt/vendor'"),
            "{}",
            r.run[0]
        );
        assert!(
            r.run[1].contains("&& cp -a \"$t\"/'app.py' '/srv/app.py'"),
            "{}",
            r.run[1]
        );
        let e = read_with(
            "FROM python\nADD https://example.com/x /x\n",
            &BTreeMap::new(),
            Some(&ctx),
        )
        .unwrap_err();
        assert!(e.to_string().contains("URLs are not supported"), "{e}");
        // A step's text changes with the files it copies, not with the rest.
        let step = |files: &[(&str, Option<&[u8]>)]| {
            let c = Context::read(&context::tests::tar_of(files)).unwrap();
            read_with("FROM python\nCOPY app.py /a/\n", &BTreeMap::new(), Some(&c))
                .unwrap()
                .run
                .remove(0)
        };
        let one = step(&[("app.py", Some(b"1")), ("other", Some(b"x"))]);
        assert_eq!(one, step(&[("app.py", Some(b"1")), ("other", Some(b"y"))]));
        assert_ne!(one, step(&[("app.py", Some(b"2")), ("other", Some(b"x"))]));
        for (text, what) in [
            (
                "FROM python\nCOPY missing.py /x\n",
                "not in the build context",
            ),
            ("FROM python\nCOPY *.py /x/\n", "patterns"),
            ("FROM python\nCOPY ../x /x\n", "leaves"),
            ("FROM python\nCOPY --chown=1:1 app.py /x\n", "--chown"),
        ] {
            let e = read_with(text, &BTreeMap::new(), Some(&ctx)).unwrap_err();
            assert_eq!(e.line, 2, "{text:?}: {e}");
            assert!(e.message.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn expansions_and_sizes_are_bounded() {
        let mut text = String::from("FROM python\nENV A=xxxxxxxxxxxxxxxx\n");
        for _ in 0..40 {
            text.push_str("ENV A=$A$A\n");
        }
        let e = read0(&text).unwrap_err();
        assert!(e.message.contains("longer than"), "{e}");
        let many = format!("FROM python\n{}", "RUN true\n".repeat(300));
        assert!(read0(&many).unwrap_err().message.contains("steps"));
        let huge = format!("FROM python\n# {}\n", "x".repeat(MAX_DOCKERFILE));
        assert_eq!(read0(&huge).unwrap_err().line, 0);
        let e = read0("FROM python\nENV \"a;id;b\"=1\n").unwrap_err();
        assert!(e.message.contains("bad ENV name"), "{e}");
    }
}
