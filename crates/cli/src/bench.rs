//! `forkbox bench`: starts a real server in-process on a loopback port and measures,
//! over real HTTP, create→ready (cold) and an `echo hi` exec round trip on a warm
//! sandbox, next to the baseline `unshare` (same namespaces) + `chroot` + `echo`.

use crate::config::HostArgs;
use crate::serve::{self, ServeArgs};
use anyhow::{bail, Context};
use clap::Args;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_spliced_between_markers() {
        let doc = format!("# P\nintro\n{START}\nold\n{END}\nnotes\n");
        let out = splice_table(&doc, "new\n");
        assert_eq!(out, format!("# P\nintro\n{START}\nnew\n{END}\nnotes\n"));
        assert!(splice_table("", "t\n").contains(&format!("{START}\nt\n{END}")));
    }
}

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Samples per measurement.
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    /// Also write the table as markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// A Python with ipykernel and jupyter_client (`make bench` makes one) for the
    /// local Jupyter kernel reference row.
    #[arg(long)]
    pub jupyter_python: Option<PathBuf>,
}

/// A Python REPL state of about 200 MB (200 000 objects of 1000 bytes).
const BIG_STATE: &str = "blob = [bytes(1000) for _ in range(200_000)]\nlen(blob)";

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let r = http.post(url).json(&body).send().await?;
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// Creates a sandbox whose Python REPL holds [`BIG_STATE`].
async fn big_parent(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let v = post_json(
        http,
        &format!("{base}/v1/sandboxes"),
        serde_json::json!({"memory_mb": 2048}),
    )
    .await?;
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    let text = http
        .post(format!("{base}/v1/sandboxes/{id}/exec"))
        .json(&serde_json::json!({ "code": BIG_STATE }))
        .send()
        .await?
        .text()
        .await?;
    if !text.contains("200000") {
        bail!("building the REPL state failed: {text}");
    }
    Ok(id)
}

