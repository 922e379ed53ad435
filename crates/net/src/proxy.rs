//! The per-sandbox egress proxy: HTTP `CONNECT host:port` tunnels and plain HTTP
//! requests in absolute form (`GET http://host/path`), admitted only for host names on
//! the sandbox's allowlist (never IP addresses), only to globally reachable addresses
//! (or ranges the operator opted in) that are not the host's own, and only while the
//! sandbox holds fewer than [`MAX_CONNS_PER_SANDBOX`] connections.

use forkbox_types::egress::{is_ip_literal, Allowlist};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Largest request head read from a sandbox.
const MAX_HEAD: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections one sandbox's proxy holds at once (each is two of the server's
/// descriptors once connected upstream: the sandbox's and the upstream's). Past it, a
/// new connection is answered 503 and closed at once.
pub const MAX_CONNS_PER_SANDBOX: usize = 256;
/// A tunnel or forwarded request that moves no byte either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// At most one log line per sandbox about connections turned away, this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// What every sandbox's proxy shares: the server's egress options and the limit on
/// connections across all proxies.
pub struct Shared {
    /// Fixed answers for name lookups (`--egress-resolve`).
    pub resolve: HashMap<String, IpAddr>,
    /// Non-global ranges the operator lets sandboxes reach anyway
    /// (`--egress-allow-private`); never the addresses [`forbidden`] always refuses.
    pub allow_private: Vec<IpNet>,
    /// See [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`MAX_CONNS_PER_SANDBOX`].
    pub per_sandbox: usize,
    /// Connections all proxies together may hold ([`global_cap`]).
    all: Arc<Semaphore>,
    all_cap: usize,
    /// See [`crate::EgressConfig::trusted_names`].
    trusted_names: Vec<String>,
}

impl Shared {
    /// Names whose addresses may be non-global (see
    /// [`crate::EgressConfig::trusted_names`]).
    pub fn with_trusted_names(mut self, names: Vec<String>) -> Shared {
        self.trusted_names = names
            .into_iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        self
    }

    pub fn new(
        resolve: HashMap<String, IpAddr>,
        allow_private: Vec<IpNet>,
        idle_timeout: Duration,
        per_sandbox: usize,
        all_cap: usize,
    ) -> Shared {
        Shared {
            resolve,
            allow_private,
            idle_timeout,
            per_sandbox,
            all: Arc::new(Semaphore::new(all_cap)),
            trusted_names: Vec::new(),
            all_cap,
        }
    }
}

/// How many proxied connections all sandboxes together may hold, for a server whose
/// soft limit on open files is `nofile`: a quarter of it, so that the proxies (two
/// descriptors a connection) never take more than half of the server's descriptors and
/// the API, agents' connections, logs and the database keep the rest (16384 connections
/// under the 65536 that `forkbox serve` raises its limit to).
pub fn global_cap(nofile: u64) -> usize {
    usize::try_from(nofile.min(1 << 22) / 4)
        .unwrap_or(usize::MAX)
        .max(16)
}

/// Counts refusals and says when to log them (at most once per [`REFUSAL_LOG_EVERY`]).
#[derive(Default)]
struct Throttle {
    last: Option<tokio::time::Instant>,
    since: u64,
}

