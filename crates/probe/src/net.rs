//! Network probes: Unix sockets of others, packet and raw sockets, vsock, netlink,
//! metadata address, host TCP services.

use crate::util::{self, ename, in_child, last, own, Iso, Outcome};
use crate::Ctx;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Connects a Unix stream socket to `addr` (abstract when it starts with `@`).
fn unix_connect(addr: &str) -> Result<(), i32> {
    // SAFETY: a plain socket call; the fd is owned at once.
    let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(util::errno());
    }
    let s = own(s as libc::c_long);
    // SAFETY: zeroed sockaddr_un.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, abstract_) = match addr.strip_prefix('@') {
        Some(n) => (n.as_bytes(), true),
        None => (addr.as_bytes(), false),
    };
    let off = usize::from(abstract_);
    if bytes.len() + off >= sa.sun_path.len() {
        return Err(libc::ENAMETOOLONG);
    }
    for (i, b) in bytes.iter().enumerate() {
        sa.sun_path[i + off] = *b as libc::c_char;
    }
    let len =
        std::mem::size_of::<libc::sa_family_t>() + off + bytes.len() + usize::from(!abstract_);
    // SAFETY: connect with a sockaddr_un we filled and its length.
    let r = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(util::errno())
    }
}

pub fn unix_sockets(ctx: &Ctx) -> Outcome {
    let mut targets: Vec<String> = Vec::new();
    if !util::host() {
        targets.push("@forkbox-adopt".into());
        for p in [
            "/run/docker.sock",
            "/var/run/docker.sock",
            "/run/containerd/containerd.sock",
            "/run/systemd/private",
            "/run/dbus/system_bus_socket",
        ] {
            targets.push(p.into());
        }
    }
    targets.extend(ctx.abstract_names.iter().map(|n| format!("@{n}")));
    targets.extend(ctx.unix_paths.iter().cloned());
    if targets.is_empty() {
        return Outcome::skipped("no socket to try (host mode needs --abstract/--unix)");
    }
    let mut notes = Vec::new();
    let mut escaped = false;
    for t in &targets {
        match unix_connect(t) {
            Ok(()) => {
                escaped = true;
                notes.push(format!("{t}: connected"));
            }
            Err(e) => notes.push(format!("{t}: {}", ename(e))),
        }
    }
    Outcome::from(escaped, notes.join(", "))
}

fn socket_attempts(what: &str, tries: &[(&str, i32, i32, i32)]) -> Outcome {
    let mut notes = Vec::new();
    let mut escaped = false;
    for (name, dom, ty, proto) in tries {
        // SAFETY: a plain socket call; the fd is closed at once.
        let s = unsafe { libc::socket(*dom, *ty | libc::SOCK_CLOEXEC, *proto) };
        if s >= 0 {
            drop(own(s as libc::c_long));
            escaped = true;
            notes.push(format!("{name}: got a socket"));
        } else {
            notes.push(format!("{name}: {}", last()));
        }
    }
    Outcome::from(escaped, format!("{what}: {}", notes.join(", ")))
}

pub fn af_packet(_: &Ctx) -> Outcome {
    let all = i32::from((libc::ETH_P_ALL as u16).to_be());
    socket_attempts(
        "AF_PACKET",
        &[
            ("SOCK_RAW", libc::AF_PACKET, libc::SOCK_RAW, all),
            ("SOCK_DGRAM", libc::AF_PACKET, libc::SOCK_DGRAM, all),
        ],
    )
}

pub fn raw_socket(_: &Ctx) -> Outcome {
    socket_attempts(
        "raw IP",
        &[
            (
                "AF_INET SOCK_RAW",
                libc::AF_INET,
                libc::SOCK_RAW,
                libc::IPPROTO_RAW,
            ),
            (
                "AF_INET SOCK_RAW icmp",
                libc::AF_INET,
                libc::SOCK_RAW,
                libc::IPPROTO_ICMP,
            ),
            (
                "AF_INET6 SOCK_RAW",
                libc::AF_INET6,
                libc::SOCK_RAW,
                libc::IPPROTO_RAW,
            ),
        ],
    )
}