fn children(v: &serde_json::Value) -> Vec<String> {
    v["children"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Times `samples` forks into `k` children of `parent` (after one warm-up); the children
/// are deleted between samples, untimed.
async fn time_fork(
    http: &reqwest::Client,
    base: &str,
    parent: &str,
    k: usize,
    samples: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + 1 {
        let t = Instant::now();
        let v = post_json(
            http,
            &format!("{base}/v1/sandboxes/{parent}/fork"),
            serde_json::json!({ "n": k }),
        )
        .await?;
        let took = t.elapsed();
        if v["carried"] != serde_json::json!(["filesystem", "python"]) || children(&v).len() != k {
            bail!("fork did not carry the REPL: {v}");
        }
        if i >= 1 {
            out.push(ms(took));
        }
        for c in children(&v) {
            http.delete(format!("{base}/v1/sandboxes/{c}"))
                .send()
                .await?;
        }
    }
    Ok(out)
}

/// Times `samples` merges of a fresh fork child into its parent (a new parent every
/// ten, as each merge nests the lineage one level deeper).
async fn time_merge(
    http: &reqwest::Client,
    base: &str,
    samples: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(samples);
    let mut parent = String::new();
    for i in 0..samples + 1 {
        if i % 10 == 0 {
            if !parent.is_empty() {
                http.delete(format!("{base}/v1/sandboxes/{parent}"))
                    .send()
                    .await?;
            }
            parent = big_parent(http, base).await?;
        }
        let v = post_json(
            http,
            &format!("{base}/v1/sandboxes/{parent}/fork"),
            serde_json::json!({ "n": 1 }),
        )
        .await?;
        let child = children(&v).pop().unwrap_or_default();
        let t = Instant::now();
        post_json(
            http,
            &format!("{base}/v1/sandboxes/{child}/merge_into/{parent}"),
            serde_json::json!({}),
        )
        .await?;
        if i >= 1 {
            out.push(ms(t.elapsed()));
        }
    }
    http.delete(format!("{base}/v1/sandboxes/{parent}"))
        .send()
        .await?;
    Ok(out)
}

/// The Jupyter reference: `bench/jupyter_rtt.py` run by `python`.
async fn jupyter(python: &std::path::Path, n: usize) -> anyhow::Result<Vec<f64>> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/jupyter_rtt.py");
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .arg(n.to_string())
        .output()
        .await
        .with_context(|| format!("run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "jupyter reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

struct Row {
    name: &'static str,
    samples: Vec<f64>,
    budget: Option<f64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Row {
    fn stats(&self) -> (f64, f64) {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        (pct(&s, 0.5), pct(&s, 0.95))
    }
}

/// Times `n` exec calls with `body` (after 3 warm-up calls), checking each streamed
/// the stdout line `want` (JSON-escaped) and exited 0.
async fn time_exec(
    http: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
    want: &str,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 3 {
        let t = Instant::now();
        let text = http.post(url).json(&body).send().await?.text().await?;
        let took = t.elapsed();
        if !text.contains(&format!("\"data\":\"{want}\""))
            || !text.contains("\"type\":\"exit\",\"data\":0")
        {
            bail!("unexpected output for {body}: {text}");
        }
        if i >= 3 {
            out.push(ms(took));
        }
    }
    Ok(out)
}

const START: &str = "<!-- bench:start -->";
const END: &str = "<!-- bench:end -->";

/// Replaces the generated part of `doc` (between the markers) with `table`, keeping
/// the hand-written rest; a document without markers gets a fresh skeleton.
fn splice_table(doc: &str, table: &str) -> String {
    match (doc.find(START), doc.find(END)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{START}\n{table}{}", &doc[..a], &doc[b..])
        }
        _ => format!("# Performance\n\nRegenerate with `make bench`.\n\n{START}\n{table}{END}\n"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::config::init_tracing(false);
    let sa = ServeArgs {
        host: args.host.clone(),
        listen: "127.0.0.1:0".parse()?,
        default_template: "python".into(),
        log_json: false,
        on_exit: serve::OnExit::Destroy,
        auth: false,
        insecure_no_auth: false,
        admin_key: None,
        runtimes: vec!["jail".into()],
        default_runtime: "jail".into(),
        vm_assets: None,
        vm_accel: "auto".into(),
        // Cold creates first; the pool row turns it on.
        warm_pool: 0,
    };
    let server = serve::build(&sa).await?;
    let addr = server.listener.local_addr()?;
    let manager = server.manager.clone();
    let srv = tokio::spawn(serve::http(server.listener, manager.clone(), false).into_future());
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder().build()?;
    let n = args.iterations.max(1);

    // create → ready, cold (no pool): each sandbox deleted after it was measured.
    let mut create = Vec::with_capacity(n);
    for i in 0..n + 2 {
        let t = Instant::now();
        let r = http
            .post(format!("{base}/v1/sandboxes"))
            .json(&serde_json::json!({}))
            .send()
            .await?;
        let took = t.elapsed();
        if r.status() != 201 {
            bail!(
                "create answered {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        let id = r.json::<serde_json::Value>().await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if i >= 2 {
            create.push(ms(took));
        }
        http.delete(format!("{base}/v1/sandboxes/{id}"))
            .send()
            .await?;
    }

    // create from the warm pool: a hand-over; each sample waits until the pool is
    // full again (refills run in the background, never in the request).
    manager.keep_create_pool("python", 2);
    let mut create_pool = Vec::with_capacity(n);
    for _ in 0..n {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while manager
            .create_pools()
            .iter()
            .map(|p| p.ready)
            .sum::<usize>()
            < 2
        {
            if Instant::now() > deadline {
                bail!("the warm pool did not fill in 60 s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        let r = http
            .post(format!("{base}/v1/sandboxes"))
            .json(&serde_json::json!({}))
            .send()
            .await?;
        let took = t.elapsed();
        if r.status() != 201 {
            bail!("create answered {}", r.status());
        }
        create_pool.push(ms(took));
        let id = r.json::<serde_json::Value>().await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        http.delete(format!("{base}/v1/sandboxes/{id}"))
            .send()
            .await?;
    }
    manager.keep_create_pool("python", 0);

    // exec `echo hi` on one warm sandbox.
    let r = http
        .post(format!("{base}/v1/sandboxes"))
        .json(&serde_json::json!({}))
        .send()
        .await?;
    let id = r.json::<serde_json::Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let url = format!("{base}/v1/sandboxes/{id}/exec");
    let exec = time_exec(
        &http,
        &url,
        serde_json::json!({"cmd": "echo hi"}),
        "hi\\n",
        n,
    )
    .await?;
    // run_code `print(1)` on a warm Python REPL (same sandbox).
    let run_code = time_exec(
        &http,
        &url,
        serde_json::json!({"code": "print(1)"}),
        "1\\n",
        n,
    )
    .await?;
    // pause / resume of the same (idle) sandbox.
    let (mut pause, mut resume) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + 2 {
        for (op, out) in [("pause", &mut pause), ("resume", &mut resume)] {
            let t = Instant::now();
            let r = http
                .post(format!("{base}/v1/sandboxes/{id}/{op}"))
                .send()
                .await?;
            let took = t.elapsed();
            if r.status() != 200 {
                bail!("{op} answered {}", r.status());
            }
            if i >= 2 {
                out.push(ms(took));
            }
        }
    }
    http.delete(format!("{base}/v1/sandboxes/{id}"))
        .send()
        .await?;

    // Fork and merge of a parent whose REPL holds ~200 MB.
    let parent = big_parent(&http, &base).await?;
    let fork5 = time_fork(&http, &base, &parent, 5, n.min(20)).await?;
    let fork32 = time_fork(&http, &base, &parent, 32, n.min(10)).await?;
    http.delete(format!("{base}/v1/sandboxes/{parent}"))
        .send()
        .await?;
    let merge = time_merge(&http, &base, n.min(20)).await?;
    let jupyter = match &args.jupyter_python {
        Some(p) => jupyter(p, n).await?,
        None => Vec::new(),
    };

    // One-shot execute `print(1)` with a warm pool of python sandboxes, against
    // `python3 -c 'print(1)'` on the host.
    http.post(format!("{base}/api/v1/snapshots"))
        .json(&serde_json::json!({"language": "python", "size": 4}))
        .send()
        .await?;
    let mut execute = Vec::with_capacity(n);
    let mut python_c = Vec::with_capacity(n);
    for i in 0..n + 2 {
        // Let the pool refill between runs: this measures a hand-over, as with a pool
        // sized for the load.
        let filled = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < filled {
            let v: serde_json::Value = http
                .get(format!("{base}/api/v1/snapshots"))
                .send()
                .await?
                .json()
                .await?;
            if v["snapshots"][0]["ready"].as_u64().unwrap_or(0) >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        let v: serde_json::Value = http
            .post(format!("{base}/api/v1/execute"))
            .json(&serde_json::json!({"language": "python", "code": "print(1)"}))
            .send()
            .await?
            .json()
            .await?;
        let took = t.elapsed();
        if v["stdout"] != "1\n" {
            bail!("execute answered {v}");
        }
        let t = Instant::now();
        let out = tokio::process::Command::new("python3")
            .args(["-c", "print(1)"])
            .output()
            .await
            .context("run python3")?;
        let took_c = t.elapsed();
        if out.stdout != b"1\n" {
            bail!("python3 -c failed");
        }
        if i >= 2 {
            execute.push(ms(took));
            python_c.push(ms(took_c));
        }
    }

    // Baseline: unshare with the same namespaces + chroot into the template + echo.
    let cfg = args.host.jail_config()?;
    let root = cfg.pool_dir.join("templates").join("python");
    let mut baseline = Vec::with_capacity(n);
    for i in 0..n + 2 {
        let t = Instant::now();
        let out = tokio::process::Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--mount",
                "--pid",
                "--fork",
                "--net",
                "--ipc",
                "--uts",
                "--cgroup",
                "chroot",
            ])
            .arg(&root)
            .args(["/bin/echo", "hi"])
            .output()
            .await
            .context("run unshare")?;
        let took = t.elapsed();
        if out.stdout != b"hi\n" {
            bail!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        if i >= 2 {
            baseline.push(ms(took));
        }
    }
    manager.shutdown().await;
    srv.abort();

    let rows = [
        Row {
            name: "create → ready (cold, HTTP)",
            samples: create,
            budget: Some(15.0),
        },
        Row {
            name: "create → ready (warm pool hand-over, HTTP)",
            samples: create_pool,
            budget: Some(3.0),
        },
        Row {
            name: "exec `echo hi` round trip (warm sandbox, HTTP)",
            samples: exec,
            budget: Some(3.0),
        },
        Row {
            name: "run_code `print(1)` (warm Python REPL, HTTP)",
            samples: run_code,
            budget: Some(2.0),
        },
        Row {
            name: "pause (cgroup freezer, HTTP)",
            samples: pause,
            budget: Some(5.0),
        },
        Row {
            name: "resume (HTTP)",
            samples: resume,
            budget: Some(5.0),
        },
        Row {
            name: "fork n=5, parent REPL holding ~200 MB (HTTP)",
            samples: fork5,
            budget: Some(30.0),
        },
        Row {
            name: "fork n=32, parent REPL holding ~200 MB (HTTP)",
            samples: fork32,
            budget: Some(150.0),
        },
        Row {
            name: "merge_into (HTTP)",
            samples: merge,
            budget: Some(10.0),
        },
        Row {
            name: "execute `print(1)` one-shot, warm pool (POST /api/v1/execute)",
            samples: execute,
            budget: Some(30.0),
        },
        Row {
            name: "baseline: `python3 -c 'print(1)'` on the host",
            samples: python_c,
            budget: None,
        },
        Row {
            name: "reference: local Jupyter kernel `print(1)` execute round trip",
            samples: jupyter,
            budget: None,
        },
        Row {
            name: "baseline: unshare (same namespaces) + chroot + echo",
            samples: baseline,
            budget: None,
        },
    ];
    let mut md = String::new();
    md.push_str(
        "| operation | p50 ms | p95 ms | budget p50 | verdict |\n|---|---:|---:|---:|---|\n",
    );
    let mut all_ok = true;
    for r in &rows {
        if r.samples.is_empty() {
            md.push_str(&format!("| {} | — | — | — | not measured |\n", r.name));
            continue;
        }
        let (p50, p95) = r.stats();
        let (budget, verdict) = match r.budget {
            Some(b) if p50 <= b => (format!("≤ {b} ms"), "within budget"),
            Some(b) => {
                all_ok = false;
                (format!("≤ {b} ms"), "OVER BUDGET")
            }
            None => ("—".into(), "reference"),
        };
        md.push_str(&format!(
            "| {} | {p50:.2} | {p95:.2} | {budget} | {verdict} |\n",
            r.name
        ));
    }
    println!("forkbox bench: {n} samples each, jail runtime\n\n{md}");
    if let Some(path) = args.markdown {
        let host = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_default();
        let table = format!(
            "Figures from one run of `forkbox bench --iterations {n}` ({n} samples each) on {} cores \
             ({host}), jail runtime, over real HTTP on loopback.\n\n{md}",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        );
        let doc = splice_table(&std::fs::read_to_string(&path).unwrap_or_default(), &table);
        std::fs::write(&path, doc).with_context(|| format!("write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if !all_ok {
        eprintln!("forkbox bench: some figures are over budget");
    }
    Ok(())
}
