//! Pulling an image from a registry (the OCI distribution API, as Docker Hub, GHCR,
//! Quay and `distribution` speak it) into an OCI image layout directory, which
//! [`crate::Archive::open_dir`] then reads like an archive.
//!
//! - A reference is `[host[:port]/]repository[:tag][@digest]`; without a host it is
//!   Docker Hub's (`python` = `registry-1.docker.io/library/python:latest`). A host
//!   that is loopback (`localhost`, `127.0.0.0/8`, `::1`) is spoken to over HTTP, any
//!   other over HTTPS (the host's CA certificates).
//! - Authentication: anonymous first; on a 401, HTTP Basic with the credentials given,
//!   or the Bearer token flow (`WWW-Authenticate: Bearer realm=…`: a token asked of the
//!   realm, with the credentials when given).
//! - Everything is checked against its digest: the manifest against the digest asked
//!   for (or the registry's `Docker-Content-Digest`), an index's pick, the
//!   configuration and every layer as it is written; sizes are bounded.

use crate::OciError;
use futures_util::StreamExt as _;
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt as _;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";
const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const DOCKER_HUB: &str = "registry-1.docker.io";
/// Largest manifest or index.
const MAX_MANIFEST: usize = 4 << 20;

/// Credentials for a registry (`Debug` leaves the password out).
pub use forkbox_types::api::RegistryAuth as Credentials;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Where the registry is (`host[:port]`).
    pub host: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn bad_ref(r: &str, why: &str) -> OciError {
    OciError::Invalid {
        what: format!("image reference {r:?}"),
        why: why.to_owned(),
    }
}

/// Whether `s` names a registry host rather than a path component (Docker's rule:
/// it has a `.` or a `:`, or is `localhost`).
fn is_host(s: &str) -> bool {
    s.contains('.') || s.contains(':') || s == "localhost"
}

/// Whether `reference` names an image in a registry rather than a forkbox template: a
/// registry host, a tag or a digest, or a path (`python` is a template;
/// `python:3.11-slim`, `library/python`, `ghcr.io/x/y` are images).
pub fn looks_like_image(reference: &str) -> bool {
    reference.contains(':') || reference.contains('@') || reference.contains('/')
}

impl Reference {
    pub fn parse(r: &str) -> Result<Reference, OciError> {
        if r.is_empty() || r.len() > 512 || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad_ref(r, "empty, too long or with spaces"));
        }
        let (rest, digest) = match r.split_once('@') {
            Some((a, d)) => (a, Some(d.to_owned())),
            None => (r, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((h, p)) if is_host(h) => (h.to_owned(), p.to_owned()),
            _ => (DOCKER_HUB.to_owned(), rest.to_owned()),
        };
        // A tag is after the last `:` of the last path component.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo.to_owned(), Some(tag.to_owned())),
            _ => (path, None),
        };
        let repository = if host == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad_ref(
                r,
                "repository names are lower-case letters, digits and . _ - between slashes",
            ));
        }
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad_ref(r, "a tag is up to 128 letters, digits and . _ -"));
            }
        }
        if let Some(d) = &digest {
            crate::Hasher::for_digest(d, "the digest asked for")?;
        }
        let port_ok = match host.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && !p.contains(']') => {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
            }
            _ => true,
        };
        if !port_ok
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        {
            return Err(bad_ref(
                r,
                "a host is a name or address with an optional port",
            ));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            _ => tag,
        };
        Ok(Reference {
            host,
            repository,
            tag,
            digest,
        })
    }

    fn scheme(&self) -> &'static str {
        let name = match self.host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.host,
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let loopback = name == "localhost"
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            "http"
        } else {
            "https"
        }
    }

    fn url(&self, what: &str) -> String {
        format!(
            "{}://{}/v2/{}/{what}",
            self.scheme(),
            self.host,
            self.repository
        )
    }
}

/// A registry session: the client and the authorization it got.
struct Session<'a> {
    http: reqwest::Client,
    reference: &'a Reference,
    credentials: Option<&'a Credentials>,
    authorization: Option<String>,
}

fn net(what: &str, e: impl std::fmt::Display) -> OciError {
    OciError::Unsupported(format!("{what}: {e}"))
}

