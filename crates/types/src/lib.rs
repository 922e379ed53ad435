//! Wire types shared by every forkbox crate: the agent protocol spoken between the
//! host and `forkbox-agent`, and the exec event model the HTTP API streams.
//!
//! This crate has no behaviour; it only names things, so that the server, the
//! runtimes and the in-sandbox agent agree on one definition.

pub mod agent;
pub mod api;
pub mod egress;
pub mod events;
pub mod exec;
pub mod lsp;
pub mod ndjson;
pub mod pty;
pub mod shell;
