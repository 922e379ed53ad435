//! `forkbox bench --load SECONDS`: a closed-loop load generator against a
//! `forkbox serve` child process. For the whole run, at the same time:
//! `--load-execute-clients` clients POST `/api/v1/execute` (`print(1)` in Python, the
//! runner's warm pool kept at `--load-pool`), and `--load-sandboxes` clients each run
//! `echo hi` exec calls on a warm sandbox of their own. Each client sends its next
//! request when the previous answer arrived, so the rates are the highest the machine
//! sustains at that concurrency. Every answer is checked (status and output); the
//! server's RSS is sampled every second for the leak check: growth from 20% of the run
//! (minute 2 of a 10-minute run) to its end.

use super::server::{self, mib, quantile, ChildServer};
use super::BenchArgs;
use anyhow::{bail, Context};
use futures_util::StreamExt;
use std::time::{Duration, Instant};

/// Leak budget: RSS growth from 20% of the run to its end.
const RSS_GROWTH_BUDGET: f64 = 0.05;

pub async fn run(args: &BenchArgs, secs: u64) -> anyhow::Result<()> {
    let srv = ChildServer::start(&args.host).await?;
    println!(
        "forkbox bench --load: server {} (pid {})",
        srv.base, srv.pid
    );
    let res = measure(args, secs, &srv).await;
    let stopped = srv.stop().await;
    let (report, errors) = res?;
    stopped?;
    println!("{report}");
    if let Some(path) = &args.markdown {
        server::write_section(path, "load", "Load", &report)?;
    }
    if errors > 0 {
        bail!("{errors} requests failed under load");
    }
    Ok(())
}

/// One client's record: latencies of good answers, and failures.
#[derive(Default)]
struct Tally {
    lat: Vec<f64>,
    errors: usize,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.lat.extend(o.lat);
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn fail(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// Sends `body` to `url` until `end`, checking each answer with `check`.
async fn client(
    http: reqwest::Client,
    url: String,
    body: serde_json::Value,
    end: Instant,
    check: fn(&str) -> bool,
) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < end {
        let start = Instant::now();
        let r = http.post(&url).json(&body).send().await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                t.fail(format!("{url}: {e}"));
                continue;
            }
        };
        let status = r.status();
        match r.text().await {
            Ok(text) if status.is_success() && check(&text) => {
                t.lat.push(super::ms(start.elapsed()));
            }
            Ok(text) => t.fail(format!("{url}: {status}: {text}")),
            Err(e) => t.fail(format!("{url}: {status}: {e}")),
        }
    }
    t
}

fn execute_ok(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|v| v["stdout"] == "1\n" && v["exit_code"] == 0)
        .unwrap_or(false)
}

fn exec_ok(text: &str) -> bool {
    text.contains("\"data\":\"hi\\n\"") && text.contains("\"type\":\"exit\",\"data\":0")
}