impl Throttle {
    /// Counts one; the number to report when it is time to log.
    fn hit(&mut self) -> Option<u64> {
        self.since += 1;
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// The answer to a connection past a limit.
fn busy() -> Vec<u8> {
    let body = "forkbox egress: too many connections\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What one sandbox's proxy admits.
pub struct Policy {
    /// The host names it may reach.
    pub allow: Allowlist,
    /// A template build's sandbox: the server's trusted names (its package mirrors)
    /// are reached wherever the host's resolver puts them, on ports 80 and 443. Every
    /// other sandbox is held to globally reachable addresses, trusted names included.
    pub trusted: bool,
}

/// Accepts and serves connections until aborted; aborting it also ends every
/// connection it serves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    policy: Arc<Policy>,
    shared: Arc<Shared>,
    sandbox: String,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<TcpStream>(1);
    let who = sandbox.clone();
    let accepting = async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    if tx.send(s).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(sandbox = who, error = %e, "egress proxy accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    tokio::join!(accepting, serve_incoming(rx, policy, shared, sandbox));
}

/// Serves the connections `incoming` yields (a sandbox's side of each, any byte
/// stream: a TCP connection, a tunnel through a vm guest's agent) until it ends or
/// this is aborted; aborting it also ends every connection it serves.
pub async fn serve_incoming<S>(
    mut incoming: tokio::sync::mpsc::Receiver<S>,
    policy: Arc<Policy>,
    shared: Arc<Shared>,
    sandbox: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mine = Arc::new(Semaphore::new(shared.per_sandbox));
    let mut conns = tokio::task::JoinSet::new();
    let mut turned_away = Throttle::default();
    let busy = busy();
    loop {
        let accepted = tokio::select! {
            a = incoming.recv() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Some(mut sock) = accepted else {
            // No more connections: those open run to their end.
            while conns.join_next().await.is_some() {}
            return;
        };
        // A slot of this sandbox's and one of all proxies', or no service at all: the
        // connection is answered (without waiting) and closed.
        let slots = match mine.clone().try_acquire_owned() {
            Ok(m) => shared
                .all
                .clone()
                .try_acquire_owned()
                .map(|a| (m, a))
                .map_err(|_| "all sandboxes' proxies"),
            Err(_) => Err("this sandbox's proxy"),
        };
        let slots = match slots {
            Ok(s) => s,
            Err(whose) => {
                let busy = busy.clone();
                conns.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_millis(100), sock.write_all(&busy))
                        .await;
                });
                if let Some(refused) = turned_away.hit() {
                    tracing::warn!(
                        sandbox,
                        refused,
                        per_sandbox = shared.per_sandbox,
                        all = shared.all_cap,
                        "egress proxy: connection limit of {whose} reached, new connections closed"
                    );
                }
                continue;
            }
        };
        let (policy, shared, sandbox) = (policy.clone(), shared.clone(), sandbox.clone());
        conns.spawn(async move {
            let _slots = slots;
            if let Err(why) = handle(sock, &policy, &shared, &sandbox).await {
                tracing::debug!(sandbox, why, "egress proxy connection ended");
            }
        });
    }
}

/// A refusal: status line, and why (also the body).
#[derive(Debug)]
struct Refusal(u16, &'static str, String);

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    policy: &Policy,
    shared: &Shared,
    sandbox: &str,
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(2048);
    let head_len = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut sock, &mut buf)).await {
        Ok(Ok(n)) => n,
        Ok(Err(r)) => return refuse(&mut sock, r).await,
        Err(_) => return Err("no request head in time".into()),
    };
    match route(&buf[..head_len], policy, shared).await {
        Err(r) => {
            tracing::info!(sandbox, reason = %r.2, "egress refused");
            refuse(&mut sock, r).await
        }
        Ok(Route::Tunnel(mut up)) => {
            sock.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            up.write_all(&buf[head_len..])
                .await
                .map_err(|e| e.to_string())?;
            pipe(sock, up, shared.idle_timeout).await
        }
        Ok(Route::Forward(mut up, head)) => {
            up.write_all(&head).await.map_err(|e| e.to_string())?;
            up.write_all(&buf[head_len..])
                .await
                .map_err(|e| e.to_string())?;
            pipe(sock, up, shared.idle_timeout).await
        }
    }
}

/// When a byte last moved either way, in milliseconds after `start`.
struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that records in `act` every byte read or written.
struct Watched<'a, S> {
    inner: S,
    act: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.act.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both ends are done, or until no byte moved either way for
/// `idle` (then both are closed).
async fn pipe<A, B>(a: A, b: B, idle: Duration) -> Result<(), String>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let act = Activity {
        start: tokio::time::Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let mut a = Watched {
        inner: a,
        act: &act,
    };
    let mut b = Watched {
        inner: b,
        act: &act,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            r = &mut copy => return r.map(|_| ()).map_err(|e| e.to_string()),
            _ = tokio::time::sleep_until(act.last() + idle) => {
                if act.last() + idle <= tokio::time::Instant::now() {
                    return Err(format!("idle for {} s: closed", idle.as_secs()));
                }
            }
        }
    }
}

