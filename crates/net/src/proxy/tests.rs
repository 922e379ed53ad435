use super::*;
use tokio::net::TcpListener;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

fn assert_forbidden(list: &[&str], local: &[IpAddr], opted: &[IpNet]) {
    for f in list {
        assert!(forbidden(ip(f), local, opted), "{f} should be forbidden");
    }
}

fn assert_allowed(list: &[&str], local: &[IpAddr], opted: &[IpNet]) {
    for a in list {
        assert!(!forbidden(ip(a), local, opted), "{a} should be allowed");
    }
}

#[test]
fn every_non_global_ipv4_range_is_forbidden() {
    assert_forbidden(
        &[
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.251.0.2",
            "10.255.255.255",
            "100.64.0.1",
            "100.100.100.200", // a cloud provider's metadata service
            "100.127.255.255",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.0.1",
            "192.168.255.255",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "250.1.2.3",
            "255.255.255.255",
            "10.200.0.1",
        ],
        &[],
        &[],
    );
    assert_allowed(
        &[
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "9.255.255.255",
            "11.0.0.1",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.1",
            "192.0.1.255",
            "192.0.3.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
        ],
        &[],
        &[],
    );
}

#[test]
fn every_non_global_ipv6_range_is_forbidden() {
    assert_forbidden(
        &[
            "::",
            "::1",
            "fc00::1",
            "fd00:ec2::254", // a cloud provider's metadata service
            "fdff:ffff::1",
            "fe80::1",
            "febf::1",
            "fec0::1", // site-local
            "ff02::1",
            "ff0e::1",
            "100::1",           // discard-only
            "64:ff9b:1::1",     // local-use NAT64
            "2001::1",          // Teredo
            "2001:2::1",        // benchmarking
            "2001:10::1",       // ORCHID
            "2001:db8::1",      // documentation
            "3fff::1",          // documentation
            "5f00::1",          // SRv6
            "4000::1",          // unallocated
            "1234::1",          // unallocated
            "::ffff:0:1.2.3.4", // IPv4-translated
        ],
        &[],
        &[],
    );
    assert_allowed(
        &[
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "2620:4f:8000::1",
            "2002:5db8:d822::1",    // 6to4 of 93.184.216.34
            "64:ff9b::5db8:d822",   // NAT64 of 93.184.216.34
            "::ffff:93.184.216.34", // IPv4-mapped
        ],
        &[],
        &[],
    );
}

#[test]
fn addresses_embedding_a_forbidden_ipv4_one_are_forbidden() {
    assert_forbidden(
        &[
            // IPv4-mapped
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:100.100.100.200",
            // IPv4-compatible
            "::169.254.169.254",
            "::127.0.0.1",
            "::93.184.216.34",
            // NAT64, well-known and local-use prefixes
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b::10.1.2.3",
            "64:ff9b::192.168.1.1",
            "64:ff9b:1:a9fe:a9:fe00::",
            "64:ff9b:1::a9fe:a9fe",
            // 6to4
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "2002:a00:1::",
            // Teredo: server 169.254.169.254, or client 169.254.169.254 (obfuscated)
            "2001:0:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:5601:5601",
        ],
        &[],
        &[],
    );
}

#[test]
fn the_hosts_own_addresses_are_forbidden_whatever_their_range() {
    let local = [ip("93.184.216.7"), ip("2a00:1450::7"), ip("10.251.0.1")];
    let opted = nets(&["10.251.0.0/16"]);
    assert_forbidden(
        &[
            "93.184.216.7",
            "::ffff:93.184.216.7",
            "64:ff9b::5db8:d807",
            "2002:5db8:d807::1",
            "2a00:1450::7",
            "10.251.0.1",
        ],
        &local,
        &opted,
    );
    assert_allowed(&["93.184.216.8", "10.251.0.2"], &local, &opted);
}