/// `key="value"` pairs of a `WWW-Authenticate` challenge's parameters.
fn challenge_params(s: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once('=') {
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            match q.split_once('"') {
                Some((v, n)) => (v, n),
                None => (q, ""),
            }
        } else {
            match after.split_once(',') {
                Some((v, n)) => (v, n),
                None => (after, ""),
            }
        };
        out.insert(k, v.to_owned());
        rest = next;
    }
    out
}

impl Session<'_> {
    async fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, OciError> {
        for attempt in 0..2 {
            let mut req = self.http.get(url);
            if let Some(a) = accept {
                req = req.header(reqwest::header::ACCEPT, a);
            }
            if let Some(auth) = &self.authorization {
                req = req.header(reqwest::header::AUTHORIZATION, auth);
            }
            let r = req
                .send()
                .await
                .map_err(|e| net(&format!("reach {}", self.reference.host), e))?;
            if r.status() != reqwest::StatusCode::UNAUTHORIZED || attempt == 1 {
                let status = r.status();
                if status == reqwest::StatusCode::UNAUTHORIZED {
                    return Err(OciError::Unsupported(format!(
                        "{}: the registry refused the credentials{}",
                        self.reference,
                        if self.credentials.is_none() {
                            " (none were given)"
                        } else {
                            ""
                        }
                    )));
                }
                if status == reqwest::StatusCode::NOT_FOUND {
                    return Err(OciError::Unsupported(format!(
                        "{}: the registry has no such image or blob (404 for {url})",
                        self.reference
                    )));
                }
                if !status.is_success() {
                    return Err(OciError::Unsupported(format!(
                        "{url}: the registry answered {status}"
                    )));
                }
                return Ok(r);
            }
            let challenge = r
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            self.authorization = Some(self.authorize(&challenge).await?);
        }
        Err(OciError::Unsupported("authorization loop".into()))
    }

    /// The `Authorization` value a 401's challenge asks for.
    async fn authorize(&self, challenge: &str) -> Result<String, OciError> {
        use base64::Engine as _;
        let basic = self.credentials.map(|c| {
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.username, c.password))
        });
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => basic.map(|b| format!("Basic {b}")).ok_or_else(|| {
                OciError::Unsupported(format!(
                    "{}: the registry needs credentials",
                    self.reference
                ))
            }),
            "bearer" => {
                let p = challenge_params(params);
                let realm = p.get("realm").ok_or_else(|| {
                    OciError::Unsupported("a Bearer challenge without a realm".into())
                })?;
                let realm_url =
                    reqwest::Url::parse(realm).map_err(|e| net("the token realm", e))?;
                if realm_url.scheme() != "https" && self.reference.scheme() == "https" {
                    return Err(OciError::Unsupported(format!(
                        "the token realm {realm} is not HTTPS"
                    )));
                }
                let mut req = self.http.get(realm_url);
                let scope = p
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
                let mut query = vec![("scope", scope)];
                if let Some(s) = p.get("service") {
                    query.push(("service", s.clone()));
                }
                req = req.query(&query);
                if let Some(b) = &basic {
                    req = req.header(reqwest::header::AUTHORIZATION, format!("Basic {b}"));
                }
                let r = req.send().await.map_err(|e| net("ask for a token", e))?;
                if !r.status().is_success() {
                    return Err(OciError::Unsupported(format!(
                        "{}: the token service answered {}",
                        self.reference,
                        r.status()
                    )));
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let body = read_bounded(r, 64 << 10).await?;
                let t: Token =
                    serde_json::from_slice(&body).map_err(|e| net("read the token", e))?;
                let token = t.token.or(t.access_token).ok_or_else(|| {
                    OciError::Unsupported("the token service gave no token".into())
                })?;
                Ok(format!("Bearer {token}"))
            }
            _ => Err(OciError::Unsupported(format!(
                "{}: the registry asks for authentication forkbox does not speak ({challenge:?})",
                self.reference
            ))),
        }
    }

    /// A manifest or index by tag or digest: (bytes, its digest, its media type).
    async fn manifest(
        &mut self,
        tag_or_digest: &str,
        expected: Option<&str>,
    ) -> Result<(Vec<u8>, String, String), OciError> {
        let r = self
            .get(
                &self.reference.url(&format!("manifests/{tag_or_digest}")),
                Some(ACCEPT),
            )
            .await?;
        let header_digest = r
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let media = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let bytes = read_bounded(r, MAX_MANIFEST).await?;
        let digest = match expected.or(header_digest.as_deref()) {
            Some(d) => {
                crate::check("the manifest", d, bytes.len() as u64, &bytes)?;
                d.to_owned()
            }
            None => {
                let mut h = crate::Hasher::Sha256(sha2::Sha256::new());
                h.update(&bytes);
                h.finish()
            }
        };
        // (A registry may answer with a generic type: the document says its own.)
        let media = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .unwrap_or(media);
        Ok((bytes, digest, media))
    }

    /// A blob into `dest`, checked against `digest` and `size` as it arrives; at most
    /// `budget` bytes (lowered by what it took).
    async fn blob(
        &mut self,
        digest: &str,
        size: u64,
        dest: &Path,
        budget: &mut u64,
    ) -> Result<(), OciError> {
        if size > *budget {
            return Err(OciError::Unsupported(format!(
                "the image is larger than the limit ({} bytes)",
                crate::MAX_PULL_BYTES
            )));
        }
        let mut hasher = crate::Hasher::for_digest(digest, "a blob")?;
        let r = self
            .get(&self.reference.url(&format!("blobs/{digest}")), None)
            .await?;
        let mut file = tokio::fs::File::create(dest).await?;
        let mut got = 0u64;
        let mut body = r.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| net("download a blob", e))?;
            got += chunk.len() as u64;
            if got > size {
                return Err(OciError::Size {
                    what: format!("blob {digest}"),
                    expected: size,
                    actual: got,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        if got != size {
            return Err(OciError::Size {
                what: format!("blob {digest}"),
                expected: size,
                actual: got,
            });
        }
        hasher.verify(digest, format!("blob {digest}"))?;
        *budget -= size;
        Ok(())
    }
}

async fn read_bounded(r: reqwest::Response, max: usize) -> Result<Vec<u8>, OciError> {
    let mut out = Vec::new();
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| net("read a manifest", e))?;
        if out.len() + chunk.len() > max {
            return Err(OciError::Unsupported(format!(
                "a manifest larger than {max} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Where a registry may send the client (blobs are often served by a CDN): at most 5
/// hops, never from HTTPS to HTTP, and — unless the registry itself is on loopback —
/// never to a loopback, private, link-local or unspecified address named literally.
/// (reqwest drops `Authorization` on a redirect to another host.)
fn redirects(loopback_registry: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 5 {
            return attempt.error("more than 5 redirects");
        }
        let downgrade = attempt.url().scheme() != "https"
            && attempt.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            return attempt.error("a redirect from HTTPS to HTTP");
        }
        let inner = match attempt.url().host() {
            Some(url::Host::Ipv4(ip)) => {
                ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
            }
            Some(url::Host::Ipv6(ip)) => {
                ip.is_loopback()
                    || ip.is_unspecified()
                    || (ip.segments()[0] & 0xfe00) == 0xfc00
                    || (ip.segments()[0] & 0xffc0) == 0xfe80
            }
            Some(url::Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
            None => true,
        };
        if inner && !loopback_registry {
            return attempt.error("a redirect to a loopback, private or link-local address");
        }
        attempt.follow()
    })
}

#[derive(serde::Deserialize)]
struct Desc {
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

#[derive(serde::Deserialize)]
struct Listing {
    #[serde(default)]
    manifests: Vec<Desc>,
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Vec<Desc>,
}

/// Pulls `reference` into a new OCI image layout at `dir` (which must not exist); the
/// layout's one image is named by the reference as given.
pub async fn pull(
    reference: &str,
    credentials: Option<&Credentials>,
    dir: &Path,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<PathBuf, OciError> {
    let parsed = Reference::parse(reference)?;
    let loopback = parsed.scheme() == "http";
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        // (A registry that stops sending fails the pull rather than holding it.)
        .read_timeout(std::time::Duration::from_secs(60))
        .https_only(!loopback)
        .redirect(redirects(loopback))
        .build()
        .map_err(|e| net("make an HTTP client", e))?;
    let mut s = Session {
        http,
        reference: &parsed,
        credentials,
        authorization: None,
    };
    progress(&format!("pulling {parsed}"));
    let first = parsed
        .digest
        .clone()
        .or(parsed.tag.clone())
        .unwrap_or_default();
    let (mut bytes, mut digest, mut media) = s.manifest(&first, parsed.digest.as_deref()).await?;
    // An index: the host's platform.
    if INDEX_TYPES.contains(&media.as_str()) {
        let list: Listing =
            serde_json::from_slice(&bytes).map_err(|e| crate::invalid("the index", e))?;
        let arch = crate::host_arch();
        let pick = list
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .ok_or_else(|| OciError::Unsupported(format!("{parsed} has no linux/{arch} image")))?;
        let d = pick.digest.clone();
        (bytes, digest, media) = s.manifest(&d, Some(&d)).await?;
        if bytes.len() as u64 != pick.size {
            return Err(OciError::Size {
                what: "the manifest".into(),
                expected: pick.size,
                actual: bytes.len() as u64,
            });
        }
    }
    if INDEX_TYPES.contains(&media.as_str()) {
        return Err(crate::invalid("the manifest", "an index inside an index"));
    }
    let manifest: Listing =
        serde_json::from_slice(&bytes).map_err(|e| crate::invalid("the manifest", e))?;
    let config = manifest
        .config
        .as_ref()
        .ok_or_else(|| crate::invalid("the manifest", "no config"))?;
    let blobs = dir.join("blobs");
    tokio::fs::create_dir_all(&blobs).await?;
    let path_of = |d: &str| -> Result<PathBuf, OciError> {
        crate::Hasher::for_digest(d, "a blob")?;
        let (alg, hex) = d.split_once(':').unwrap_or(("", ""));
        Ok(blobs.join(alg).join(hex))
    };
    for alg in ["sha256", "sha512"] {
        tokio::fs::create_dir_all(blobs.join(alg)).await?;
    }
    let mut budget = crate::MAX_PULL_BYTES;
    tokio::fs::write(path_of(&digest)?, &bytes).await?;
    s.blob(
        &config.digest,
        config.size,
        &path_of(&config.digest)?,
        &mut budget,
    )
    .await?;
    for (i, l) in manifest.layers.iter().enumerate() {
        progress(&format!(
            "layer {}/{}: {} ({} bytes)",
            i + 1,
            manifest.layers.len(),
            l.digest,
            l.size
        ));
        let dest = path_of(&l.digest)?;
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            continue;
        }
        s.blob(&l.digest, l.size, &dest, &mut budget).await?;
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": if media.is_empty() { "application/vnd.oci.image.manifest.v1+json" } else { media.as_str() },
            "digest": digest,
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": reference},
        }],
    });
    tokio::fs::write(dir.join("index.json"), index.to_string()).await?;
    tokio::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).await?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_does() {
        let r = Reference::parse("python").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            (DOCKER_HUB, "library/python", Some("latest"))
        );
        let r = Reference::parse("python:3.11-slim").unwrap();
        assert_eq!(r.tag.as_deref(), Some("3.11-slim"));
        let r = Reference::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/app", Some("v1"))
        );
        assert_eq!(r.scheme(), "http");
        let r = Reference::parse("ghcr.io/org/img@sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824").unwrap();
        assert_eq!((r.tag.as_deref(), r.scheme()), (None, "https"));
        assert!(r.digest.is_some());
        let r = Reference::parse("localhost:5000/app").unwrap();
        assert_eq!((r.host.as_str(), r.scheme()), ("localhost:5000", "http"));
        for bad in [
            "",
            "UPPER/case",
            "a b",
            "x@md5:00",
            "app:",
            "host.io/../x",
            "app:bad/tag",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        assert!(
            looks_like_image("python:3.11")
                && looks_like_image("ghcr.io/x/y")
                && !looks_like_image("python")
        );
    }

    #[test]
    fn challenges_are_read() {
        let p = challenge_params(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/python:pull");
    }
}
