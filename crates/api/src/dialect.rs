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

/// Reads `events` to their end.
pub async fn collect(mut events: BoxStream<'static, ExecEvent>) -> Collected {
    let mut c = Collected {
        stdout: String::new(),
        stderr: String::new(),
        code: None,
        timed_out: false,
    };
    while let Some(ev) = events.next().await {
        match ev.kind {
            EventKind::Stdout(d) => c.stdout.push_str(&d),
            EventKind::Stderr(d) if timeout_note(&d) => c.timed_out = true,
            EventKind::Stderr(d) => c.stderr.push_str(&d),
            EventKind::Exit(code) => c.code = Some(code),
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
