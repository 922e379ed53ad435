//! A `forkbox serve` child process for the density and load modes, so that its
//! memory (RSS) is the server's alone, and helpers both modes share.

use crate::config::HostArgs;
use anyhow::{bail, Context};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

pub struct ChildServer {
    child: tokio::process::Child,
    pub base: String,
    pub pid: u32,
}

impl ChildServer {
    /// Starts this executable as `forkbox serve` on a free loopback port with `host`'s
    /// settings (`--on-exit destroy`), logging to `<data-dir>/bench-server.log`
    /// (`FORKBOX_LOG`, default `warn`), and waits until it listens.
    pub async fn start(host: &HostArgs) -> anyhow::Result<ChildServer> {
        let exe = std::env::current_exe().context("locate this executable")?;
        let data = host.data_dir();
        std::fs::create_dir_all(&data)?;
        let log_path = data.join("bench-server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("serve")
            .args(host.to_args())
            .args(["--listen", "127.0.0.1:0", "--on-exit", "destroy"])
            .env(
                "FORKBOX_LOG",
                std::env::var("FORKBOX_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("start forkbox serve")?;
        let pid = child.id().context("the server exited at once")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let wait = async {
            while let Some(l) = lines.next_line().await? {
                if let Some(url) = l.strip_prefix("forkbox listening on ") {
                    return Ok::<_, anyhow::Error>(Some(url.trim().to_owned()));
                }
            }
            Ok(None)
        };
        let base = match tokio::time::timeout(Duration::from_secs(900), wait).await {
            Ok(Ok(Some(url))) => url,
            _ => {
                let _ = child.kill().await;
                bail!(
                    "forkbox serve did not start; its log: {}",
                    log_path.display()
                );
            }
        };
        // Keep draining stdout so the server never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ChildServer { child, base, pid })
    }

    /// The server's resident set size in bytes (`VmRSS`).
    pub fn rss(&self) -> Option<u64> {
        proc_status_kb(&format!("/proc/{}/status", self.pid), "VmRSS:").map(|k| k * 1024)
    }

    /// Open file descriptors of the server.
    pub fn fds(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .ok()
            .map(|d| d.count())
    }

    /// SIGTERM (the server destroys its sandboxes, then exits) and wait.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid)?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        match tokio::time::timeout(Duration::from_secs(600), self.child.wait()).await {
            Ok(st) => {
                let st = st?;
                if !st.success() {
                    bail!("forkbox serve exited with {st}");
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("forkbox serve did not stop within 10 minutes of SIGTERM")
            }
        }
    }
}

/// A `kB` field of a /proc status or meminfo file.
pub fn proc_status_kb(path: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The fields of /proc/meminfo the density report uses, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemInfo {
    pub available: u64,
    pub slab: u64,
    pub page_tables: u64,
    pub kernel_stack: u64,
    pub shmem: u64,
}

impl MemInfo {
    pub fn read() -> MemInfo {
        let f = |k: &str| proc_status_kb("/proc/meminfo", k).unwrap_or(0) * 1024;
        MemInfo {
            available: f("MemAvailable:"),
            slab: f("Slab:"),
            page_tables: f("PageTables:"),
            kernel_stack: f("KernelStack:"),
            shmem: f("Shmem:"),
        }
    }
}

/// A sandbox's memory cgroup charge in bytes (v1 `memory.usage_in_bytes`, v2
/// `memory.current`), when its group exists.
pub fn cgroup_memory(id: &str) -> Option<u64> {
    let root = Path::new("/sys/fs/cgroup");
    [
        root.join("memory/forkbox")
            .join(id)
            .join("memory.usage_in_bytes"),
        root.join("forkbox").join(id).join("memory.current"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|s| s.trim().parse().ok())
}

pub fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// p-th quantile of sorted samples (nearest rank).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    super::pct(sorted, p)
}

/// Replaces the section between `<!-- name:start -->` and `<!-- name:end -->` of `doc`
/// with `body`, or appends it under `## heading` when the markers are missing.
pub fn splice_section(doc: &str, name: &str, heading: &str, body: &str) -> String {
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    match (doc.find(&start), doc.find(&end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{start}\n{body}{}", &doc[..a], &doc[b..])
        }
        _ => {
            let sep = if doc.is_empty() || doc.ends_with("\n\n") {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{doc}{sep}## {heading}\n\n{start}\n{body}{end}\n")
        }
    }
}

/// Writes `body` into the `name` section of the markdown file at `path`.
pub fn write_section(path: &Path, name: &str, heading: &str, body: &str) -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, splice_section(&doc, name, heading, body))
        .with_context(|| format!("write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// POSTs `body` and returns the answer's JSON, failing on a non-success status.
pub async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let r = http.post(url).json(body).send().await?;
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// Today's date (UTC, `YYYY-MM-DD`), for report headers.
pub fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine, for report headers.
pub fn host_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = proc_status_kb("/proc/meminfo", "MemTotal:").unwrap_or(0) as f64 / 1024.0 / 1024.0;
    format!("{cores} cores ({cpu}), {mem:.0} GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_spliced_or_appended() {
        let doc = "# P\n\n<!-- d:start -->\nold\n<!-- d:end -->\ntail\n";
        assert_eq!(
            splice_section(doc, "d", "D", "new\n"),
            "# P\n\n<!-- d:start -->\nnew\n<!-- d:end -->\ntail\n"
        );
        assert_eq!(
            splice_section("# P\ntext\n", "d", "D", "b\n"),
            "# P\ntext\n\n## D\n\n<!-- d:start -->\nb\n<!-- d:end -->\n"
        );
    }
}
