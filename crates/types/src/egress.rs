//! Egress allowlists: which host names a sandbox's proxy lets it reach.
//!
//! A pattern is a host name (`pypi.org`, matched exactly) or `*.` and a domain
//! (`*.example.com`, matching every name under it but not the domain itself). Names
//! compare case-insensitively, without a trailing dot. IP literals (`10.1.2.3`,
//! `[fd00::1]:443`, and the numeric forms resolvers take for addresses, like `127.1` or
//! `0x7f000001`) are refused, and so is any name whose last label is all digits (no
//! top-level domain is): a sandbox reaches hosts by name only, so the proxy's checks on
//! what a name resolves to always apply.

/// Where every egress sandbox finds its proxy (the far end of its veth).
pub const PROXY_ADDR: &str = "10.200.0.1:3128";
/// The sandbox's own address on that link.
pub const SANDBOX_ADDR: &str = "10.200.0.2";
/// Most patterns in one allowlist.
pub const MAX_PATTERNS: usize = 64;

/// Why an allowlist was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowlistError {
    #[error("egress_allowlist may hold at most {MAX_PATTERNS} patterns")]
    TooMany,
    #[error(
        "egress_allowlist: {0:?} is an IP address; list host names only \
         (the egress proxy never connects to an address given as such)"
    )]
    IpLiteral(String),
    #[error("egress_allowlist: {0:?} is not a host name or *.domain")]
    NotAName(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    exact: Vec<String>,
    suffixes: Vec<String>,
}

/// Lowercase, without a trailing dot.
fn normalize(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// One number as `inet_aton` reads it: decimal, octal (`0…`) or hex (`0x…`).
fn aton_number(s: &str) -> bool {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// Whether `s` names an address rather than a host: an IPv4 or IPv6 address, bracketed
/// or not, with or without a port or a zone (`%eth0`), or a numeric form that
/// `inet_aton`, and so the system's resolver, takes for an IPv4 address (`127.1`,
/// `0x7f.1`, `2130706433`).
pub fn is_ip_literal(s: &str) -> bool {
    use std::net::{IpAddr, SocketAddr};
    let s = s.trim().trim_end_matches('.');
    if s.parse::<IpAddr>().is_ok() || s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    // `[v6]`, `[v6]:port`, `[v6%zone]`.
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((inner, _)) = rest.split_once(']') {
            return inner
                .split('%')
                .next()
                .is_some_and(|a| a.parse::<IpAddr>().is_ok());
        }
    }
    // `v6%zone`.
    if let Some((a, _)) = s.split_once('%') {
        if a.parse::<IpAddr>().is_ok() {
            return true;
        }
    }
    // `host:port` with a numeric host in inet_aton's forms.
    let host = match s.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => s,
    };
    let labels: Vec<&str> = host.split('.').collect();
    labels.len() <= 4 && labels.iter().all(|l| aton_number(l))
}

/// A name whose last label is all digits: no top-level domain is, so it can only be
/// (part of) an address.
fn numeric_tld(name: &str) -> bool {
    name.rsplit('.')
        .next()
        .is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
}

/// One pattern, normalized.
enum Pattern {
    Exact(String),
    Suffix(String),
}

fn parse_one(p: &str) -> Result<Pattern, AllowlistError> {
    let n = normalize(p);
    let name = n.strip_prefix("*.").unwrap_or(&n);
    if is_ip_literal(&n) || is_ip_literal(name) || (valid_name(name) && numeric_tld(name)) {
        return Err(AllowlistError::IpLiteral(p.to_owned()));
    }
    match n.strip_prefix("*.") {
        Some(domain) if valid_name(domain) => Ok(Pattern::Suffix(format!(".{domain}"))),
        None if valid_name(&n) => Ok(Pattern::Exact(n)),
        _ => Err(AllowlistError::NotAName(p.to_owned())),
    }
}

impl Allowlist {
    fn empty() -> Allowlist {
        Allowlist {
            exact: Vec::new(),
            suffixes: Vec::new(),
        }
    }

    fn push(&mut self, p: Pattern) {
        match p {
            Pattern::Exact(n) => self.exact.push(n),
            Pattern::Suffix(s) => self.suffixes.push(s),
        }
    }

