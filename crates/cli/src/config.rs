//! Where things live on the host, shared by every subcommand.

use anyhow::Context;
use clap::Args;
use forkbox_jail::{JailConfig, JailRuntime};
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct HostArgs {
    /// State directory (database, pool, sockets). Default: /var/lib/forkbox as root,
    /// $XDG_DATA_HOME/forkbox otherwise.
    #[arg(long, env = "FORKBOX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The database of sandboxes, snapshots, volumes, keys and quotas: a PostgreSQL URL
    /// (`postgres://user:password@host/db`, or `?host=/socket/dir`), else
    /// <data-dir>/forkbox.db (SQLite). Several servers may share a PostgreSQL database,
    /// each as a node of its own name (`--node`); see docs/cluster.md.
    #[arg(long, env = "FORKBOX_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
    /// This server's name among the servers sharing a database (its sandboxes are
    /// recorded as this node's). Default: the host name.
    #[arg(long, env = "FORKBOX_NODE")]
    pub node: Option<String>,
    /// btrfs pool for templates and root filesystems. Default: <data-dir>/pool.
    #[arg(long, env = "FORKBOX_POOL")]
    pub pool: Option<PathBuf>,
    /// Size of the sparse pool image made when the pool is not on btrfs.
    #[arg(long, default_value_t = 64)]
    pub pool_size_gb: u64,
    /// The static forkbox-agent binary. Default: beside this executable.
    #[arg(long, env = "FORKBOX_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
    /// First host uid/gid of the sandboxes' ids: files are stored as the 65536 ids from
    /// there; each running sandbox runs as 65536 ids of its own above it (up to about
    /// 2^30 more, leased host-wide under /run/forkbox/uid-blocks).
    #[arg(long, default_value_t = 1_000_000)]
    pub uid_base: u32,
    /// Leave the host's cgroup2 mount options alone (by default forkbox turns on
    /// `favordynmods`, which makes moving a sandbox into its cgroup ~10 ms faster).
    #[arg(long)]
    pub no_favordynmods: bool,
    /// Fixed answers for the egress proxy's name lookups, `name=ip` (like curl's
    /// `--resolve`; private mirrors, tests). Repeatable, or comma-separated in the env.
    #[arg(long, env = "FORKBOX_EGRESS_RESOLVE", value_delimiter = ',', value_parser = parse_resolve)]
    pub egress_resolve: Vec<(String, std::net::IpAddr)>,
    /// Address ranges (CIDR; a bare address is one host) that are not globally
    /// reachable (private, shared 100.64/10, unique-local, …) but that egress proxies
    /// may connect to anyway, e.g. a private mirror's network. The host's own
    /// addresses, loopback, link-local and 10.200.0.0/16 stay refused. Repeatable, or
    /// comma-separated in the env.
    #[arg(long, env = "FORKBOX_EGRESS_ALLOW_PRIVATE", value_delimiter = ',', value_parser = parse_cidr)]
    pub egress_allow_private: Vec<ipnet::IpNet>,
    /// Seconds an egress tunnel may move no byte either way before it is closed (made
    /// short by tests only).
    #[arg(
        long,
        env = "FORKBOX_EGRESS_IDLE_TIMEOUT",
        default_value_t = 300,
        hide = true
    )]
    pub egress_idle_timeout: u64,
    /// How sandboxes' disk limits (`disk_mb`) are enforced: `simple` (btrfs simple
    /// quotas, Linux 6.7+; free for forks; on older kernels the server runs without
    /// limits and logs it), `full` (btrfs quota groups: any kernel, but every snapshot
    /// is accounted and a fork can take seconds), `off` (one sandbox can fill the pool).
    #[arg(long, env = "FORKBOX_DISK_LIMITS", value_enum, default_value_t = DiskLimits::Simple)]
    pub disk_limits: DiskLimits,
    /// Languages and template recipes (TOML; default: the list built into forkbox).
    #[arg(long, env = "FORKBOX_LANGUAGES")]
    pub languages: Option<PathBuf>,
    /// The dead-man's switch: seconds a sandbox outlives its server. A server back
    /// within this time re-adopts its sandboxes; after it, they end themselves and the
    /// server's warden frees what they held on the host. 0 turns it off.
    #[arg(long, env = "FORKBOX_ORPHAN_GRACE", default_value_t = 600)]
    pub orphan_grace: u64,
}

