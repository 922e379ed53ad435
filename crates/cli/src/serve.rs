//! `forkbox serve`.

use crate::config::{self, HostArgs};
use anyhow::Context;
use clap::Args;
use forkbox_api::AppState;
use forkbox_core::{Manager, ManagerConfig, Runtime};
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Address to listen on (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:7070", env = "FORKBOX_LISTEN")]
    pub listen: SocketAddr,
    /// The URL other nodes and clients reach this server at, as `GET /v1/nodes` and
    /// refusals for other nodes' sandboxes tell it. Default: http://<listen>.
    #[arg(long, env = "FORKBOX_ADVERTISE")]
    pub advertise: Option<String>,
    /// Template used when a create request names none.
    #[arg(long, default_value = "python")]
    pub default_template: String,
    /// Ready sandboxes of the default template kept for create (refilled in the
    /// background): a create with default limits, no env, egress, volumes or snapshot
    /// is then a hand-over. 0 turns the pool off.
    #[arg(long, default_value_t = 2, env = "FORKBOX_WARM_POOL")]
    pub warm_pool: usize,
    /// Most ready sandboxes create's warm pool grows to when bursts of creates take
    /// from it: it keeps as many as the largest burst of the last 5 minutes took
    /// (takes less than 1 s apart), then shrinks back. Each ready sandbox costs about
    /// 1 MiB of host memory idle.
    #[arg(long, default_value_t = 32, env = "FORKBOX_WARM_POOL_MAX")]
    pub warm_pool_max: usize,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// What stopping the server (SIGTERM, Ctrl-C) does to running sandboxes: `keep`
    /// them running, for the next server to adopt, or `destroy` them.
    #[arg(long, value_enum, default_value_t = OnExit::Keep)]
    pub on_exit: OnExit,
    /// Require an API key on every request but health checks and /openapi.json. Needed
    /// to listen on a non-loopback address.
    #[arg(long, env = "FORKBOX_AUTH")]
    pub auth: bool,
    /// Listen on a non-loopback address without API keys (anyone who reaches the port
    /// can run code).
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// An admin key of the default workspace to accept (made if it is new); starts
    /// with `fbk_`.
    #[arg(long, env = "FORKBOX_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Runtimes sandboxes may be created with, comma-separated: `jail` (always on; it
    /// also keeps templates, volumes and snapshots) and `vm` (QEMU microvm guests; needs
    /// qemu-system-x86 and the guest assets, which `make serve` and `make vm-assets`
    /// prepare). Default: both when the vm assets and QEMU are there, else `jail`.
    #[arg(long, env = "FORKBOX_RUNTIMES", value_delimiter = ',')]
    pub runtimes: Option<Vec<String>>,
    /// Runtime of sandboxes whose create request names none.
    #[arg(long, env = "FORKBOX_DEFAULT_RUNTIME", default_value = "jail")]
    pub default_runtime: String,
    /// vm runtime: the guest assets made by `make vm-assets`. Default: <data-dir>/vm.
    #[arg(long, env = "FORKBOX_VM_ASSETS")]
    pub vm_assets: Option<std::path::PathBuf>,
    /// vm runtime: `kvm`, `tcg`, or `auto` (KVM when a trial guest boots on it within a
    /// few seconds, else TCG).
    #[arg(long, env = "FORKBOX_VM_ACCEL", default_value = "auto")]
    pub vm_accel: String,
    /// A host name requests may name in `Host` besides loopback ones and the listen
    /// address (repeatable). Without `--auth` other names are refused (DNS rebinding);
    /// with it, giving any turns the check on.
    #[arg(
        long = "allowed-host",
        env = "FORKBOX_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// An origin (`https://console.example`) whose browser requests are answered, with
    /// CORS headers (repeatable). Pages on loopback origins always are; other origins
    /// are refused (403).
    #[arg(
        long = "cors-origin",
        env = "FORKBOX_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// The domain of preview hosts: a sandbox's port is also served at
    /// `{port}-{sandbox id}.{domain}` (point a wildcard DNS name at this server to use
    /// one of your own; `*.localhost` reaches loopback in browsers without DNS).
    #[arg(long, env = "FORKBOX_PREVIEW_DOMAIN", default_value = "localhost")]
    pub preview_domain: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    Keep,
    Destroy,
}

