//! Prometheus metrics of the sandbox manager (served as `GET /metrics` by the API).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Every metric the manager moves.
pub struct Metrics {
    pub created: Counter,
    pub handed_over: Counter,
    pub ended: Family<StatusLabel, Counter>,
    pub live: Gauge,
    pub execs: Family<KindLabel, Counter>,
    pub forks: Counter,
    pub fork_children: Counter,
    pub merges: Counter,
    pub oom_kills: Counter,
    pub adopted: Counter,
    pub lost: Counter,
    pub gc_freed: Counter,
    pub gc_kept: Counter,
    pub create_seconds: Histogram,
    pub fork_seconds: Histogram,
    /// From an exec request until its command (or cell) runs in the sandbox.
    pub exec_start_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            created: Counter::default(),
            handed_over: Counter::default(),
            ended: Family::default(),
            live: Gauge::default(),
            execs: Family::default(),
            forks: Counter::default(),
            fork_children: Counter::default(),
            merges: Counter::default(),
            oom_kills: Counter::default(),
            adopted: Counter::default(),
            lost: Counter::default(),
            gc_freed: Counter::default(),
            gc_kept: Counter::default(),
            // 1 ms … ~16 s.
            create_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            fork_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 0.1 ms … ~1.6 s.
            exec_start_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
        }
    }
}

impl Metrics {
    /// Registers every metric (clones share their values) under `forkbox_`.
    pub fn register(&self, reg: &mut Registry) {
        let r = reg.sub_registry_with_prefix("forkbox");
        r.register(
            "sandboxes_created",
            "Sandboxes created (forks and warm-pool hand-overs included; pool sandboxes count when handed over)",
            self.created.clone(),
        );
        r.register(
            "sandboxes_handed_over",
            "Creates served from the warm pool",
            self.handed_over.clone(),
        );
        r.register(
            "sandboxes_ended",
            "Sandboxes ended, by final status",
            self.ended.clone(),
        );
        r.register(
            "sandboxes_live",
            "Sandboxes running or paused",
            self.live.clone(),
        );
        r.register(
            "execs",
            "Commands and cells run, by kind",
            self.execs.clone(),
        );
        r.register("forks", "Fork calls", self.forks.clone());
        r.register(
            "fork_children",
            "Children made by forks",
            self.fork_children.clone(),
        );
        r.register("merges", "Merges", self.merges.clone());
        r.register(
            "oom_kills",
            "Processes killed by a sandbox's memory limit",
            self.oom_kills.clone(),
        );
        r.register(
            "adopted",
            "Sandboxes adopted from an earlier server",
            self.adopted.clone(),
        );
        r.register(
            "lost",
            "Sandboxes found dead after a restart",
            self.lost.clone(),
        );
        r.register(
            "gc_freed",
            "Leftovers freed by garbage collection",
            self.gc_freed.clone(),
        );
        r.register(
            "gc_kept",
            "Hollow fork parents taken back by garbage collection",
            self.gc_kept.clone(),
        );
        r.register(
            "create_seconds",
            "Time to create a sandbox",
            self.create_seconds.clone(),
        );
        r.register(
            "fork_seconds",
            "Time of a fork call",
            self.fork_seconds.clone(),
        );
        r.register(
            "exec_start_seconds",
            "Time from an exec call until its command or cell runs in the sandbox",
            self.exec_start_seconds.clone(),
        );
    }
}
