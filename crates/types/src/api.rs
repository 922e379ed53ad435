//! forkbox's own HTTP API (`/v1/…`): the request and response bodies the server
//! answers with and the CLI (and any Rust client) reads, defined once. The dialects
//! (Podflare, PandaStack, Declaw) keep their own shapes at the edge.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn is_false(b: &bool) -> bool {
    !*b
}

/// Every error answer: a human-readable message and a stable code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Disk limit of the sandbox's own writes in MiB (default 8192); writes past it fail
    /// with EDQUOT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Seconds without a call on the sandbox (nothing of it running through the API)
    /// after which it ends as its timeout would (`on_timeout`); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// `kill` (default) or `hibernate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<String>,
    /// Start from this snapshot (`snap-…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// W3C trace context for the sandbox's work (else the request's `traceparent`
    /// header, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Host names (`pypi.org`, `*.example.com`) the sandbox may reach through its
    /// egress proxy (`HTTP_PROXY`/`HTTPS_PROXY` are set inside). Absent or empty: no
    /// network beyond loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_allowlist: Option<Vec<String>>,
    /// Volumes of the caller's workspace to mount: `[{"id": "vol-…", "mount": "/data"}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMountBody>,
    /// `none` (default; loopback only, or the proxy when `egress_allowlist` is given).
    /// `full` (NAT to anywhere) is not offered by this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `jail` (namespaces) or `vm` (a QEMU microvm guest, when the server runs with
    /// it); absent: the server's default (`serve --default-runtime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

/// A volume mounted in a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeMountBody {
    /// `vol-…`
    pub id: String,
    /// Absolute path inside the sandbox.
    pub mount: String,
    /// Mount it read-only (default false): this sandbox reads what others write.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxView {
    pub id: String,
    pub status: String,
    pub runtime: String,
    pub template: String,
    pub cpu: f64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub timeout: u64,
    /// Seconds without calls before it ends like a timeout; `null`: never.
    pub idle_timeout: Option<u64>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: String,
    pub expires_at: String,
    /// When it ended (deleted, killed, failed, merged, lost); `null` while alive.
    pub ended_at: Option<String>,
    /// Why it ended, e.g. `deleted by client`, `agent exited`, `timeout expired`.
    pub end_reason: Option<String>,
    pub boot_ms: f64,
    /// The sandbox this one was forked from.
    pub parent: Option<String>,
    pub on_timeout: String,
    /// Host names its egress proxy admits; `null`: no network beyond loopback.
    pub egress_allowlist: Option<Vec<String>>,
    /// Volumes it mounts.
    pub volumes: Vec<VolumeMountBody>,
    /// The node (server) that runs it, when several share a database (`GET /v1/nodes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// `GET /v1/sandboxes`: one page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListView {
    pub sandboxes: Vec<SandboxView>,
    pub next_token: Option<String>,
}

/// `POST /v1/sandboxes/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// Number of children, 1 to 32 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<i64>,
    /// Added to (or replacing keys of) the parent's metadata in every child.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// The answer of a fork.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ForkView {
    pub parent: String,
    /// The children's ids, in order.
    pub children: Vec<String>,
    pub sandboxes: Vec<SandboxView>,
    /// What the children inherited from the parent.
    pub carried: Vec<String>,
    /// What they did not (the runtime's words).
    pub not_carried: String,
}

/// `POST /v1/sandboxes/{id}/exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// A cell for the persistent REPL (`run_code`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// `python` (default), `javascript` or `bash`, with common aliases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Run `code` in this code context (`ctx-…`, `ctxjs-…`: see `…/contexts`) instead
    /// of the REPL's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Answer with one JSON result instead of a stream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub wait: bool,
    /// Start the command and answer at once with its pid (see `…/commands`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub background: bool,
}

/// `POST /v1/templates`: a template to build. Every way of building one (the API,
/// `forkbox template build`, PandaStack's template calls) becomes this.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    /// 1-64 characters of a-z, 0-9, '-' and '_'.
    pub name: String,
    /// `debian-bookworm` (default: a fresh Debian root made by mmdebstrap) or an
    /// existing template to layer on (a copy-on-write snapshot of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Debian packages to install.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Shell commands run in order inside a build sandbox; the first failure fails the
    /// build.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run: Vec<String>,
    /// Environment of the commands and of the template's sandboxes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory of the commands (made if missing; default `/root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Host names the build commands may reach through an egress proxy (`HTTP_PROXY`
    /// is set); absent: no network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_allowlist: Option<Vec<String>>,
    /// A Dockerfile instead of `base`, `packages`, `run`, `env` and `workdir`: its
    /// `FROM` names the base (a template, or `debian`), its `RUN`, `COPY`, `ENV`,
    /// `WORKDIR`, `ARG` and `LABEL` are the build (docs/api.md lists what is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// The Dockerfile's `ARG` values (like `docker build --build-arg`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    /// The build context a Dockerfile's `COPY` takes files from: a tar, base64
    /// (within the request size limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// An OCI image in a registry to start from instead of `base`
    /// (`[host[:port]/]repository[:tag][@digest]`; no host: Docker Hub), pulled by the
    /// server; its `Env` and `WorkingDir` come under `env` and `workdir`. A Dockerfile
    /// names it in `FROM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Credentials for the image's registry (HTTP Basic, or to get a Bearer token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
}

