//! Taking a data dir down with no server running: every sandbox it recorded ends and
//! every host resource its runtimes hold is freed (`forkbox down`, and the warden when
//! a server stays gone past its grace period).

use crate::manager::Manager;
use crate::model::Status;
use crate::CoreError;
use time::OffsetDateTime;

/// What [`Manager::down`] removed, one line per thing, for the operator.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DownReport {
    pub lines: Vec<String>,
}

impl DownReport {
    fn say(&mut self, line: String) {
        tracing::info!("{line}");
        self.lines.push(line);
    }
}

impl Manager {
    /// Ends every sandbox recorded as running or paused (marked `lost`: their state
    /// is gone) and frees what the runtimes hold for them and for anything else this
    /// data dir made. With `purge` also hibernated sandboxes and named snapshots go, so
    /// nothing of the data dir is left in a shared pool. Call only with no server on
    /// the data dir and nothing adopted; running it twice is harmless.
    pub async fn down(&self, purge: bool) -> Result<DownReport, CoreError> {
        let mut report = DownReport::default();
        let mut ending = self.store().sandboxes_with_status(Status::Running).await?;
        ending.extend(self.store().sandboxes_with_status(Status::Paused).await?);
        let hibernated = self
            .store()
            .sandboxes_with_status(Status::Hibernated)
            .await?;
        let now = OffsetDateTime::now_utc();
        for s in &ending {
            self.runtime_of_record(s).cleanup(&s.resource_id).await?;
            let reason = "lost: ended by `forkbox down` (no server)";
            self.store()
                .end_sandbox(&s.id, Status::Lost, reason, now)
                .await?;
            report.say(format!(
                "ended sandbox {} ({}, {})",
                s.id, s.runtime, s.status
            ));
        }
        if purge {
            for s in &hibernated {
                self.runtime_of_record(s).cleanup(&s.resource_id).await?;
                self.store()
                    .end_sandbox(&s.id, Status::Deleted, "purged by `forkbox down`", now)
                    .await?;
                report.say(format!(
                    "deleted hibernated sandbox {} ({})",
                    s.id, s.runtime
                ));
            }
            for snap in self.store().list_snapshots(None).await? {
                if let Err(e) = self.forget_snapshot(&snap).await {
                    report.say(format!("left snapshot {}: {e}", snap.id));
                    continue;
                }
                self.store().delete_snapshot(&snap.id).await?;
                report.say(format!("deleted snapshot {}", snap.id));
            }
        }
        let keep: std::collections::HashSet<String> = if purge {
            Default::default()
        } else {
            hibernated.into_iter().map(|s| s.resource_id).collect()
        };
        let candidates = self.store().ended_resource_ids().await?;
        for rt in self.all_runtimes() {
            let gc = rt.collect_garbage(&keep, candidates.clone()).await?;
            if gc.freed > 0 {
                report.say(format!(
                    "freed {} leftover sandboxes of the {} runtime",
                    gc.freed,
                    rt.name()
                ));
            }
            if gc.staging > 0 {
                report.say(format!(
                    "deleted {} staging snapshots of the {} runtime",
                    gc.staging,
                    rt.name()
                ));
            }
            for line in rt.release_host().await? {
                report.say(line);
            }
        }
        Ok(report)
    }
}
