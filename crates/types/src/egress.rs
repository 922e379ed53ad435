//! Egress allowlists: which host names a sandbox's proxy lets it reach.
//!
//! A pattern is a host name (`pypi.org`, matched exactly) or `*.` and a domain
//! (`*.example.com`, matching every name under it but not the domain itself). Names
//! compare case-insensitively, without a trailing dot. IP literals are names like any
//! other: connecting by address needs the address itself in the list.

/// Where every egress sandbox finds its proxy (the far end of its veth).
pub const PROXY_ADDR: &str = "10.200.0.1:3128";
/// The sandbox's own address on that link.
pub const SANDBOX_ADDR: &str = "10.200.0.2";
/// Most patterns in one allowlist.
pub const MAX_PATTERNS: usize = 64;

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

impl Allowlist {
    /// Parses `patterns`, or says which one is not a host name or `*.domain`.
    pub fn parse(patterns: &[String]) -> Result<Allowlist, String> {
        if patterns.len() > MAX_PATTERNS {
            return Err(format!(
                "egress_allowlist may hold at most {MAX_PATTERNS} patterns"
            ));
        }
        let mut a = Allowlist {
            exact: Vec::new(),
            suffixes: Vec::new(),
        };
        for p in patterns {
            let n = normalize(p);
            match n.strip_prefix("*.") {
                Some(domain) if valid_name(domain) => a.suffixes.push(format!(".{domain}")),
                None if valid_name(&n) => a.exact.push(n),
                _ => {
                    return Err(format!(
                        "egress_allowlist: {p:?} is not a host name or *.domain"
                    ))
                }
            }
        }
        Ok(a)
    }

    /// Whether `host` may be reached.
    pub fn allows(&self, host: &str) -> bool {
        let h = normalize(host.trim_start_matches('[').trim_end_matches(']'));
        self.exact.contains(&h) || self.suffixes.iter().any(|s| h.ends_with(s.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
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
        let a = list(&["pypi.org", "*.example.com", "10.1.2.3"]);
        assert!(a.allows("pypi.org") && a.allows("PyPI.org.") && a.allows("10.1.2.3"));
        assert!(!a.allows("files.pypi.org") && !a.allows("pypi.org.evil.com"));
        assert!(a.allows("a.example.com") && a.allows("a.b.example.com"));
        assert!(!a.allows("example.com") && !a.allows("badexample.com"));
        assert!(!a.allows("10.1.2.4") && !a.allows(""));
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
            assert!(Allowlist::parse(&[bad.to_string()]).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("h{i}.org")).collect();
        assert!(Allowlist::parse(&many).is_err());
    }
}
