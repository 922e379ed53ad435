//! The dead-man's switch: a sandbox whose server has been gone longer than its grace
//! period ends itself.
//!
//! The server holds one agent connection per sandbox for as long as it manages the
//! sandbox (hollow fork ancestors included); the kernel closes it when the server
//! process dies, however it dies. So "no server" is "no connection": when the last one
//! closes, a timer starts; a new connection (a restarted server re-adopting) stops it;
//! when it runs out, the agent kills every process of the sandbox and ends it (a jail:
//! PID 1 exits and the kernel tears down its namespaces; a vm: the guest resets and
//! QEMU, started with `-no-reboot`, exits). What the sandbox holds on the host (cgroup,
//! root filesystem, run directory) is freed by the server's warden or the next server.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How many server connections are open, and since when that number is what it is.
#[derive(Clone)]
pub(crate) struct Presence {
    tx: Arc<watch::Sender<(usize, Instant)>>,
}

/// Counts one server connection while it lives.
pub(crate) struct Visit {
    presence: Presence,
}

impl Drop for Visit {
    fn drop(&mut self) {
        self.presence.tx.send_modify(|(n, since)| {
            *n = n.saturating_sub(1);
            *since = Instant::now();
        });
    }
}

impl Presence {
    pub(crate) fn new() -> Presence {
        let (tx, _) = watch::channel((0, Instant::now()));
        Presence { tx: Arc::new(tx) }
    }

    /// A server connection opened; it counts until the returned guard drops.
    pub(crate) fn visit(&self) -> Visit {
        self.tx.send_modify(|(n, since)| {
            *n += 1;
            *since = Instant::now();
        });
        Visit {
            presence: self.clone(),
        }
    }

    /// Resolves once no server connection has been open for `grace`.
    pub(crate) async fn abandoned(&self, grace: Duration) {
        let mut rx = self.tx.subscribe();
        loop {
            let (n, since) = *rx.borrow_and_update();
            if n > 0 {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                continue;
            }
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return std::future::pending().await;
                    }
                }
                _ = tokio::time::sleep_until(since + grace) => return,
            }
        }
    }
}

/// Ends the sandbox from inside: every other process is killed, then the caller's
/// `finish` runs (exit for a jail, a reset for a vm guest).
pub(crate) fn end_sandbox(grace: Duration, vm: bool) -> ! {
    eprintln!(
        "forkbox-agent: no server for {}s: ending the sandbox",
        grace.as_secs()
    );
    // SAFETY: kill(-1) from PID 1 signals every other process of its PID namespace.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    if vm {
        // SAFETY: sync and reboot take no pointers; RB_AUTOBOOT resets the guest, and
        // QEMU runs with -no-reboot, so it exits instead of starting it again.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_AUTOBOOT);
        }
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_only_after_grace_without_a_connection() {
        let p = Presence::new();
        let grace = Duration::from_secs(10);
        let v = p.visit();
        // Connected: never fires.
        assert!(
            tokio::time::timeout(Duration::from_secs(60), p.abandoned(grace))
                .await
                .is_err()
        );
        drop(v);
        tokio::time::advance(Duration::from_secs(5)).await;
        // A reconnect within the grace period stops the timer…
        let v2 = p.visit();
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.abandoned(grace).await })
        };
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!waiter.is_finished());
        // …and its end starts it afresh.
        drop(v2);
        tokio::time::advance(Duration::from_secs(9)).await;
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tokio::time::advance(Duration::from_secs(2)).await;
        waiter.await.unwrap();
    }
}