/// A registry's credentials (never shown: `Debug` leaves the password out).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryAuth({}, <redacted>)", self.username)
    }
}

/// Where a template build's context (the tar a Dockerfile's `COPY` takes files from)
/// is put in the build sandbox, for the build's commands only.
pub const BUILD_CONTEXT_TAR: &str = "/.forkbox-context.tar";

/// How every step that copies from a build's context starts (a Dockerfile's `COPY`;
/// no other step does): the build gives the context to these steps only.
pub const BUILD_COPY_STEP: &str = "unset TAR_OPTIONS; t=$(mktemp -d) && tar -x --no-same-owner -f ";

/// How a build step that runs as another user than root starts (a Dockerfile's
/// `USER`): this, the user (`name`, `uid`, `name:group`, `uid:gid`), a newline, then
/// the command. For the shell the first line is a comment.
pub const BUILD_USER_STEP: &str = "#forkbox-user ";

/// The user a build step runs as (`None`: root), as [`BUILD_USER_STEP`] says.
pub fn step_user(step: &str) -> Option<&str> {
    let rest = step.strip_prefix(BUILD_USER_STEP)?;
    let (user, _) = rest.split_once('\n')?;
    let ok = !user.is_empty()
        && !user.starts_with('-')
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    ok.then_some(user)
}

/// A template as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateView {
    pub name: String,
    /// `ready`, `building` or `failed`.
    pub status: String,
    /// `debian-bookworm` or the template it was layered on.
    pub base: String,
    /// Packages it added to its base.
    pub packages: Vec<String>,
    pub run: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// Bytes of its files (when measured).
    pub size: Option<u64>,
    /// When it was built (or its build started).
    pub created: String,
    pub build_seconds: Option<f64>,
    /// Why its build failed.
    pub error: Option<String>,
    /// The OCI image it was imported from (`POST /v1/templates/{name}/image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
}

/// An imported OCI image: its digest and what its configuration says. `Env` and
/// `WorkingDir` become the template's `env` and `workdir`; the rest is recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageInfo {
    /// The digest of its manifest (`sha256:…`); of its configuration for a `docker
    /// save` archive without one.
    pub digest: String,
    /// The name it had in the archive, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Layers applied.
    pub layers: usize,
}

/// `GET /v1/templates`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateList {
    pub templates: Vec<TemplateView>,
}

/// One NDJSON line of a template build: progress lines, then `ready` or `failed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    Progress { data: String },
    Ready { template: Box<TemplateView> },
    Failed { error: String },
}

/// An API key's record; `key` only in the answer that created it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub workspace: String,
    /// The key's first characters.
    pub prefix: String,
    pub admin: bool,
    pub created_at: String,
    pub revoked_at: Option<String>,
    /// After this the key fails; `null`: it does not expire.
    pub expires_at: Option<String>,
    /// The key itself: shown once, at creation; store it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `GET /v1/auth/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// `POST /v1/auth/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    /// A label for the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key's workspace (default: the caller's; another one needs an admin key and
    /// is created if new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Whether the key may manage every workspace's keys and quotas (admin keys only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub admin: bool,
    /// Seconds until the key expires (default: never; at most ten years).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
}

/// A node: one server of those sharing a database (`GET /v1/nodes`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeView {
    pub name: String,
    /// Where it is reached (`serve --advertise`).
    pub url: String,
    /// `up` (heard from within 15 s) or `down`.
    pub state: String,
    /// The node that answered this request.
    pub this: bool,
    pub runtimes: Vec<String>,
    /// Sandboxes it ran at its last heartbeat.
    pub sandboxes: u64,
    /// What it offers to placement: CPUs, memory (MiB), built templates.
    pub cpus: u64,
    pub memory_mb: u64,
    pub templates: Vec<String>,
    /// Takes no new sandboxes (`forkbox node drain`).
    pub draining: bool,
    pub started_at: String,
    pub heartbeat_at: String,
}

/// `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn build_events_keep_their_wire_shape() {
        let ev = BuildEvent::Progress { data: "x".into() };
        assert_eq!(
            serde_json::to_string(&ev).unwrap(),
            r#"{"type":"progress","data":"x"}"#
        );
        let back: BuildEvent = serde_json::from_str(r#"{"type":"failed","error":"no"}"#).unwrap();
        assert_eq!(back, BuildEvent::Failed { error: "no".into() });
    }

    #[test]
    fn a_request_sends_only_what_is_set() {
        let b = CreateBody {
            template: Some("python".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"template":"python"}"#
        );
        assert!(serde_json::from_str::<CreateBody>(r#"{"nope": 1}"#).is_err());
    }
}