/// `serve --disk-limits`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskLimits {
    Simple,
    Full,
    Off,
}

fn parse_resolve(s: &str) -> Result<(String, std::net::IpAddr), String> {
    let (name, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not name=ip"))?;
    let ip = ip
        .trim()
        .parse()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    Ok((name.trim().trim_end_matches('.').to_ascii_lowercase(), ip))
}

/// `--egress-allow-private`: `addr/len`, or a bare address for that one host.
fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address range (CIDR, like 10.8.0.0/16)"))
}

/// The egress network namespace of the server using `data` (one per data dir, so test
/// servers and production never share one): `forkbox-egress-` and the first 8 hex
/// digits of the SHA-256 of the path, stable across builds (scripts/host-scan.sh
/// computes it the same way).
fn egress_netns(data: &std::path::Path) -> String {
    use sha2::Digest as _;
    use std::os::unix::ffi::OsStrExt as _;
    let digest = sha2::Sha256::digest(data.as_os_str().as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("forkbox-egress-{hex}")
}

impl HostArgs {
    pub fn data_dir(&self) -> PathBuf {
        Self::default_data_dir(self.data_dir.as_deref())
    }

    /// This server's node name: `--node`, else the host name.
    pub fn node_name(&self) -> String {
        self.node
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| forkbox_core::store::LOCAL_NODE.to_owned())
            })
    }

    /// The database: `--database`, else the data dir's SQLite file.
    pub fn database(&self) -> String {
        Self::database_of(self.database.as_deref(), &self.data_dir())
    }

    /// `given`, else `<data>/forkbox.db`.
    pub fn database_of(given: Option<&str>, data: &std::path::Path) -> String {
        match given {
            Some(url) if !url.is_empty() => url.to_owned(),
            _ => data.join("forkbox.db").display().to_string(),
        }
    }

    /// Opens the database (`--database`), with its migrations applied, for this node.
    pub async fn open_store(&self) -> anyhow::Result<forkbox_core::store::Store> {
        let target = self.database();
        let store = forkbox_core::store::Store::open_target(&target)
            .await
            .with_context(|| format!("open database {}", forkbox_core::store::redacted(&target)))?;
        Ok(store.on_node(&self.node_name()))
    }

    /// `given`, else /var/lib/forkbox as root, else $XDG_DATA_HOME/forkbox.
    pub fn default_data_dir(given: Option<&std::path::Path>) -> PathBuf {
        if let Some(d) = given {
            return d.to_path_buf();
        }
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/var/lib/forkbox");
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("forkbox")
    }

    pub fn jail_config(&self) -> anyhow::Result<JailConfig> {
        let data = self.data_dir();
        std::fs::create_dir_all(&data)
            .with_context(|| format!("create data dir {}", data.display()))?;
        Ok(JailConfig {
            recipes: self.languages()?.recipes(),
            ..self.jail_config_in_place()
        })
    }

    /// [`HostArgs::jail_config`] without making the data dir or reading the
    /// languages file (no template recipes): enough to clean up.
    pub fn jail_config_in_place(&self) -> JailConfig {
        let data = self.data_dir();
        let agent_bin = match &self.agent_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map(|e| e.with_file_name("forkbox-agent"))
                .unwrap_or_else(|_| PathBuf::from("forkbox-agent")),
        };
        JailConfig {
            run_dir: data.join("run"),
            pool_dir: self.pool.clone().unwrap_or_else(|| data.join("pool")),
            pool_size_gb: self.pool_size_gb,
            agent_bin,
            uid_base: self.uid_base,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            favordynmods: !self.no_favordynmods,
            recipes: Default::default(),
            volumes_dir: data.join("volumes"),
            disk_limits: match self.disk_limits {
                DiskLimits::Simple => forkbox_jail::QuotaMode::Simple,
                DiskLimits::Full => forkbox_jail::QuotaMode::Full,
                DiskLimits::Off => forkbox_jail::QuotaMode::Off,
            },
            egress: forkbox_net::EgressConfig {
                netns: egress_netns(&data),
                resolve: self.egress_resolve.iter().cloned().collect(),
                allow_private: self.egress_allow_private.clone(),
                idle_timeout: Some(std::time::Duration::from_secs(
                    self.egress_idle_timeout.max(1),
                )),
                trusted_names: Vec::new(),
            },
            orphan_grace: self.orphan_grace(),
            data_dir: data.clone(),
            uid_registry: PathBuf::from(forkbox_jail::UID_REGISTRY),
        }
    }

    /// `--orphan-grace` (`None` when 0: off).
    pub fn orphan_grace(&self) -> Option<std::time::Duration> {
        (self.orphan_grace > 0).then(|| std::time::Duration::from_secs(self.orphan_grace))
    }

    /// The languages list in effect.
    pub fn languages(&self) -> anyhow::Result<forkbox_core::languages::Languages> {
        Ok(match &self.languages {
            Some(p) => forkbox_core::languages::Languages::load(p)?,
            None => forkbox_core::languages::Languages::builtin()?,
        })
    }

    pub fn jail_runtime(&self) -> anyhow::Result<JailRuntime> {
        Ok(JailRuntime::new(&self.jail_config()?)?)
    }

    /// These settings as command-line arguments, for a `forkbox serve` started as a
    /// child process (the benchmarks' density and load modes).
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let mut opt = |name: &str, v: &std::path::Path| {
            a.push(name.into());
            a.push(v.as_os_str().to_owned());
        };
        opt("--data-dir", &self.data_dir());
        if let Some(p) = &self.pool {
            opt("--pool", p);
        }
        if let Some(p) = &self.agent_bin {
            opt("--agent-bin", p);
        }
        if let Some(p) = &self.languages {
            opt("--languages", p);
        }
        a.push(format!("--pool-size-gb={}", self.pool_size_gb).into());
        a.push(format!("--uid-base={}", self.uid_base).into());
        if self.no_favordynmods {
            a.push("--no-favordynmods".into());
        }
        let limits = match self.disk_limits {
            DiskLimits::Simple => "simple",
            DiskLimits::Full => "full",
            DiskLimits::Off => "off",
        };
        a.push(format!("--disk-limits={limits}").into());
        a.push(format!("--orphan-grace={}", self.orphan_grace).into());
        for (name, ip) in &self.egress_resolve {
            a.push(format!("--egress-resolve={name}={ip}").into());
        }
        for net in &self.egress_allow_private {
            a.push(format!("--egress-allow-private={net}").into());
        }
        a.push(format!("--egress-idle-timeout={}", self.egress_idle_timeout).into());
        a
    }
}

