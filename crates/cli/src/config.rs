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
    /// btrfs pool for templates and root filesystems. Default: <data-dir>/pool.
    #[arg(long, env = "FORKBOX_POOL")]
    pub pool: Option<PathBuf>,
    /// Size of the sparse pool image made when the pool is not on btrfs.
    #[arg(long, default_value_t = 64)]
    pub pool_size_gb: u64,
    /// The static forkbox-agent binary. Default: beside this executable.
    #[arg(long, env = "FORKBOX_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
    /// Host uid/gid that root inside sandboxes maps to (65536 ids from there).
    #[arg(long, default_value_t = 1_000_000)]
    pub uid_base: u32,
    /// Leave the host's cgroup2 mount options alone (by default forkbox turns on
    /// `favordynmods`, which makes moving a sandbox into its cgroup ~10 ms faster).
    #[arg(long)]
    pub no_favordynmods: bool,
}

impl HostArgs {
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
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
        let agent_bin = match &self.agent_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context("locate this executable")?
                .with_file_name("forkbox-agent"),
        };
        Ok(JailConfig {
            run_dir: data.join("run"),
            pool_dir: self.pool.clone().unwrap_or_else(|| data.join("pool")),
            pool_size_gb: self.pool_size_gb,
            agent_bin,
            uid_base: self.uid_base,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            favordynmods: !self.no_favordynmods,
        })
    }

    pub fn jail_runtime(&self) -> anyhow::Result<JailRuntime> {
        Ok(JailRuntime::new(&self.jail_config()?)?)
    }
}

/// Template build progress, one line each, on stderr.
pub fn print_progress(line: &str) {
    eprintln!("forkbox: {line}");
}

pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORKBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