async fn refuse<S: AsyncWrite + Unpin>(
    sock: &mut S,
    Refusal(code, reason, why): Refusal,
) -> Result<(), String> {
    let body = format!("forkbox egress: {why}\n");
    let msg = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(msg.as_bytes()).await;
    let _ = sock.shutdown().await;
    Err(why)
}

/// Reads until the end of the request head; its length in `buf`.
async fn read_head<S: AsyncRead + Unpin>(
    sock: &mut S,
    buf: &mut Vec<u8>,
) -> Result<usize, Refusal> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(i + 4);
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal(
                431,
                "Request Header Fields Too Large",
                "request head too large".into(),
            ));
        }
        let n = sock
            .read(&mut chunk)
            .await
            .map_err(|e| Refusal(400, "Bad Request", e.to_string()))?;
        if n == 0 {
            return Err(Refusal(
                400,
                "Bad Request",
                "connection closed early".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum Route {
    /// CONNECT: the upstream connection, to be joined after a 200.
    Tunnel(TcpStream),
    /// Plain HTTP: the upstream connection and the request head to send it.
    Forward(TcpStream, Vec<u8>),
}

/// What a request head asks for.
#[derive(Debug, PartialEq)]
enum Request {
    Connect {
        host: String,
        port: u16,
    },
    /// Plain HTTP, with the head to send upstream (origin form, `Connection: close`).
    Forward {
        host: String,
        port: u16,
        head: Vec<u8>,
    },
}

fn bad(why: impl Into<String>) -> Refusal {
    Refusal(400, "Bad Request", why.into())
}

fn forbid(why: impl Into<String>) -> Refusal {
    Refusal(403, "Forbidden", why.into())
}

async fn route(head: &[u8], policy: &Policy, shared: &Shared) -> Result<Route, Refusal> {
    match parse_request(head)? {
        Request::Connect { host, port } => {
            Ok(Route::Tunnel(connect(&host, port, policy, shared).await?))
        }
        Request::Forward { host, port, head } => Ok(Route::Forward(
            connect(&host, port, policy, shared).await?,
            head,
        )),
    }
}

fn parse_request(head: &[u8]) -> Result<Request, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad("malformed request head")),
    }
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_authority(target, None)?;
        return Ok(Request::Connect { host, port });
    }
    let uri: http::Uri = target
        .parse()
        .map_err(|_| bad(format!("bad request target {target:?}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad(
            "only absolute http:// requests and CONNECT are proxied (use CONNECT for https)",
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad("request target has no host"))?;
    let (host, port) = split_authority(authority.as_str(), Some(80))?;
    let given: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value)
        .collect();
    let has_host = check_host(&given, &host, port)?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    if !has_host {
        let shown = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let host_line = if port == 80 {
            format!("Host: {shown}\r\n")
        } else {
            format!("Host: {shown}:{port}\r\n")
        };
        out.extend_from_slice(host_line.as_bytes());
    }
    for h in req.headers.iter() {
        let n = h.name.to_ascii_lowercase();
        if matches!(
            n.as_str(),
            "proxy-connection" | "proxy-authorization" | "connection" | "keep-alive"
        ) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    // One request per connection: a second one could name another host.
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Request::Forward {
        host,
        port,
        head: out,
    })
}

/// The `Host` header of a plain HTTP request must name the request target's host (and
/// its port, when it gives one): otherwise an allowed name's server (a shared front end,
/// a CDN) would be asked for another site. A mismatch is refused (403), more than one
/// `Host` is malformed (400); whether there is one (none: the proxy adds it).
fn check_host(given: &[&[u8]], host: &str, port: u16) -> Result<bool, Refusal> {
    let value = match given {
        [] => return Ok(false),
        [v] => std::str::from_utf8(v).map_err(|_| bad("Host header is not text"))?,
        _ => return Err(bad("more than one Host header")),
    };
    let v = value.trim();
    let (h, p) = match v.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, tail)) => (h, Some(tail.strip_prefix(':').unwrap_or("x"))),
            None => (v, None),
        },
        None => match v.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (v, None),
        },
    };
    let same_host = !h.is_empty()
        && h.trim_end_matches('.')
            .eq_ignore_ascii_case(host.trim_end_matches('.'));
    let same_port = match p {
        None => true,
        Some(p) => p.parse::<u16>() == Ok(port),
    };
    if same_host && same_port {
        return Ok(true);
    }
    Err(forbid(format!(
        "Host header {value:?} does not name the request's target {host}:{port}"
    )))
}

