//! Sandbox egress. A sandbox created with an allowlist gets a veth: `eth0`
//! ([`SANDBOX_ADDR`]/30) inside its own network namespace, the other end in a network
//! namespace of forkbox's own (the *egress namespace*), where the only listening socket
//! is that sandbox's proxy at [`PROXY_ADDR`], bound to its veth. The sandbox has no
//! route anywhere else, so everything it reaches goes through the proxy, which admits
//! only listed host names (never addresses) and connects only to globally reachable
//! addresses or ranges the operator opted in ([`EgressConfig::allow_private`]), never
//! to the host's own addresses, loopback, link-local (cloud metadata) or the egress
//! links ([`proxy::forbidden`]). A sandbox's proxy holds at most
//! [`proxy::MAX_CONNS_PER_SANDBOX`] connections, all proxies together at most
//! [`proxy::global_cap`] of the server's open-files limit, and idle ones are closed
//! after [`proxy::IDLE_TIMEOUT`].
//!
//! Every sandbox sees the same proxy address: the listening sockets are told apart by
//! the device they are bound to (`SO_BINDTODEVICE`), so no per-sandbox address is
//! needed and the environment (`HTTP_PROXY`) never changes across restarts.
//!
//! Links are made with `ip` (iproute2) and `nsenter`; the sockets in the egress
//! namespace are made by a thread that joins it just for that.

pub mod proxy;

use forkbox_types::egress::{Allowlist, PROXY_ADDR, SANDBOX_ADDR};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("join the egress namespace {ns}: {source}")]
    Setns { ns: String, source: nix::Error },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// How egress is set up on this host.
#[derive(Debug, Clone, Default)]
pub struct EgressConfig {
    /// Name of the egress network namespace (under /run/netns).
    pub netns: String,
    /// Fixed answers for name lookups, like curl's `--resolve` (private mirrors, tests).
    pub resolve: HashMap<String, IpAddr>,
    /// Ranges that are not globally reachable (private, shared, unique-local, …) that
    /// sandboxes may reach anyway, e.g. a private mirror's. The host's own addresses,
    /// loopback, link-local and the egress links stay out of reach.
    pub allow_private: Vec<ipnet::IpNet>,
    /// Close tunnels idle this long (default [`proxy::IDLE_TIMEOUT`]; shorter in tests).
    pub idle_timeout: Option<std::time::Duration>,
    /// Host names the server itself chose (the template builder's Debian mirrors, the
    /// hosts built-in recipes fetch from) whose addresses, as the host resolves them,
    /// may be non-global for template builds' sandboxes, on ports 80 and 443: where the
    /// host gets its packages, a build may too. Other sandboxes get no such trust. The
    /// host's own addresses, loopback, link-local and the egress links stay out of reach.
    pub trusted_names: Vec<String>,
}

/// The egress namespace and the proxies in it.
pub struct Egress {
    cfg: EgressConfig,
    ns: OwnedFd,
    shared: Arc<proxy::Shared>,
}

