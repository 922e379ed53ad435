//! Linux building blocks for forkbox, one module per isolation concern.
//!
//! Nothing here knows about HTTP, sandboxes' lifecycles or the database: these are the
//! small, ordered steps the jail runtime (host side) and the agent (sandbox side) run.

pub mod btrfs;
pub mod caps;
pub mod cgroup;
pub mod idmap;
pub mod mounts;
pub mod net;
pub mod openat2;
pub mod overlay;
pub mod pidfd;
pub mod seccomp;
pub mod uidshift;
