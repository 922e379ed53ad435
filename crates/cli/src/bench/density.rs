//! `forkbox bench --density N`: creates N idle sandboxes (no REPL started) through a
//! `forkbox serve` child process over HTTP, `--concurrency` requests at a time, and
//! reports create throughput and memory per sandbox; then the same for
//! `--density-repl` sandboxes each with a warm Python REPL.
//!
//! Memory per sandbox is the drop of the host's `MemAvailable` (/proc/meminfo) from
//! before the creates to after them, divided by the count: everything a sandbox costs
//! the host (its processes, page tables, kernel objects such as namespaces, mounts,
//! cgroups and sockets, and the server's own growth), page cache the kernel could
//! reclaim excepted. The sum of the sandboxes' memory cgroup charges is shown beside
//! it (what the limits see; it includes the sandbox's page cache and kernel memory
//! charged to the group, not the server's share).

use super::server::{self, cgroup_memory, mib, quantile, ChildServer, MemInfo};
use super::BenchArgs;
use anyhow::Context;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Issue 24's budgets: host memory per idle sandbox; per warm Python REPL, host memory
/// and its cgroup's charge.
const IDLE_BUDGET_MIB: f64 = 0.5;
const REPL_BUDGET_MIB: f64 = 4.0;
const REPL_CHARGE_BUDGET_MIB: f64 = 8.0;

pub async fn run(args: &BenchArgs, n: usize) -> anyhow::Result<()> {
    let srv = ChildServer::start(&args.host).await?;
    println!(
        "forkbox bench --density: server {} (pid {})",
        srv.base, srv.pid
    );
    let res = measure(args, n, &srv).await;
    let stopped = srv.stop().await;
    let report = res?;
    stopped?;
    println!("{report}");
    if let Some(path) = &args.markdown {
        server::write_section(path, "density", "Density", &report)?;
    }
    Ok(())
}

/// What one phase measured.
struct Phase {
    name: &'static str,
    wanted: usize,
    created: usize,
    create_secs: f64,
    create_lat: Vec<f64>,
    first_error: Option<String>,
    before: MemInfo,
    after: MemInfo,
    cgroup_sum: u64,
    cgroups_found: usize,
    rss_before: u64,
    rss_after: u64,
    fds_after: usize,
    answered: usize,
    delete_secs: f64,
    budget_mib: Option<f64>,
    /// Budget of the cgroup charge per sandbox, if any.
    charge_budget_mib: Option<f64>,
}

impl Phase {
    fn per(&self, v: f64) -> f64 {
        mib(v) / self.created.max(1) as f64
    }

    fn host_per(&self) -> f64 {
        self.per(self.before.available as f64 - self.after.available as f64)
    }
}

async fn measure(args: &BenchArgs, n: usize, srv: &ChildServer) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(1) * 2)
        .timeout(Duration::from_secs(300))
        .build()?;
    let conc = args.concurrency.max(1);
    // Warm-up: the template's files in the page cache, the server's pools grown.
    let warm = create_many(&http, &srv.base, 4, conc, false).await;
    delete_many(&http, &srv.base, warm.ids, conc).await;
    let idle = phase(&http, srv, "idle (REPL not started)", n, conc, false).await?;
    let mut phases = vec![idle];
    if args.density_repl > 0 {
        phases.push(
            phase(
                &http,
                srv,
                "warm Python REPL",
                args.density_repl,
                conc,
                true,
            )
            .await?,
        );
    }
    Ok(report(&phases, conc))
}

struct Created {
    ids: Vec<String>,
    lat: Vec<f64>,
    secs: f64,
    first_error: Option<String>,
}