/// `host:port` (or `[v6]:port`); `default` when the port is missing.
fn split_authority(a: &str, default: Option<u16>) -> Result<(String, u16), Refusal> {
    let a = a.rsplit('@').next().unwrap_or(a);
    let (host, port) = match a.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| bad(format!("bad port in {a:?}")))?,
        ),
        _ => (a, default.ok_or_else(|| bad(format!("{a:?} has no port")))?),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad(format!("bad authority {a:?}")));
    }
    Ok((host.to_ascii_lowercase(), port))
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(a: u16, b: u16, c: u16, d: u16, len: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0), len)
}

/// IPv4 ranges that are not globally reachable (IANA's special-purpose registry, RFC
/// 6890 and after): reached only when opted in with `--egress-allow-private`.
const V4_NOT_GLOBAL: &[Ipv4Net] = &[
    v4(0, 0, 0, 0, 8),       // "this network"
    v4(10, 0, 0, 0, 8),      // private
    v4(100, 64, 0, 0, 10),   // shared address space (CGNAT; cloud metadata at 100.100.100.200)
    v4(127, 0, 0, 0, 8),     // loopback
    v4(169, 254, 0, 0, 16),  // link-local (cloud metadata at 169.254.169.254)
    v4(172, 16, 0, 0, 12),   // private
    v4(192, 0, 0, 0, 24),    // IETF protocol assignments
    v4(192, 0, 2, 0, 24),    // TEST-NET-1
    v4(192, 88, 99, 0, 24),  // 6to4 relay anycast (deprecated)
    v4(192, 168, 0, 0, 16),  // private
    v4(198, 18, 0, 0, 15),   // benchmarking
    v4(198, 51, 100, 0, 24), // TEST-NET-2
    v4(203, 0, 113, 0, 24),  // TEST-NET-3
    v4(224, 0, 0, 0, 4),     // multicast
    v4(240, 0, 0, 0, 4),     // reserved, and the broadcast address
];

/// IPv6 global unicast: everything outside it is reserved, local or special.
const V6_GLOBAL_UNICAST: Ipv6Net = v6(0x2000, 0, 0, 0, 3);
/// Inside [`V6_GLOBAL_UNICAST`], what is not globally reachable.
const V6_NOT_GLOBAL: &[Ipv6Net] = &[
    v6(0x2001, 0, 0, 0, 23), // IETF protocol assignments (Teredo 2001::/32, benchmarking, ORCHID)
    v6(0x2001, 0x0db8, 0, 0, 32), // documentation
    v6(0x3fff, 0, 0, 0, 20), // documentation (RFC 9637)
];
/// NAT64's well-known prefix: as reachable as the IPv4 address in its last 32 bits.
const V6_NAT64: Ipv6Net = v6(0x64, 0xff9b, 0, 0, 96);
/// NAT64's local-use prefix (not global); the IPv4 address sits at bits 48–87.
const V6_NAT64_LOCAL: Ipv6Net = v6(0x64, 0xff9b, 1, 0, 48);
/// IPv4-compatible addresses (deprecated, not global).
const V6_COMPAT: Ipv6Net = v6(0, 0, 0, 0, 96);
const V6_6TO4: Ipv6Net = v6(0x2002, 0, 0, 0, 16);
const V6_TEREDO: Ipv6Net = v6(0x2001, 0, 0, 0, 32);

/// The egress links (10.200.0.0/30 in the egress namespace; the /16 is kept clear).
const EGRESS_LINKS: Ipv4Net = v4(10, 200, 0, 0, 16);