#[test]
fn opted_in_ranges_are_reached_but_never_the_host_loopback_or_metadata() {
    let opted = nets(&[
        "10.251.0.0/16",
        "100.64.0.0/10",
        "192.168.7.0/24",
        "fd00::/8",
    ]);
    assert_allowed(
        &[
            "10.251.3.2",
            "100.100.100.200",
            "192.168.7.9",
            "fd00:ec2::254",
            "::ffff:10.251.0.2",
            "64:ff9b::10.251.0.2",
        ],
        &[],
        &opted,
    );
    assert_forbidden(
        &["10.252.0.1", "192.168.8.1", "172.16.0.1", "fc00::1"],
        &[],
        &opted,
    );
    // Opting in everything still leaves loopback, link-local, "this network",
    // multicast, broadcast and the egress links out.
    let all = nets(&["0.0.0.0/0", "::/0"]);
    assert_allowed(
        &["10.1.2.3", "fc00::1", "192.0.2.1", "2001:db8::1"],
        &[],
        &all,
    );
    assert_forbidden(
        &[
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::",
            "::169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "10.200.0.1",
            "10.200.255.254",
        ],
        &[ip("192.0.2.55")],
        &all,
    );
    assert!(forbidden(ip("192.0.2.55"), &[ip("192.0.2.55")], &all));
}

fn request(head: &str) -> Result<Request, Refusal> {
    parse_request(head.as_bytes())
}

fn forwarded(head: &str) -> String {
    match request(head) {
        Ok(Request::Forward { head, .. }) => String::from_utf8(head).unwrap(),
        other => panic!("{head:?}: {other:?}"),
    }
}

fn refused(head: &str) -> (u16, String) {
    match request(head) {
        Err(Refusal(code, _, why)) => (code, why),
        other => panic!("{head:?}: {other:?}"),
    }
}