/// A server that is set up and bound, not yet serving.
pub struct Server {
    /// The data dir is this server's while held.
    pub lock: crate::down::Lock,
    pub manager: Arc<Manager>,
    pub jail: Arc<forkbox_jail::JailRuntime>,
    pub listener: tokio::net::TcpListener,
    pub auth_required: bool,
    pub browser: forkbox_api::browser::BrowserPolicy,
}

/// Whether a server on `listen` requires keys; refuses an open non-loopback server.
fn auth_required(args: &ServeArgs) -> anyhow::Result<bool> {
    if args.auth {
        return Ok(true);
    }
    if !args.listen.ip().is_loopback() {
        anyhow::ensure!(
            args.insecure_no_auth,
            "refusing to listen on {} without API keys: pass --auth (and make a key with \
             `forkbox token create --local --admin` or FORKBOX_ADMIN_KEY), or \
             --insecure-no-auth to let anyone who reaches the port run code",
            args.listen
        );
        tracing::warn!(listen = %args.listen, "listening on a non-loopback address WITHOUT API keys");
    }
    Ok(false)
}

/// Why the vm runtime cannot run with assets in `assets`, if it cannot: a file of
/// `make vm-assets` or QEMU is missing.
fn vm_missing(assets: &std::path::Path) -> Option<String> {
    for f in ["vmlinux", "busybox", "rootfs-python.qcow2"] {
        if !assets.join(f).is_file() {
            return Some(format!("{} is missing", assets.join(f).display()));
        }
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()));
    (!on_path).then(|| "qemu-system-x86_64 is not installed".to_owned())
}

/// The runtimes to serve: `--runtimes`, or by default the jail and, when its assets
/// and QEMU are there, the vm.
fn runtimes(args: &ServeArgs) -> Vec<String> {
    if let Some(r) = &args.runtimes {
        return r.iter().map(|n| n.trim().to_owned()).collect();
    }
    let assets = args
        .vm_assets
        .clone()
        .unwrap_or_else(|| args.host.data_dir().join("vm"));
    match vm_missing(&assets) {
        None => vec!["jail".into(), "vm".into()],
        Some(why) => {
            tracing::info!(%why, "the vm runtime is off (`make vm-assets` prepares it)");
            vec!["jail".into()]
        }
    }
}

/// The runtimes besides the jail that `names` turns on.
fn other_runtimes(args: &ServeArgs, names: &[String]) -> anyhow::Result<Vec<Arc<dyn Runtime>>> {
    let mut out: Vec<Arc<dyn Runtime>> = Vec::new();
    for name in names {
        match name.trim() {
            "jail" => {}
            "vm" => {
                let data = args.host.data_dir();
                let mut cfg = forkbox_vm::VmConfig::new(&data, args.host.jail_config()?.agent_bin);
                if let Some(a) = &args.vm_assets {
                    cfg.assets_dir = a.clone();
                }
                cfg.orphan_grace = args.host.orphan_grace();
                // QEMUs run as host uids after the jail's sandbox ranges (jailer.rs).
                cfg.qemu_uid_base = Some(
                    args.host
                        .uid_base
                        .checked_add(forkbox_jail::slots::HOST_UID_SPAN)
                        .filter(|b| b.checked_add(forkbox_vm::jailer::UIDS).is_some())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--uid-base {} leaves no room for the vm runtime's QEMU uids",
                                args.host.uid_base
                            )
                        })?,
                );
                cfg.egress = Some(args.host.jail_config()?.egress);
                cfg.accel = match args.vm_accel.as_str() {
                    "auto" => None,
                    "kvm" => Some(forkbox_vm::accel::Accel::Kvm),
                    "tcg" => Some(forkbox_vm::accel::Accel::Tcg),
                    other => anyhow::bail!("--vm-accel must be auto, kvm or tcg, not {other:?}"),
                };
                out.push(Arc::new(forkbox_vm::VmRuntime::new(cfg)?));
            }
            other => anyhow::bail!("unknown runtime {other:?} (jail, vm)"),
        }
    }
    let known = |n: &str| n == "jail" || out.iter().any(|r| r.name() == n);
    anyhow::ensure!(
        known(&args.default_runtime),
        "--default-runtime {} is not among --runtimes",
        args.default_runtime
    );
    Ok(out)
}