async fn measure(
    args: &BenchArgs,
    secs: u64,
    srv: &ChildServer,
) -> anyhow::Result<(String, usize)> {
    let k = args.load_sandboxes;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(k + args.load_execute_clients + 8)
        .timeout(Duration::from_secs(120))
        .build()?;
    let base = srv.base.clone();
    // The warm sandboxes, each answering once before the clock starts.
    let ttl = secs + 900;
    let ids: Vec<String> = futures_util::stream::iter(0..k)
        .map(|_| {
            let (http, base) = (&http, &base);
            async move {
                let v = server::post(
                    http,
                    &format!("{base}/v1/sandboxes"),
                    &serde_json::json!({ "timeout": ttl }),
                )
                .await?;
                let id = v["id"].as_str().context("no id")?.to_owned();
                server::post(
                    http,
                    &format!("{base}/v1/sandboxes/{id}/exec"),
                    &serde_json::json!({"cmd": "echo hi", "wait": true}),
                )
                .await?;
                Ok::<_, anyhow::Error>(id)
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    // The runner's warm pool, filled before the clock starts.
    if args.load_execute_clients > 0 {
        server::post(
            &http,
            &format!("{base}/api/v1/snapshots"),
            &serde_json::json!({"language": "python", "size": args.load_pool}),
        )
        .await?;
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            let v: serde_json::Value = http
                .get(format!("{base}/api/v1/snapshots"))
                .send()
                .await?
                .json()
                .await?;
            if v["snapshots"][0]["ready"].as_u64().unwrap_or(0) >= args.load_pool {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "load: {k} warm sandboxes, {} execute clients, {secs} s",
        args.load_execute_clients
    );

    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    // RSS every second.
    let pid = srv.pid;
    let sampler = tokio::spawn(async move {
        let mut samples: Vec<(f64, u64)> = Vec::new();
        let mut next_note = 60;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while Instant::now() < end {
            tick.tick().await;
            let rss = server::proc_status_kb(&format!("/proc/{pid}/status"), "VmRSS:").unwrap_or(0);
            samples.push((start.elapsed().as_secs_f64(), rss * 1024));
            let n = samples.len();
            if n >= next_note {
                next_note += 60;
                println!(
                    "load: {n} s, server RSS {:.1} MiB",
                    mib((rss * 1024) as f64)
                );
            }
        }
        samples
    });
    let exec_clients: Vec<_> = ids
        .iter()
        .map(|id| {
            tokio::spawn(client(
                http.clone(),
                format!("{base}/v1/sandboxes/{id}/exec"),
                serde_json::json!({"cmd": "echo hi"}),
                end,
                exec_ok,
            ))
        })
        .collect();
    let execute_clients: Vec<_> = (0..args.load_execute_clients)
        .map(|_| {
            tokio::spawn(client(
                http.clone(),
                format!("{base}/api/v1/execute"),
                serde_json::json!({"language": "python", "code": "print(1)"}),
                end,
                execute_ok,
            ))
        })
        .collect();
    let mut exec = Tally::default();
    for c in exec_clients {
        exec.merge(c.await?);
    }
    let mut execute = Tally::default();
    for c in execute_clients {
        execute.merge(c.await?);
    }
    let wall = start.elapsed().as_secs_f64();
    let rss = sampler.await?;

    // Clean up before reporting (the server's SIGTERM would do it too).
    futures_util::stream::iter(ids)
        .map(|id| {
            let (http, base) = (&http, &base);
            async move {
                let _ = http
                    .delete(format!("{base}/v1/sandboxes/{id}"))
                    .send()
                    .await;
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    let _ = server::post(
        &http,
        &format!("{base}/api/v1/snapshots"),
        &serde_json::json!({"language": "python", "size": 0}),
    )
    .await;

    let errors = exec.errors + execute.errors;
    Ok((report(args, secs, wall, &execute, &exec, &rss), errors))
}

/// RSS at `secs` into the run (the first sample at or after it).
fn rss_at(samples: &[(f64, u64)], secs: f64) -> u64 {
    samples
        .iter()
        .find(|(t, _)| *t >= secs)
        .or(samples.last())
        .map(|(_, r)| *r)
        .unwrap_or(0)
}

fn report(
    args: &BenchArgs,
    secs: u64,
    wall: f64,
    execute: &Tally,
    exec: &Tally,
    rss: &[(f64, u64)],
) -> String {
    let date = super::server::today();
    let mut md = format!(
        "Measured {date} by `forkbox bench --load {secs} --load-sandboxes {} \
         --load-execute-clients {} --load-pool {}` (`make load LOAD_SECONDS={secs}`) on {}: \
         both loads at once for {secs} s against a `forkbox serve` child process over HTTP \
         on loopback; closed loop (each client sends its next request when its previous \
         answer arrived).\n\n",
        args.load_sandboxes,
        args.load_execute_clients,
        args.load_pool,
        server::host_line(),
    );
    md.push_str(
        "| load | clients | requests | throughput | p50 ms | p99 ms | max ms | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (name, clients, t) in [
        (
            "`POST /api/v1/execute` python `print(1)` (warm pool)",
            args.load_execute_clients,
            execute,
        ),
        (
            "exec `echo hi` (NDJSON stream), one warm sandbox per client",
            args.load_sandboxes,
            exec,
        ),
    ] {
        let mut lat = t.lat.clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        md.push_str(&format!(
            "| {name} | {clients} | {} | {:.1} /s | {:.2} | {:.2} | {:.1} | {} |\n",
            lat.len() + t.errors,
            lat.len() as f64 / wall.max(1e-9),
            quantile(&lat, 0.5),
            quantile(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN),
            t.errors,
        ));
    }
    for (name, t) in [("execute", execute), ("exec", exec)] {
        if let Some(e) = &t.first_error {
            let e: String = e.chars().take(300).collect();
            md.push_str(&format!("\n{name}: first error: `{e}`\n"));
        }
    }
    let from = secs as f64 * 0.2;
    let (a, b) = (rss_at(rss, from), rss_at(rss, secs as f64));
    let max = rss.iter().map(|(_, r)| *r).max().unwrap_or(0);
    let growth = if a > 0 {
        (b as f64 - a as f64) / a as f64
    } else {
        f64::NAN
    };
    let verdict = if growth < RSS_GROWTH_BUDGET {
        "flat (within the 5% budget)"
    } else {
        "GROWING (over the 5% budget)"
    };
    md.push_str(&format!(
        "\nServer RSS (sampled every second, {} samples): {:.1} MiB at {:.0} s (20% of the run), \
         {:.1} MiB at the end, max {:.1} MiB: growth {:+.1}% — {verdict}.\n",
        rss.len(),
        mib(a as f64),
        from,
        mib(b as f64),
        mib(max as f64),
        growth * 100.0,
    ));
    md
}