/// One sandbox's link and proxy; dropping it stops the proxy (the link goes away with
/// the sandbox's network namespace).
pub struct Attachment {
    task: tokio::task::AbortHandle,
    pub ifname: String,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `ip` (optionally inside `netns`) with `batch` as its command list.
async fn ip_batch(prefix: &[&str], batch: &str) -> Result<(), NetError> {
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new(prefix[0]);
    cmd.args(&prefix[1..])
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let shown = format!(
        "{} ({})",
        prefix.join(" "),
        batch.trim().replace('\n', "; ")
    );
    let mut child = cmd.spawn().map_err(io(format!("run {shown}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(batch.as_bytes())
            .await
            .map_err(io(format!("write to {shown}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(io(format!("wait for {shown}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The host-side interface name of sandbox `key` (at most 15 bytes).
pub fn ifname(key: &str) -> String {
    let tail: String = key
        .rsplit('-')
        .next()
        .unwrap_or(key)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(13)
        .collect();
    format!("fb{tail}")
}

impl EgressConfig {
    /// What every proxy of this host shares (name answers, private ranges, idle
    /// timeout, connection caps from the open-files limit `nofile`).
    pub fn proxy_shared(&self, nofile: u64) -> proxy::Shared {
        proxy::Shared::new(
            self.resolve.clone(),
            self.allow_private.clone(),
            self.idle_timeout.unwrap_or(proxy::IDLE_TIMEOUT),
            proxy::MAX_CONNS_PER_SANDBOX,
            proxy::global_cap(nofile),
        )
        .with_trusted_names(self.trusted_names.clone())
    }
}

impl Egress {
    /// Makes the egress namespace if it is missing and opens it.
    pub async fn open(cfg: EgressConfig) -> Result<Arc<Egress>, NetError> {
        let path = PathBuf::from("/run/netns").join(&cfg.netns);
        if !path.exists() {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "add", &cfg.netns])
                .output()
                .await
                .map_err(io("run ip netns add"))?;
            if !out.status.success() && !path.exists() {
                return Err(NetError::Command {
                    cmd: format!("ip netns add {}", cfg.netns),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        // Nothing in it speaks IPv6 (no link-local addresses to reach).
        let _ = ip_batch(&["ip", "-n", &cfg.netns], "link set lo up\n").await;
        let _ = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &cfg.netns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])
            .output()
            .await;
        let ns = std::fs::File::open(&path)
            .map_err(io(format!("open {}", path.display())))?
            .into();
        // Read now: `forkbox serve` raised its limit before any sandbox was made.
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let shared = cfg.proxy_shared(nofile);
        Ok(Arc::new(Egress {
            shared: Arc::new(shared),
            cfg,
            ns,
        }))
    }

    /// Name of the egress namespace.
    pub fn netns(&self) -> &str {
        &self.cfg.netns
    }

    /// Links the sandbox whose PID 1 is `pid` (any earlier link of `key` is replaced)
    /// and starts its proxy with `allow`.
    /// Links sandbox `key` (whose network namespace `pid` is in) to a proxy of its own
    /// admitting `allow`; `trusted` for a template build's sandbox (see
    /// [`proxy::Policy::trusted`]).
    pub async fn attach(
        self: &Arc<Self>,
        key: &str,
        pid: i32,
        allow: Allowlist,
        trusted: bool,
    ) -> Result<Attachment, NetError> {
        let ifname = ifname(key);
        let ns = self.cfg.netns.as_str();
        let _ = ip_batch(&["ip", "-n", ns], &format!("link del {ifname}\n")).await;
        let proxy_ip = PROXY_ADDR.split(':').next().unwrap_or_default();
        ip_batch(
            &["ip", "-n", ns],
            &format!(
                "link add {ifname} type veth peer name eth0 netns {pid}\n\
                 addr add {proxy_ip}/30 dev {ifname}\n\
                 link set {ifname} up\n"
            ),
        )
        .await?;
        let netns_path = format!("--net=/proc/{pid}/ns/net");
        ip_batch(
            &["nsenter", &netns_path, "ip"],
            &format!("addr add {SANDBOX_ADDR}/30 dev eth0\nlink set eth0 up\n"),
        )
        .await?;
        let listener = self.listen_on(&ifname).await?;
        let task = tokio::spawn(proxy::serve(
            listener,
            Arc::new(proxy::Policy { allow, trusted }),
            self.shared.clone(),
            key.to_owned(),
        ))
        .abort_handle();
        tracing::debug!(sandbox = key, ifname, "egress link up");
        Ok(Attachment { task, ifname })
    }

    /// A listening socket at [`PROXY_ADDR`] in the egress namespace, bound to `ifname`.
    async fn listen_on(&self, ifname: &str) -> Result<tokio::net::TcpListener, NetError> {
        let ns = self
            .ns
            .try_clone()
            .map_err(io("duplicate the egress namespace fd"))?;
        let nsname = self.cfg.netns.clone();
        let dev = ifname.to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A thread of its own joins the egress namespace and ends right after: the
        // socket stays in the namespace it was made in, and no pooled thread is left
        // in the wrong namespace.
        let spawned = std::thread::Builder::new()
            .name("forkbox-egress-socket".into())
            .spawn(move || {
                let _ = tx.send(make_listener(ns, &nsname, &dev));
            });
        if let Err(e) = spawned {
            return Err(io("start the proxy socket thread")(e));
        }
        let std_listener = match rx.await {
            Ok(r) => r?,
            Err(e) => return Err(io("proxy socket thread")(std::io::Error::other(e))),
        };
        tokio::net::TcpListener::from_std(std_listener).map_err(io("register proxy socket"))
    }

    /// Deletes the egress namespace (when no sandbox uses it any more).
    pub async fn remove(&self) {
        remove_netns(&self.cfg.netns).await;
    }
}

/// Deletes the egress namespace `name` (with every host end of a sandbox link in it);
/// true when there was one.
pub async fn remove_netns(name: &str) -> bool {
    if !PathBuf::from("/run/netns").join(name).exists() {
        return false;
    }
    tokio::process::Command::new("ip")
        .args(["netns", "delete", name])
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

/// On the calling thread: joins `ns` and makes the listening socket bound to `dev`.
fn make_listener(ns: OwnedFd, nsname: &str, dev: &str) -> Result<std::net::TcpListener, NetError> {
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
        NetError::Setns {
            ns: nsname.to_owned(),
            source,
        }
    })?;
    let addr: SocketAddr = PROXY_ADDR
        .parse()
        .map_err(|_| io("proxy address")(std::io::Error::other(PROXY_ADDR)))?;
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking(),
        None,
    )
    .map_err(io("proxy socket"))?;
    s.set_reuse_address(true).map_err(io("SO_REUSEADDR"))?;
    s.bind_device(Some(dev.as_bytes()))
        .map_err(io(format!("bind the proxy to {dev}")))?;
    s.bind(&addr.into())
        .map_err(io(format!("bind the proxy to {PROXY_ADDR} on {dev}")))?;
    s.listen(128).map_err(io("listen"))?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_and_differ() {
        let a = ifname("sbx-abcdefghijklmnop");
        assert_eq!(a, "fbabcdefghijklm");
        assert!(a.len() <= 15);
        assert_ne!(a, ifname("sbx-zbcdefghijklmnop"));
    }
}
