//! What the client dialects (`podflare.rs`, `pandastack.rs`, `declaw.rs`) share.

use crate::error::ApiError;
use forkbox_types::exec::{EventKind, ExecEvent};
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;

/// A route of a dialect's client that forkbox does not offer: 501 saying why.
pub async fn not_offered(why: &'static str) -> ApiError {
    ApiError::NotOffered(why.into())
}

/// forkbox's note on stderr when an exec's timeout killed it.
pub fn timeout_note(line: &str) -> bool {
    line.starts_with(forkbox_core::TIMEOUT_NOTE)
}

/// A command's or cell's whole output.
pub struct Collected {
    pub stdout: String,
    pub stderr: String,
    /// The exit event's code (`EXIT_UNKNOWN`: the agent went away); `None` if none came.
    pub code: Option<i32>,
    /// Its timeout killed (or interrupted) it; the note is not in `stderr`.
    pub timed_out: bool,
}

/// Reads `events` to their end, keeping at most 1 MiB of each stream (a note on
/// stderr says what was cut).
pub async fn collect(mut events: BoxStream<'static, ExecEvent>) -> Collected {
    use forkbox_core::runner::{push_capped, MAX_OUTPUT};
    let mut c = Collected {
        stdout: String::new(),
        stderr: String::new(),
        code: None,
        timed_out: false,
    };
    let (mut cut_out, mut cut_err) = (false, false);
    while let Some(ev) = events.next().await {
        match ev.kind {
            EventKind::Stdout(d) => push_capped(&mut c.stdout, &d, &mut cut_out),
            EventKind::Stderr(d) if timeout_note(&d) => c.timed_out = true,
            EventKind::Stderr(d) => push_capped(&mut c.stderr, &d, &mut cut_err),
            EventKind::Exit(code) => c.code = Some(code),
        }
    }
    for (cut, name) in [(cut_out, "stdout"), (cut_err, "stderr")] {
        if cut {
            c.stderr
                .push_str(&format!("forkbox: {name} was cut at {MAX_OUTPUT} bytes\n"));
        }
    }
    c
}

/// A name for a snapshot the client did not name: the time.
pub fn snapshot_name() -> String {
    format!(
        "snapshot-{}",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    )
}