    /// Parses `patterns`, or says which one is not a host name or `*.domain`, or is an
    /// IP address.
    pub fn parse(patterns: &[String]) -> Result<Allowlist, AllowlistError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(AllowlistError::TooMany);
        }
        let mut a = Allowlist::empty();
        for p in patterns {
            a.push(parse_one(p)?);
        }
        Ok(a)
    }

    /// For allowlists stored by an earlier version (a sandbox adopted after an
    /// upgrade): the patterns that still parse, and why each other one was dropped.
    /// Dropping only ever narrows what the sandbox reaches.
    pub fn parse_lenient(patterns: &[String]) -> (Allowlist, Vec<AllowlistError>) {
        let mut a = Allowlist::empty();
        let mut dropped = Vec::new();
        for p in patterns {
            match parse_one(p) {
                Ok(p) => a.push(p),
                Err(e) => dropped.push(e),
            }
        }
        (a, dropped)
    }

    /// Whether `host` may be reached (never when it is an IP address).
    pub fn allows(&self, host: &str) -> bool {
        if is_ip_literal(host) {
            return false;
        }
        let h = normalize(host);
        self.exact.contains(&h) || self.suffixes.iter().any(|s| h.ends_with(s.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }
}

/// Points a sandbox's programs at its egress proxy (`HTTP(S)_PROXY`, both cases) and
/// keeps loopback direct (`NO_PROXY`); variables already set are left as they are.
pub fn proxy_env(env: &mut std::collections::BTreeMap<String, String>) {
    let proxy = format!("http://{PROXY_ADDR}");
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.entry(k.to_owned()).or_insert_with(|| proxy.clone());
    }
    for k in ["NO_PROXY", "no_proxy"] {
        env.entry(k.to_owned())
            .or_insert_with(|| "localhost,127.0.0.1,::1".to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(p: &[&str]) -> Allowlist {
        Allowlist::parse(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_and_wildcard_patterns() {
        let a = list(&["pypi.org", "*.example.com", "mirror", "x-1.internal"]);
        assert!(a.allows("pypi.org") && a.allows("PyPI.org.") && a.allows("mirror"));
        assert!(!a.allows("files.pypi.org") && !a.allows("pypi.org.evil.com"));
        assert!(a.allows("a.example.com") && a.allows("a.b.example.com"));
        assert!(!a.allows("example.com") && !a.allows("badexample.com"));
        assert!(a.allows("x-1.internal") && !a.allows("10.1.2.4") && !a.allows(""));
    }

    #[test]
    fn ip_literals_are_refused_with_their_own_error() {
        for lit in [
            "10.1.2.3",
            "10.1.2.3.",
            "169.254.169.254:80",
            "127.0.0.1:8080",
            "::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "[::1]",
            "[fd00::1]:443",
            "[fe80::1%eth0]",
            "fe80::1%eth0",
            "127.1",
            "0x7f.1",
            "0x7f000001",
            "2130706433",
            "017700000001",
            "127.0.1:80",
            "*.2.3.4",
            "*.0.0.1",
            "a.b.1234",
            " 10.0.0.1 ",
        ] {
            match Allowlist::parse(&[lit.to_string()]) {
                Err(AllowlistError::IpLiteral(p)) => assert_eq!(p, lit),
                other => panic!("{lit:?}: {other:?}"),
            }
        }
        let e = Allowlist::parse(&["10.1.2.3".to_string()]).unwrap_err();
        assert!(
            e.to_string().contains("\"10.1.2.3\" is an IP address"),
            "{e}"
        );
        // Names that only look numeric in part are names.
        list(&[
            "0x7f.example",
            "1.2.3.example.com",
            "123.org",
            "*.10.example",
            "v6.x",
        ]);
    }

    #[test]
    fn addresses_are_never_allowed_even_by_wildcards() {
        let a = list(&["*.example.com", "example.com"]);
        for h in ["1.2.3.4", "[::1]", "::ffff:1.2.3.4", "0x7f000001"] {
            assert!(!a.allows(h), "{h}");
        }
    }

    #[test]
    fn stored_lists_keep_what_still_parses() {
        let (a, dropped) = Allowlist::parse_lenient(&[
            "pypi.org".to_string(),
            "10.1.2.3".to_string(),
            "x:80".to_string(),
        ]);
        assert!(a.allows("pypi.org") && !a.allows("10.1.2.3"));
        assert_eq!(
            dropped,
            [
                AllowlistError::IpLiteral("10.1.2.3".into()),
                AllowlistError::NotAName("x:80".into())
            ]
        );
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "*",
            "*.",
            "a..b",
            "http://x.org",
            "x.org/path",
            "a b",
            "*.*.x",
            "x:80",
        ] {
            assert!(
                matches!(
                    Allowlist::parse(&[bad.to_string()]),
                    Err(AllowlistError::NotAName(_))
                ),
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("h{i}.org")).collect();
        assert_eq!(Allowlist::parse(&many), Err(AllowlistError::TooMany));
    }
}
