//! Idle timeouts: when a sandbox was last used, and how many of its calls are still in
//! flight (a long exec is not idleness). The reaper ends a sandbox whose
//! `idle_timeout` has passed with nothing in flight, as its timeout would
//! (`on_timeout`: killed or hibernated).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One sandbox's use.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last call.
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    /// A call on the sandbox now.
    pub(crate) fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// A call in flight until the guard is dropped (touching at both ends).
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Busy(self.clone())
    }

    /// How long it has been idle: `None` while a call is in flight.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.epoch.elapsed().saturating_sub(last))
    }
}

/// See [`Activity::busy`].
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_in_flight_are_not_idleness_and_their_end_restarts_the_clock() {
        let a = Activity::new();
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.idle_for().unwrap() >= Duration::from_millis(30));
        let g = a.busy();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(a.idle_for(), None);
        drop(g);
        assert!(a.idle_for().unwrap() < Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(20));
        a.touch();
        assert!(a.idle_for().unwrap() < Duration::from_millis(20));
    }
}