/// Creates `n` sandboxes, `conc` at a time (with `repl`, then runs `print(1)` in each
/// one's Python REPL, untimed). Stops early after 10 errors.
async fn create_many(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    conc: usize,
    repl: bool,
) -> Created {
    let errors = AtomicUsize::new(0);
    let errors = &errors;
    let t = Instant::now();
    let results: Vec<anyhow::Result<(String, f64)>> = futures_util::stream::iter(0..n)
        .map(|_| async move {
            if errors.load(Ordering::Relaxed) >= 10 {
                anyhow::bail!("skipped after 10 errors");
            }
            let t = Instant::now();
            let r = server::post(
                http,
                &format!("{base}/v1/sandboxes"),
                &serde_json::json!({"timeout": 7200}),
            )
            .await;
            let took = super::ms(t.elapsed());
            let v = r.inspect_err(|_| {
                errors.fetch_add(1, Ordering::Relaxed);
            })?;
            let id = v["id"].as_str().context("no id")?.to_owned();
            Ok((id, took))
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    let secs = t.elapsed().as_secs_f64();
    let mut out = Created {
        ids: Vec::new(),
        lat: Vec::new(),
        secs,
        first_error: None,
    };
    for r in results {
        match r {
            Ok((id, l)) => {
                out.ids.push(id);
                out.lat.push(l);
            }
            Err(e) => {
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    if repl {
        let answered = exec_all(http, base, &out.ids, conc, true).await;
        if answered < out.ids.len() && out.first_error.is_none() {
            out.first_error = Some(format!(
                "only {answered} of {} REPLs answered print(1)",
                out.ids.len()
            ));
        }
    }
    out
}

/// Runs `echo ok` (or, with `repl`, the Python cell `print(1)`) in every sandbox;
/// how many answered correctly.
async fn exec_all(
    http: &reqwest::Client,
    base: &str,
    ids: &[String],
    conc: usize,
    repl: bool,
) -> usize {
    let body = if repl {
        serde_json::json!({"code": "print(1)", "wait": true})
    } else {
        serde_json::json!({"cmd": "echo ok", "wait": true})
    };
    let want = if repl { "1\n" } else { "ok\n" };
    let body = &body;
    futures_util::stream::iter(ids.iter())
        .map(|id| async move {
            server::post(http, &format!("{base}/v1/sandboxes/{id}/exec"), body)
                .await
                .map(|v| v["stdout"] == want && v["exit_code"] == 0)
                .unwrap_or(false)
        })
        .buffer_unordered(conc)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}

async fn delete_many(http: &reqwest::Client, base: &str, ids: Vec<String>, conc: usize) -> f64 {
    let t = Instant::now();
    futures_util::stream::iter(ids)
        .map(|id| async move {
            let _ = http
                .delete(format!("{base}/v1/sandboxes/{id}"))
                .send()
                .await;
        })
        .buffer_unordered(conc)
        .collect::<Vec<()>>()
        .await;
    t.elapsed().as_secs_f64()
}

async fn phase(
    http: &reqwest::Client,
    srv: &ChildServer,
    name: &'static str,
    n: usize,
    conc: usize,
    repl: bool,
) -> anyhow::Result<Phase> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = MemInfo::read();
    let rss_before = srv.rss().unwrap_or(0);
    println!("density: {name}: creating {n}, {conc} at a time");
    let c = create_many(http, &srv.base, n, conc, repl).await;
    println!(
        "density: {name}: {} created in {:.1} s{}",
        c.ids.len(),
        c.secs,
        c.first_error
            .as_deref()
            .map(|e| format!(" (first error: {e})"))
            .unwrap_or_default()
    );
    // Let lazily allocated memory show and freed memory go back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = MemInfo::read();
    let rss_after = srv.rss().unwrap_or(0);
    let fds_after = srv.fds().unwrap_or(0);
    let charges: Vec<u64> = c.ids.iter().filter_map(|id| cgroup_memory(id)).collect();
    // Every sandbox still answers (after the measurement: this starts processes).
    let answered = exec_all(http, &srv.base, &c.ids, conc, repl).await;
    println!("density: {name}: {answered} of {} answered", c.ids.len());
    let delete_secs = delete_many(http, &srv.base, c.ids.clone(), conc).await;
    let mut lat = c.lat;
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(Phase {
        name,
        wanted: n,
        created: lat.len(),
        create_secs: c.secs,
        create_lat: lat,
        first_error: c.first_error,
        before,
        after,
        cgroup_sum: charges.iter().sum(),
        cgroups_found: charges.len(),
        rss_before,
        rss_after,
        fds_after,
        answered,
        delete_secs,
        budget_mib: Some(if repl {
            REPL_BUDGET_MIB
        } else {
            IDLE_BUDGET_MIB
        }),
        charge_budget_mib: repl.then_some(REPL_CHARGE_BUDGET_MIB),
    })
}

fn report(phases: &[Phase], conc: usize) -> String {
    let date = super::server::today();
    let mut md = format!(
        "Measured {date} by `forkbox bench --density {} --density-repl {} --concurrency {conc}` \
         (`make density`) on {}, through a `forkbox serve` child process over HTTP on \
         loopback, default sandboxes (1 CPU, 512 MiB limit).\n\n",
        phases.first().map(|p| p.wanted).unwrap_or(0),
        phases.get(1).map(|p| p.wanted).unwrap_or(0),
        server::host_line(),
    );
    md.push_str(
        "| phase | created | create throughput | create p50 / p99 (under load) | host memory per sandbox (MemAvailable Δ ÷ n) | cgroup charge per sandbox | budget | verdict |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for p in phases {
        let host = p.host_per();
        let charge = p.per(p.cgroup_sum as f64);
        let (budget, verdict) = match (p.budget_mib, p.charge_budget_mib) {
            (None, _) => ("—".into(), "no budget"),
            (Some(b), c) => {
                let text = match c {
                    Some(c) => format!("≤ {b} MiB host, ≤ {c} MiB charge"),
                    None => format!("≤ {b} MiB"),
                };
                let within = host <= b && c.is_none_or(|c| charge <= c) && p.created >= p.wanted;
                (
                    text,
                    if within {
                        "within budget"
                    } else {
                        "OVER BUDGET"
                    },
                )
            }
        };
        md.push_str(&format!(
            "| {} | {} of {} | {:.1} /s | {:.1} / {:.1} ms | {host:.2} MiB | {:.2} MiB | {budget} | {verdict} |\n",
            p.name,
            p.created,
            p.wanted,
            p.created as f64 / p.create_secs.max(1e-9),
            quantile(&p.create_lat, 0.5),
            quantile(&p.create_lat, 0.99),
            charge,
        ));
    }
    md.push_str("\nWhere the host memory went, per sandbox (Δ ÷ n):\n\n");
    md.push_str(
        "| phase | slab (kernel objects) | page tables | kernel stacks | shmem (tmpfs, memfd) | server RSS | server fds after | answered afterwards | delete throughput |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in phases {
        let d = |a: u64, b: u64| p.per(b as f64 - a as f64);
        md.push_str(&format!(
            "| {} | {:.2} MiB | {:.2} MiB | {:.3} MiB | {:.2} MiB | {:.3} MiB | {} | {} of {} | {:.1} /s |\n",
            p.name,
            d(p.before.slab, p.after.slab),
            d(p.before.page_tables, p.after.page_tables),
            d(p.before.kernel_stack, p.after.kernel_stack),
            d(p.before.shmem, p.after.shmem),
            d(p.rss_before, p.rss_after),
            p.fds_after,
            p.answered,
            p.created,
            p.created as f64 / p.delete_secs.max(1e-9),
        ));
    }
    for p in phases {
        if let Some(e) = &p.first_error {
            md.push_str(&format!("\n{}: first error: `{e}`\n", p.name));
        }
        if p.cgroups_found < p.created {
            md.push_str(&format!(
                "\n{}: memory cgroups found for {} of {} sandboxes\n",
                p.name, p.cgroups_found, p.created
            ));
        }
    }
    md
}