/// Template build progress, one line each, on stderr.
pub fn print_progress(line: &str) {
    eprintln!("forkbox: {line}");
}

/// The OTLP exporter, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; flushed at exit.
static OTLP: std::sync::OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> =
    std::sync::OnceLock::new();

/// Logs (JSON lines with `json`) to stderr, filtered by `FORKBOX_LOG`; spans also go to
/// an OTLP/HTTP collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init_tracing(json: bool) {
    init_tracing_at(json, "info");
}

/// [`init_tracing`] with `default` as the filter when `FORKBOX_LOG` is unset.
pub fn init_tracing_at(json: bool, default: &str) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORKBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let otel = otlp_tracer().map(|t| tracing_opentelemetry::layer().with_tracer(t));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
}

fn otlp_tracer() -> Option<opentelemetry_sdk::trace::Tracer> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build();
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            eprintln!("forkbox: OTLP export disabled: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("forkbox")
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("forkbox");
    let _ = OTLP.set(provider);
    Some(tracer)
}

/// Sends the spans still buffered (call before exiting).
pub fn flush_tracing() {
    if let Some(p) = OTLP.get() {
        let _ = p.force_flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_parse_as_cidrs_or_single_hosts() {
        assert_eq!(
            parse_cidr("10.251.3.7/16").map(|n| n.to_string()),
            Ok("10.251.0.0/16".into())
        );
        assert_eq!(
            parse_cidr(" fd00::1 ").map(|n| n.to_string()),
            Ok("fd00::1/128".into())
        );
        assert_eq!(
            parse_cidr("100.64.0.0/10").map(|n| n.to_string()),
            Ok("100.64.0.0/10".into())
        );
        for bad in ["", "10.0.0.0/33", "mirror.internal", "10.0.0.0/8/8"] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
    }
}