/// The host's memory in MiB (`MemTotal`), 0 when unknown.
fn host_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// Everything `serve` does before it accepts connections.
pub async fn build(args: &ServeArgs) -> anyhow::Result<Server> {
    let auth_required = auth_required(args)?;
    let names = runtimes(args);
    let lock = tokio::task::block_in_place(|| crate::down::claim_for_server(&args.host, &names))?;
    let others = other_runtimes(args, &names)?;
    let runtime = args.host.jail_runtime()?;
    runtime
        .ensure_template(&args.default_template, &config::print_progress)
        .await
        .with_context(|| format!("prepare template {}", args.default_template))?;
    let store = args.host.open_store().await?;
    tracing::info!(
        backend = store.backend(),
        node = store.node(),
        "database open"
    );
    let jail = Arc::new(runtime);
    let manager = Manager::with_runtimes(
        store,
        jail.clone(),
        others,
        ManagerConfig {
            default_template: args.default_template.clone(),
            languages: Arc::new(args.host.languages()?),
            default_runtime: Some(args.default_runtime.clone()),
            warm_pool_max: args.warm_pool_max,
            ..ManagerConfig::default()
        },
    );
    // Bound before the node registers, so its default URL has the real port.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    // This node's name is claimed (no second server runs as it) and registered
    // before it recovers the sandboxes recorded as its own.
    let advertise = match &args.advertise {
        Some(url) => url.clone(),
        None => format!("http://{}", listener.local_addr()?),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    manager
        .register_node(
            &args.host.database(),
            &advertise,
            cpus,
            host_memory_mb(),
            args.host.orphan_grace(),
        )
        .await?;
    let (adopted, lost) = manager.recover().await?;
    if adopted + lost > 0 {
        tracing::info!(
            adopted,
            lost,
            "sandboxes of an earlier server: adopted the running ones, marked the others lost"
        );
    }
    let discarded = manager.discard_stale_pool_sandboxes().await;
    if discarded > 0 {
        tracing::info!(
            discarded,
            "deleted warm-pool sandboxes of an earlier server"
        );
    }
    manager.keep_create_pool(&args.default_template, args.warm_pool);
    if let Some(key) = &args.admin_key {
        manager
            .ensure_admin_key(key, "admin (FORKBOX_ADMIN_KEY)")
            .await?;
    }
    if auth_required
        && manager
            .tokens(&forkbox_core::auth::Principal::local())
            .await?
            .is_empty()
    {
        tracing::warn!(
            "API keys are required and none exists yet: make one with \
             `forkbox token create --local --admin` or set FORKBOX_ADMIN_KEY"
        );
    }
    let mut hosts = args.allowed_hosts.clone();
    if !args.listen.ip().is_unspecified() {
        hosts.push(args.listen.ip().to_string());
    }
    // Other nodes pass requests on with the Host this node advertised.
    if let Some(host) = advertise
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', ':']).next())
        .filter(|h| !h.is_empty())
    {
        hosts.push(host.to_owned());
    }
    let browser = forkbox_api::browser::BrowserPolicy::new(
        !auth_required || !args.allowed_hosts.is_empty(),
        hosts,
        args.cors_origins.clone(),
    );
    Ok(Server {
        lock,
        manager,
        jail,
        listener,
        auth_required,
        browser,
    })
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    config::init_tracing(args.log_json);
    raise_nofile();
    let server = build(&args).await?;
    // Held until this function returns: the data dir stays this server's.
    let _lock = server.lock;
    let addr = server.listener.local_addr()?;
    let manager = server.manager.clone();
    let jail = server.jail.clone();
    manager.spawn_reaper(std::time::Duration::from_millis(500));
    manager.spawn_heartbeat();
    // The line tests and scripts wait for.
    println!("forkbox listening on http://{addr}");
    tracing::info!(%addr, "listening");
    http(
        server.listener,
        AppState {
            manager: manager.clone(),
            auth_required: server.auth_required,
            browser: server.browser,
            replay: Default::default(),
            terminals: Default::default(),
            previews: forkbox_api::ports::Previews {
                domain: args
                    .preview_domain
                    .trim()
                    .trim_matches('.')
                    .to_ascii_lowercase(),
            },
        },
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    crate::config::flush_tracing();
    match args.on_exit {
        OnExit::Destroy => {
            tracing::info!("shutting down: destroying live sandboxes");
            manager.shutdown().await;
            jail.release_host_resources().await;
        }
        OnExit::Keep => {
            // Builds, refills and deletions in flight end first (refills stop).
            manager.drain(std::time::Duration::from_secs(30)).await;
            // Pool sandboxes are nobody's: the next server would only delete them.
            manager.discard_stale_pool_sandboxes().await;
            tracing::info!(
                sandboxes = manager.live_count(),
                "shutting down: sandboxes keep running for the next server to adopt"
            );
        }
    }
    Ok(())
}

/// The most the server raises its soft limit on open files to.
const NOFILE_SOFT: u64 = 65536;

/// Raises the soft limit on open files towards the hard one, to at most
/// [`NOFILE_SOFT`]. The server holds a few file descriptors per sandbox (its agent
/// connection, pidfd, log), so the usual soft limit of 1024 (systemd's default) would
/// stop it at a few hundred sandboxes. Sandboxes inherit the raised soft limit, which
/// gives them nothing new: the hard limit, which they could always raise their soft
/// limit to, is unchanged. The cap keeps programs that loop over every possible
/// descriptor quick.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard.min(NOFILE_SOFT) => {
            let want = hard.min(NOFILE_SOFT);
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                tracing::warn!(soft, hard, "cannot raise the open files limit: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open files limit: {e}"),
    }
}

