//! The part of `forkbox-agent` that other crates may link: the in-sandbox file path
//! resolver, so that the fuzz targets (`fuzz/`) exercise the agent's own code. The
//! agent itself is the `forkbox-agent` binary (`main.rs`).

pub mod files;