pub fn af_vsock(_: &Ctx) -> Outcome {
    socket_attempts(
        "AF_VSOCK (to the hypervisor)",
        &[
            ("SOCK_STREAM", libc::AF_VSOCK, libc::SOCK_STREAM, 0),
            ("SOCK_DGRAM", libc::AF_VSOCK, libc::SOCK_DGRAM, 0),
        ],
    )
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = (4 + data.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Sends one RTM_NEWADDR/RTM_DELADDR for 192.0.2.1/32 on `lo`; the kernel's answer.
fn addr_request(fd: i32, kind: u16, ifindex: u32) -> Result<(), i32> {
    let mut body = Vec::new();
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    body.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0]);
    body.extend_from_slice(&ifindex.to_ne_bytes());
    let ip = [192u8, 0, 2, 1];
    push_attr(&mut body, 2, &ip); // IFA_LOCAL
    push_attr(&mut body, 1, &ip); // IFA_ADDRESS
    let flags: u16 =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    let mut msg = Vec::new();
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&body);
    // SAFETY: send from a buffer we own.
    if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(util::errno());
    }
    let mut ans = [0u8; 1024];
    // SAFETY: recv into a buffer we own.
    let n = unsafe { libc::recv(fd, ans.as_mut_ptr().cast(), ans.len(), 0) };
    if n < 20 {
        return Err(util::errno());
    }
    // struct nlmsgerr follows the 16-byte header: int error.
    let err = i32::from_ne_bytes([ans[16], ans[17], ans[18], ans[19]]);
    if err == 0 {
        Ok(())
    } else {
        Err(-err)
    }
}

pub fn netlink_route(_: &Ctx) -> Outcome {
    in_child("netlink", Iso::Private, || {
        // SAFETY: a plain socket call; the fd is owned at once.
        let s = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if s < 0 {
            return Outcome::blocked(format!("netlink socket: {}", last()));
        }
        let s = own(s as libc::c_long);
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval we own.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let lo = util::cstr("lo");
        // SAFETY: NUL-terminated interface name.
        let idx = unsafe { libc::if_nametoindex(lo.as_ptr()) };
        match addr_request(s.as_raw_fd(), libc::RTM_NEWADDR, idx) {
            Ok(()) => {
                let _ = addr_request(s.as_raw_fd(), libc::RTM_DELADDR, idx);
                Outcome::escaped("RTM_NEWADDR 192.0.2.1/32 on lo accepted (removed again)")
            }
            Err(e) => Outcome::blocked(format!("RTM_NEWADDR on lo: {}", ename(e))),
        }
    })
}

/// Connects with a timeout; for HTTP ports, the first line of the answer to a GET.
fn tcp_try(addr: &str, http_path: Option<&str>) -> Result<String, String> {
    let sa: SocketAddr = match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => return Err(format!("{addr}: bad address")),
    };
    match TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
        Ok(mut s) => {
            let mut first = String::new();
            if let Some(p) = http_path {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = write!(s, "GET {p} HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut b = [0u8; 512];
                if let Ok(n) = s.read(&mut b) {
                    first = String::from_utf8_lossy(&b[..n])
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                }
            }
            Ok(format!(
                "{addr}: connected{}",
                if first.is_empty() {
                    String::new()
                } else {
                    format!(" ({first})")
                }
            ))
        }
        Err(e) => Err(format!(
            "{addr}: {}",
            e.raw_os_error().map(ename).unwrap_or_else(|| e.to_string())
        )),
    }
}

fn tcp_targets(what: &str, targets: &[String], http_path: Option<&str>) -> Outcome {
    if targets.is_empty() {
        return Outcome::skipped(format!("{what}: no target given"));
    }
    let mut notes = Vec::new();
    let mut escaped = false;
    for t in targets {
        match tcp_try(t, http_path) {
            Ok(n) => {
                escaped = true;
                notes.push(n);
            }
            Err(n) => notes.push(n),
        }
    }
    Outcome::from(escaped, notes.join(", "))
}

pub fn metadata_ip(_: &Ctx) -> Outcome {
    tcp_targets(
        "metadata",
        &["169.254.169.254:80".to_owned()],
        Some("/latest/meta-data/"),
    )
}

pub fn host_loopback(ctx: &Ctx) -> Outcome {
    let Some(port) = ctx.port else {
        return Outcome::skipped("needs --port (the API server's)");
    };
    tcp_targets(
        "host loopback",
        &[format!("127.0.0.1:{port}"), format!("[::1]:{port}")],
        Some("/v1/healthz"),
    )
}

pub fn host_tcp(ctx: &Ctx) -> Outcome {
    tcp_targets("host tcp", &ctx.tcp, None)
}