type NoDelayListener = axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)>;

/// The API on `listener`, HTTP/1.1 and h2c, with Nagle off so streamed events leave
/// as soon as they are written.
pub fn http(
    listener: tokio::net::TcpListener,
    state: AppState,
) -> axum::serve::Serve<NoDelayListener, axum::Router, axum::Router> {
    use axum::serve::ListenerExt;
    fn nodelay(s: &mut tokio::net::TcpStream) {
        let _ = s.set_nodelay(true);
    }
    // MCP over streamable HTTP (crates/mcp): its tools call this server's own API on
    // loopback, with each request's credentials.
    let own = listener
        .local_addr()
        .map(|a| {
            let ip = if a.ip().is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                a.ip()
            };
            format!("http://{}", std::net::SocketAddr::new(ip, a.port()))
        })
        .unwrap_or_default();
    let mcp = axum::Router::new()
        .nest_service("/mcp", forkbox_mcp::http_service(own))
        .layer(axum::middleware::from_fn_with_state(
            McpSessions::default(),
            bind_mcp_sessions,
        ));
    let listener = listener.tap_io(nodelay as fn(&mut tokio::net::TcpStream));
    axum::serve(listener, forkbox_api::app_with(state, mcp))
}

/// A caller as an MCP session remembers it: (workspace, key id).
type McpCaller = Option<(String, Option<String>)>;

/// Which caller opened each MCP session, and when, by `Mcp-Session-Id`.
#[derive(Clone, Default)]
struct McpSessions(
    Arc<std::sync::Mutex<std::collections::HashMap<String, (McpCaller, std::time::Instant)>>>,
);

/// How long a session's owner is remembered after it was opened.
const MCP_SESSION_MEMORY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// An MCP session is its opener's: a request naming it with other credentials (or
/// none, when its opener had a key) is answered like an unknown session, so a leaked
/// session id gives no one else the session's results, stream or control.
async fn bind_mcp_sessions(
    axum::extract::State(sessions): axum::extract::State<McpSessions>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let who = req
        .extensions()
        .get::<forkbox_core::auth::Principal>()
        .map(|p| (p.workspace.clone(), p.token_id.clone()));
    let named = req
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(sid) = &named {
        let owner = sessions
            .0
            .lock()
            .ok()
            .and_then(|m| m.get(sid).map(|(o, _)| o.clone()));
        if owner.is_some_and(|o| o != who) {
            let body = serde_json::json!({"error": "unknown MCP session", "code": "not_found"});
            return (axum::http::StatusCode::NOT_FOUND, axum::Json(body)).into_response();
        }
    }
    let resp = next.run(req).await;
    let opened = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .filter(|_| named.is_none())
        .map(str::to_owned);
    if let (Some(sid), Ok(mut m)) = (opened, sessions.0.lock()) {
        let now = std::time::Instant::now();
        m.retain(|_, (_, at)| now.duration_since(*at) < MCP_SESSION_MEMORY);
        m.entry(sid).or_insert((who, now));
    }
    resp
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