#[test]
fn plain_http_needs_a_host_header_naming_the_target() {
    // Same host (any case, a trailing dot), with or without the port.
    for host in [
        "allowed.test:8000",
        "ALLOWED.test:8000",
        "allowed.test.:8000",
        "allowed.test",
    ] {
        let out = forwarded(&format!(
            "GET http://allowed.test:8000/x?y=1 HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n"
        ));
        assert!(out.starts_with("GET /x?y=1 HTTP/1.1\r\n"), "{out}");
        assert!(out.contains(&format!("Host: {host}\r\n")), "{out}");
        assert!(
            out.ends_with("Accept: */*\r\nConnection: close\r\n\r\n"),
            "{out}"
        );
    }
    assert!(
        forwarded("GET http://a.test/ HTTP/1.1\r\nhost: a.test:80\r\n\r\n")
            .contains("host: a.test:80")
    );
    // Another host, or another port: 403.
    for (target, host) in [
        ("http://allowed.test:8000/", "evil.test"),
        ("http://allowed.test:8000/", "evil.test:8000"),
        ("http://allowed.test:8000/", "allowed.test:9000"),
        ("http://allowed.test/", "allowed.test:8080"),
        ("http://allowed.test/", "allowed.test.evil.test"),
        ("http://allowed.test/", "169.254.169.254"),
        ("http://allowed.test/", "[::1]:80"),
        ("http://allowed.test/", "allowed.test:"),
        ("http://allowed.test/", "user@allowed.test"),
        ("http://allowed.test/", ""),
    ] {
        let (code, why) = refused(&format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        assert_eq!(code, 403, "{target} {host}: {why}");
        assert!(why.contains("does not name the request's target"), "{why}");
    }
    // Two Host headers: malformed.
    let (code, _) = refused(
        "GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nHost: evil.test\r\n\r\n",
    );
    assert_eq!(code, 400);
    // None: the target's authority is added.
    let out = forwarded("GET http://allowed.test:8000/ HTTP/1.0\r\nAccept: */*\r\n\r\n");
    assert!(
        out.starts_with("GET / HTTP/1.1\r\nHost: allowed.test:8000\r\nAccept: */*\r\n"),
        "{out}"
    );
    let out = forwarded("GET http://user:pw@a.test/ HTTP/1.0\r\n\r\n");
    assert!(
        out.starts_with("GET / HTTP/1.1\r\nHost: a.test\r\n"),
        "{out}"
    );
    // Proxy headers are not passed on.
    let out = forwarded(
        "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: x\r\nConnection: keep-alive\r\n\r\n",
    );
    assert!(
        !out.contains("Proxy-Authorization") && !out.contains("keep-alive"),
        "{out}"
    );
}

#[test]
fn connect_targets_are_parsed_and_other_requests_refused() {
    assert_eq!(
        request("CONNECT Pypi.org:443 HTTP/1.1\r\nHost: whatever\r\n\r\n").ok(),
        Some(Request::Connect {
            host: "pypi.org".into(),
            port: 443
        })
    );
    assert_eq!(refused("CONNECT pypi.org HTTP/1.1\r\n\r\n").0, 400);
    assert_eq!(
        refused("GET /relative HTTP/1.1\r\nHost: a.test\r\n\r\n").0,
        400
    );
    assert_eq!(
        refused("GET https://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n").0,
        400
    );
    assert_eq!(refused("garbage\r\n\r\n").0, 400);
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

fn shared(resolve: &[(&str, &str)], opted: &[&str], per_sandbox: usize, all: usize) -> Arc<Shared> {
    Arc::new(Shared::new(
        resolve
            .iter()
            .map(|(n, a)| (n.to_string(), ip(a)))
            .collect(),
        nets(opted),
        IDLE_TIMEOUT,
        per_sandbox,
        all,
    ))
}

fn allowlist(names: &[&str]) -> Allowlist {
    Allowlist::parse(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap()
}

#[tokio::test]
async fn addresses_and_names_leading_to_forbidden_addresses_are_refused() {
    let s = shared(
        &[
            ("meta.test", "100.100.100.200"),
            ("private.test", "10.1.2.3"),
            ("home.test", "192.168.1.1"),
            ("ula.test", "fd00:ec2::254"),
            ("nat64.test", "64:ff9b::a9fe:a9fe"),
            ("sixtofour.test", "2002:a9fe:a9fe::1"),
            ("loop.test", "127.0.0.1"),
            ("mirror.test", "127.0.0.2"),
        ],
        &["127.0.0.0/8"],
        4,
        4,
    );
    let allow = Policy {
        allow: allowlist(&[
            "meta.test",
            "private.test",
            "home.test",
            "ula.test",
            "nat64.test",
            "sixtofour.test",
            "loop.test",
            "*.test",
        ]),
        trusted: false,
    };
    for host in [
        "meta.test",
        "private.test",
        "home.test",
        "ula.test",
        "nat64.test",
        "sixtofour.test",
        "loop.test",
        "mirror.test",
    ] {
        let Err(Refusal(code, _, why)) = connect(host, 80, &allow, &s).await else {
            panic!("{host} connected");
        };
        assert_eq!(code, 403, "{host}: {why}");
        assert!(why.contains("may not reach"), "{host}: {why}");
    }
    for host in ["10.1.2.3", "::1", "169.254.169.254", "2130706433", "127.1"] {
        let Err(Refusal(code, _, why)) = connect(host, 80, &allow, &s).await else {
            panic!("{host} connected");
        };
        assert_eq!(code, 403, "{host}: {why}");
        assert!(why.contains("is an IP address"), "{host}: {why}");
    }
    let Err(Refusal(code, _, why)) = connect("other.example", 80, &allow, &s).await else {
        panic!("connected");
    };
    assert_eq!(
        (code, why.contains("not in this sandbox's egress allowlist")),
        (403, true)
    );
}

/// The server's trusted names (its package mirrors) may resolve to private addresses
/// for a template build's proxy on ports 80 and 443 only; for every other sandbox they
/// are names like any other.
#[tokio::test]
async fn trusted_names_are_for_builds_on_web_ports_only() {
    let s = Arc::try_unwrap(shared(&[("mirror.test", "10.9.9.9")], &[], 4, 4))
        .ok()
        .unwrap()
        .with_trusted_names(vec!["Mirror.Test.".into()]);
    let policy = |trusted| Policy {
        allow: allowlist(&["mirror.test"]),
        trusted,
    };
    for (trusted, port) in [(false, 80), (false, 443), (true, 22), (true, 6379)] {
        let Err(Refusal(code, _, why)) = connect("mirror.test", port, &policy(trusted), &s).await
        else {
            panic!("connected (trusted {trusted}, port {port})");
        };
        assert_eq!(code, 403, "{why}");
        assert!(why.contains("may not reach"), "{why}");
    }
}

#[test]
fn the_global_cap_leaves_half_the_descriptors() {
    assert_eq!(global_cap(65536), 16384);
    assert_eq!(global_cap(1024), 256);
    assert_eq!(global_cap(10), 16);
    assert!(global_cap(u64::MAX) <= 1 << 20);
}

#[tokio::test(start_paused = true)]
async fn refusals_are_logged_at_most_every_ten_seconds() {
    let mut t = Throttle::default();
    assert_eq!(t.hit(), Some(1));
    for _ in 0..1000 {
        assert_eq!(t.hit(), None);
    }
    tokio::time::sleep(REFUSAL_LOG_EVERY).await;
    assert_eq!(t.hit(), Some(1001));
    assert_eq!(t.hit(), None);
}

#[tokio::test(start_paused = true)]
async fn idle_tunnels_are_closed_busy_ones_are_not() {
    let idle = Duration::from_secs(300);
    let (mut client, near) = tokio::io::duplex(1024);
    let (far, mut upstream) = tokio::io::duplex(1024);
    let task = tokio::spawn(pipe(near, far, idle));
    let mut b = [0u8; 1];
    // A byte every 200 s, one way or the other, for 2000 s: the tunnel stays.
    for i in 0..10 {
        tokio::time::sleep(Duration::from_secs(200)).await;
        if i % 2 == 0 {
            client.write_all(b"x").await.unwrap();
            upstream.read_exact(&mut b).await.unwrap();
        } else {
            upstream.write_all(b"y").await.unwrap();
            client.read_exact(&mut b).await.unwrap();
        }
        assert!(!task.is_finished(), "closed after {} s", (i + 1) * 200);
    }
    // Then silence: closed exactly when the idle time has passed.
    let quiet = tokio::time::Instant::now();
    let why = task.await.unwrap().unwrap_err();
    assert!(why.contains("idle"), "{why}");
    assert_eq!(quiet.elapsed(), idle);
    assert_eq!(client.read(&mut b).await.unwrap(), 0);
    assert_eq!(upstream.read(&mut b).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_ends_when_both_ends_close() {
    let (mut client, near) = tokio::io::duplex(1024);
    let (far, mut upstream) = tokio::io::duplex(1024);
    let task = tokio::spawn(pipe(near, far, IDLE_TIMEOUT));
    client.write_all(b"ping").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    upstream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping");
    upstream.write_all(b"pong").await.unwrap();
    upstream.shutdown().await.unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"pong");
    assert!(task.await.unwrap().is_ok());
}

/// A proxy on a loopback port (sandbox "t", allowlist `only.test`).
async fn start_proxy(shared: Arc<Shared>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(serve(
        l,
        Arc::new(Policy {
            allow: allowlist(&["only.test"]),
            trusted: false,
        }),
        shared,
        "t".into(),
    ));
    (addr, task)
}

/// Opens `n` connections that send nothing; those the proxy holds (no answer within
/// two seconds), after checking that every other one was answered 503 or closed.
async fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut waits = tokio::task::JoinSet::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        waits.spawn(async move {
            let mut b = [0u8; 512];
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                Err(_) => Some(s),
                Ok(Ok(0)) | Ok(Err(_)) => None,
                Ok(Ok(k)) => {
                    let answer = String::from_utf8_lossy(&b[..k]).into_owned();
                    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
                    assert!(answer.ends_with("too many connections\n"), "{answer}");
                    None
                }
            }
        });
    }
    let mut held = Vec::new();
    while let Some(r) = waits.join_next().await {
        held.extend(r.unwrap());
    }
    held
}

/// Asks the proxy at `addr` for an unlisted name until it answers 403 (not 503).
async fn served_again(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"CONNECT other.test:443 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer).await;
        if answer.starts_with("HTTP/1.1 403 ") {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn connections_past_the_caps_are_turned_away_at_once() {
    // Four a sandbox, six for all sandboxes together.
    let s = shared(&[], &[], 4, 6);
    let (a, task_a) = start_proxy(s.clone()).await;
    let (b, task_b) = start_proxy(s.clone()).await;
    let held_a = open_idle(a, 12).await;
    assert_eq!(held_a.len(), 4);
    let held_b = open_idle(b, 12).await;
    assert_eq!(held_b.len(), 2, "the global cap");
    // Slots come back when connections end.
    drop(held_a);
    served_again(a).await;
    assert_eq!(open_idle(b, 6).await.len(), 2, "this sandbox's cap");
    // Ending a proxy ends the connections it serves.
    task_b.abort();
    let _ = task_b.await;
    for mut c in held_b {
        let mut x = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut x)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    }
    // Every slot of B's is back once its connections have ended.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.all.available_permits() < 6 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open_idle(a, 8).await.len(), 4);
    task_a.abort();
}
