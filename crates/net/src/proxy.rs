//! The per-sandbox egress proxy: HTTP `CONNECT host:port` tunnels and plain HTTP
//! requests in absolute form (`GET http://host/path`), admitted only for host names on
//! the sandbox's allowlist and only to addresses that are not the host's own.

use forkbox_types::egress::Allowlist;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest request head read from a sandbox.
const MAX_HEAD: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts and serves connections until aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    allow: Arc<Allowlist>,
    resolve: Arc<HashMap<String, IpAddr>>,
    sandbox: String,
) {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(sandbox, error = %e, "egress proxy accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (allow, resolve, sandbox) = (allow.clone(), resolve.clone(), sandbox.clone());
        tokio::spawn(async move {
            if let Err(why) = handle(sock, &allow, &resolve, &sandbox).await {
                tracing::debug!(sandbox, why, "egress proxy connection ended");
            }
        });
    }
}

/// A refusal: status line, and why (also the body).
struct Refusal(u16, &'static str, String);

async fn handle(
    mut sock: TcpStream,
    allow: &Allowlist,
    resolve: &HashMap<String, IpAddr>,
    sandbox: &str,
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(2048);
    let head_len = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut sock, &mut buf)).await {
        Ok(Ok(n)) => n,
        Ok(Err(r)) => return refuse(&mut sock, r).await,
        Err(_) => return Err("no request head in time".into()),
    };
    match route(&buf[..head_len], allow, resolve).await {
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
            pipe(sock, up).await
        }
        Ok(Route::Forward(mut up, head)) => {
            up.write_all(&head).await.map_err(|e| e.to_string())?;
            up.write_all(&buf[head_len..])
                .await
                .map_err(|e| e.to_string())?;
            pipe(sock, up).await
        }
    }
}

async fn pipe(mut a: TcpStream, mut b: TcpStream) -> Result<(), String> {
    tokio::io::copy_bidirectional(&mut a, &mut b)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn refuse(sock: &mut TcpStream, Refusal(code, reason, why): Refusal) -> Result<(), String> {
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
async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, Refusal> {
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

fn bad(why: impl Into<String>) -> Refusal {
    Refusal(400, "Bad Request", why.into())
}

async fn route(
    head: &[u8],
    allow: &Allowlist,
    resolve: &HashMap<String, IpAddr>,
) -> Result<Route, Refusal> {
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
        let up = connect(&host, port, allow, resolve).await?;
        return Ok(Route::Tunnel(up));
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
    let up = connect(&host, port, allow, resolve).await?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
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
    Ok(Route::Forward(up, out))
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

/// Addresses no sandbox may reach through the proxy: the host's own (loopback, its
/// interfaces' addresses: the API and every host service), link-local (cloud metadata
/// at 169.254.169.254), unspecified, multicast and broadcast, and the egress links.
pub fn forbidden(ip: IpAddr, local: &[IpAddr]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    if local.contains(&ip) || ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return true;
    }
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_link_local() || v4.is_broadcast() || (o[0] == 10 && o[1] == 200) || o[0] == 0
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
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
    allow: &Allowlist,
    resolve: &HashMap<String, IpAddr>,
) -> Result<TcpStream, Refusal> {
    if !allow.allows(host) {
        return Err(Refusal(
            403,
            "Forbidden",
            format!("{host} is not in this sandbox's egress allowlist"),
        ));
    }
    let addrs: Vec<SocketAddr> = match resolve.get(host) {
        Some(ip) => vec![SocketAddr::new(*ip, port)],
        None => match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| Refusal(502, "Bad Gateway", format!("cannot resolve {host}: {e}")))?
                .collect(),
        },
    };
    let local = local_addresses();
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| !forbidden(a.ip(), &local))
        .collect();
    if allowed.is_empty() {
        return Err(Refusal(
            403,
            "Forbidden",
            format!("{host} resolves only to addresses sandboxes may not reach"),
        ));
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
mod tests {
    use super::*;

    #[test]
    fn the_hosts_own_and_special_addresses_are_forbidden() {
        let local: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap()];
        for f in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "10.200.0.1",
            "192.0.2.7",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "fe80::1",
        ] {
            assert!(forbidden(f.parse().unwrap(), &local), "{f}");
        }
        for ok in ["10.251.0.2", "93.184.216.34", "2001:db8::1", "192.0.2.8"] {
            assert!(!forbidden(ok.parse().unwrap(), &local), "{ok}");
        }
    }

    #[test]
    fn authorities() {
        assert_eq!(
            split_authority("Pypi.org:443", None).ok().map(|a| a.0),
            Some("pypi.org".into())
        );
        assert_eq!(
            split_authority("x.org", Some(80)).ok().map(|a| a.1),
            Some(80)
        );
        assert_eq!(
            split_authority("[::1]:8080", None).ok().map(|a| a.0),
            Some("::1".into())
        );
        assert!(split_authority("x.org", None).is_err());
        assert!(split_authority("x.org:99999", None).is_err());
        assert!(split_authority(":80", None).is_err());
    }
}