/// The IPv4 addresses an IPv6 address carries: IPv4-compatible (`::a.b.c.d`), NAT64
/// (`64:ff9b::/96`, and both layouts of `64:ff9b:1::/48`), 6to4 (`2002:AABB:CCDD::`) and
/// Teredo (server, and the client's obfuscated address). IPv4-mapped addresses are
/// IPv4 addresses already ([`IpAddr::to_canonical`]).
fn embedded_v4(a: Ipv6Addr) -> Vec<Ipv4Addr> {
    let o = a.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let mut out = Vec::new();
    if V6_COMPAT.contains(&a) || V6_NAT64.contains(&a) {
        out.push(last);
    }
    if V6_NAT64_LOCAL.contains(&a) {
        out.push(Ipv4Addr::new(o[6], o[7], o[9], o[10]));
        out.push(last);
    }
    if V6_6TO4.contains(&a) {
        out.push(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if V6_TEREDO.contains(&a) {
        out.push(Ipv4Addr::new(o[4], o[5], o[6], o[7]));
        out.push(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]));
    }
    out
}

/// Globally reachable (an address that embeds an IPv4 one is judged here by its own
/// range; its IPv4 address is judged on its own too).
fn global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !V4_NOT_GLOBAL.iter().any(|n| n.contains(&a)),
        IpAddr::V6(a) => {
            V6_NAT64.contains(&a)
                || (V6_GLOBAL_UNICAST.contains(&a) && !V6_NOT_GLOBAL.iter().any(|n| n.contains(&a)))
        }
    }
}

/// Never reachable, whatever the operator opted in: the host's own addresses (`local`),
/// loopback, "this network" and unspecified, link-local (cloud metadata), multicast,
/// broadcast and the egress links.
fn never(ip: IpAddr, local: &[IpAddr]) -> bool {
    if local.contains(&ip) || ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return true;
    }
    match ip {
        IpAddr::V4(a) => {
            a.octets()[0] == 0 || a.is_link_local() || a.is_broadcast() || EGRESS_LINKS.contains(&a)
        }
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Whether no sandbox may reach `ip` through the proxy. Refused: every address that is
/// not globally reachable (private, shared, unique-local, site- and link-local,
/// loopback, multicast, documentation, benchmarking, reserved, …) unless it lies in one
/// of `allow_private`, and whatever [`never`] names even then. An IPv6 address that
/// embeds an IPv4 one (mapped, compatible, NAT64, 6to4, Teredo) passes only if both do.
pub fn forbidden(ip: IpAddr, local: &[IpAddr], allow_private: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    let mut all = vec![ip];
    if let IpAddr::V6(a) = ip {
        all.extend(embedded_v4(a).into_iter().map(IpAddr::V4));
    }
    all.iter()
        .any(|a| never(*a, local) || !(global(*a) || allow_private.iter().any(|n| n.contains(a))))
}

/// Addresses of the host's interfaces (in the proxy's own namespace: the host's).
fn local_addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| i.address)
                .filter_map(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn connect(
    host: &str,
    port: u16,
    policy: &Policy,
    shared: &Shared,
) -> Result<TcpStream, Refusal> {
    let allow = &policy.allow;
    if is_ip_literal(host) {
        return Err(forbid(format!(
            "{host} is an IP address: sandboxes reach hosts by name only"
        )));
    }
    if !allow.allows(host) {
        return Err(forbid(format!(
            "{host} is not in this sandbox's egress allowlist"
        )));
    }
    let addrs: Vec<SocketAddr> = match shared.resolve.get(host.trim_end_matches('.')) {
        Some(ip) => vec![SocketAddr::new(*ip, port)],
        None => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Refusal(502, "Bad Gateway", format!("cannot resolve {host}: {e}")))?
            .collect(),
    };
    let local = local_addresses();
    let everything: [IpNet; 2] = [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())];
    let bare = host.trim_end_matches('.').to_ascii_lowercase();
    let trusted = policy.trusted && (port == 80 || port == 443);
    let opted: &[IpNet] = if trusted && shared.trusted_names.contains(&bare) {
        &everything
    } else {
        &shared.allow_private
    };
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| !forbidden(a.ip(), &local, opted))
        .collect();
    if allowed.is_empty() {
        return Err(forbid(format!(
            "{host} resolves only to addresses sandboxes may not reach"
        )));
    }
    let mut last = String::new();
    for a in allowed {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("connect to {host} ({a}): {e}"),
            Err(_) => last = format!("connect to {host} ({a}): timed out"),
        }
    }
    Err(Refusal(502, "Bad Gateway", last))
}

#[cfg(test)]
mod tests;
