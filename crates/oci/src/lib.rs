//! OCI images for forkbox templates: an image archive — an OCI image layout in a tar
//! (`oci-archive`, `skopeo copy … oci-archive:`) or a `docker save` tar — read without
//! unpacking it, the image chosen by its name, every blob checked against its digest
//! before use (manifest, configuration, each compressed layer before it is applied,
//! each layer's uncompressed content against the configuration's `diff_ids` while it
//! is), and its layers applied beneath a directory ([`unpack`]).

#[cfg(feature = "registry")]
pub mod registry;
mod tarwalk;
pub mod unpack;

use forkbox_types::api::ImageInfo;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Most bytes a registry pull downloads (configuration and layers).
pub const MAX_PULL_BYTES: u64 = 8 << 30;
/// Largest manifest, index or configuration read.
const MAX_JSON: u64 = 4 << 20;
/// Most entries in an archive (blobs and layout files).
const MAX_ARCHIVE_ENTRIES: usize = 100_000;
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("read the archive: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an image archive: {0}")]
    NotAnImage(String),
    #[error("{what} is not valid: {why}")]
    Invalid { what: String, why: String },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: {actual} bytes, its descriptor says {expected}")]
    Size {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("the archive has no image {reference:?} (it has: {available})")]
    NoSuchImage {
        reference: String,
        available: String,
    },
    #[error("the archive has {count} images ({available}): name one")]
    Ambiguous { count: usize, available: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("layer {index}: {source}")]
    Layer {
        index: usize,
        source: unpack::UnpackError,
    },
}

fn invalid(what: impl Into<String>, why: impl std::fmt::Display) -> OciError {
    OciError::Invalid {
        what: what.into(),
        why: why.to_string(),
    }
}

/// A digest algorithm and its running state.
enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// For a digest `alg:hex` (sha256 and sha512, the OCI's registered ones).
    fn for_digest(digest: &str, what: &str) -> Result<Hasher, OciError> {
        let (alg, hex) = digest
            .split_once(':')
            .ok_or_else(|| invalid(what, format!("digest {digest:?} has no algorithm")))?;
        let (h, len) = match alg {
            "sha256" => (Hasher::Sha256(sha2::Sha256::new()), 64),
            "sha512" => (Hasher::Sha512(sha2::Sha512::new()), 128),
            other => {
                return Err(OciError::Unsupported(format!(
                    "{what}: digest algorithm {other:?} (sha256 and sha512 are)"
                )))
            }
        };
        if hex.len() != len
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid(what, format!("digest {digest:?} is malformed")));
        }
        Ok(h)
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }

    /// The digest of what passed, compared with `expected` (`what` names it in the error).
    fn verify(self, expected: &str, what: impl Into<String>) -> Result<(), OciError> {
        let actual = self.finish();
        if actual != expected {
            return Err(OciError::Digest {
                what: what.into(),
                expected: expected.to_owned(),
                actual,
            });
        }
        Ok(())
    }

    fn finish(self) -> String {
        let (alg, bytes) = match self {
            Hasher::Sha256(h) => ("sha256", h.finalize().to_vec()),
            Hasher::Sha512(h) => ("sha512", h.finalize().to_vec()),
        };
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("{alg}:{hex}")
    }
}

/// A reader that digests what passes through it.
struct Digesting<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: Read> Digesting<R> {
    /// `inner`, digested by the algorithm of `digest`.
    fn new(inner: R, digest: &str, what: &str) -> Result<Self, OciError> {
        Ok(Digesting {
            inner,
            hasher: Hasher::for_digest(digest, what)?,
            count: 0,
        })
    }

    /// Reads the rest and checks it against `digest`: the bytes read.
    fn drain_verified(mut self, digest: &str, what: impl Into<String>) -> Result<u64, OciError> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        self.hasher.verify(digest, what)?;
        Ok(self.count)
    }
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A file's bytes inside the archive.
struct Section {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Section {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end - self.pos;
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// An image archive: where each of its files lies in it.
pub struct Archive {
    files: Files,
}

enum Files {
    /// A tar: where each file's bytes lie (offset, size).
    Tar {
        file: Arc<File>,
        map: HashMap<String, (u64, u64)>,
    },
    /// An OCI image layout directory ([`registry::pull`]'s).
    Dir(std::path::PathBuf),
}

/// A layer of the chosen image.
#[derive(Debug, Clone)]
struct Layer {
    /// Its file in the archive.
    name: String,
    /// Its (compressed) digest and size, when the archive says (OCI layouts).
    digest: Option<(String, u64)>,
    /// Its uncompressed digest, from the configuration.
    diff_id: Option<String>,
}

/// The image chosen in an archive, its manifest and configuration verified.
pub struct Image {
    pub info: ImageInfo,
    /// `Env` of its configuration (names that are not valid environment names left out).
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    layers: Vec<Layer>,
}

/// A name inside the archive as written, without `./` and leading `/`.
fn clean(name: &str) -> String {
    let mut n = name;
    loop {
        if let Some(r) = n.strip_prefix("./") {
            n = r;
        } else if let Some(r) = n.strip_prefix('/') {
            n = r;
        } else {
            return n.to_owned();
        }
    }
}

fn blob_name(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// The host's architecture as OCI names it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The one of `items` (an index's manifests, `docker save`'s entries) whose `names`
/// include `reference` (or the only one): none or several is an error listing the names.
fn pick<'a, T>(
    items: &'a [T],
    names: impl Fn(&T) -> Vec<String>,
    reference: Option<&str>,
    listing: &str,
) -> Result<&'a T, OciError> {
    let available = || {
        let n: Vec<String> = items.iter().flat_map(&names).collect();
        if n.is_empty() {
            "no names".to_owned()
        } else {
            n.join(", ")
        }
    };
    let chosen: Vec<&T> = match reference {
        Some(r) => items
            .iter()
            .filter(|i| names(i).iter().any(|n| same_name(n, r)))
            .collect(),
        None => items.iter().collect(),
    };
    match chosen.as_slice() {
        [one] => Ok(one),
        [] => match reference {
            Some(r) => Err(OciError::NoSuchImage {
                reference: r.to_owned(),
                available: available(),
            }),
            None => Err(OciError::NotAnImage(format!("{listing} lists no image"))),
        },
        many => Err(OciError::Ambiguous {
            count: many.len(),
            available: available(),
        }),
    }
}

/// Whether an image named `name` in an archive is the one asked for as `asked`: the
/// same name, the same once Docker's defaults are spelled out (`app` =
/// `docker.io/library/app:latest`), or its tag alone.
fn same_name(name: &str, asked: &str) -> bool {
    fn full(n: &str) -> String {
        let n = n
            .strip_prefix("docker.io/library/")
            .or_else(|| n.strip_prefix("docker.io/"))
            .unwrap_or(n);
        let last = n.rsplit('/').next().unwrap_or(n);
        if last.contains(':') || last.contains('@') {
            n.to_owned()
        } else {
            format!("{n}:latest")
        }
    }
    name == asked
        || full(name) == full(asked)
        || name.rsplit_once(':').is_some_and(|(_, tag)| tag == asked)
}

fn valid_env_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

/// `docker save`'s `manifest.json` entries.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Archive {
    /// Reads where the files of the tar at `path` are (headers only).
    pub fn open(path: &Path) -> Result<Archive, OciError> {
        let file = Arc::new(File::open(path)?);
        let mut files = HashMap::new();
        // Symlinks and hard links to files in the archive (`docker save` links
        // repeated layers), resolved after.
        let mut links: Vec<(String, String)> = Vec::new();
        tarwalk::walk(&*file, |meta, entry| -> Result<(), OciError> {
            if files.len() + links.len() >= MAX_ARCHIVE_ENTRIES {
                return Err(OciError::NotAnImage(format!(
                    "more than {MAX_ARCHIVE_ENTRIES} files"
                )));
            }
            let name = clean(&meta.path.to_string_lossy());
            let kind = entry.header().entry_type();
            if kind.is_file() {
                files.insert(name, (entry.raw_file_position(), entry.size()));
            } else if kind.is_symlink() || kind.is_hard_link() {
                if let Some(target) = meta.link {
                    let t = target.to_string_lossy().into_owned();
                    let t = if kind.is_symlink() && !t.starts_with('/') {
                        // Relative to the link's directory.
                        let dir = Path::new(&name).parent().unwrap_or(Path::new(""));
                        normalize(&dir.join(&t).to_string_lossy())
                    } else {
                        clean(&t)
                    };
                    links.push((name, t));
                }
            }
            Ok(())
        })?;
        for (name, target) in links {
            if let Some(at) = files.get(&target).copied() {
                files.insert(name, at);
            }
        }
        Ok(Archive {
            files: Files::Tar { file, map: files },
        })
    }

    /// An OCI image layout directory (as [`registry::pull`] writes one).
    pub fn open_dir(dir: &Path) -> Archive {
        Archive {
            files: Files::Dir(dir.to_path_buf()),
        }
    }

    fn has(&self, name: &str) -> bool {
        match &self.files {
            Files::Tar { map, .. } => map.contains_key(name),
            Files::Dir(d) => {
                !name.split('/').any(|c| c == ".." || c.is_empty()) && d.join(name).is_file()
            }
        }
    }

    /// A file of the archive: its bytes and size.
    fn section(&self, name: &str) -> Option<(Box<dyn Read + Send>, u64)> {
        match &self.files {
            Files::Tar { file, map } => {
                let &(pos, size) = map.get(name)?;
                Some((
                    Box::new(Section {
                        file: file.clone(),
                        pos,
                        end: pos + size,
                    }),
                    size,
                ))
            }
            Files::Dir(d) => {
                use std::os::unix::fs::OpenOptionsExt as _;
                if name.split('/').any(|c| c == ".." || c.is_empty()) {
                    return None;
                }
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(d.join(name))
                    .ok()?;
                let size = f.metadata().ok()?.len();
                Some((Box::new(f), size))
            }
        }
    }

    /// A small file of the archive (JSON), whole.
    fn small(&self, name: &str, what: &str) -> Result<Vec<u8>, OciError> {
        let (s, size) = self
            .section(name)
            .ok_or_else(|| OciError::NotAnImage(format!("{what} ({name}) is missing")))?;
        if size > MAX_JSON {
            return Err(invalid(what, format!("larger than {MAX_JSON} bytes")));
        }
        let mut out = Vec::new();
        s.take(MAX_JSON).read_to_end(&mut out)?;
        Ok(out)
    }

    /// The blob a descriptor names, whole, checked against its digest and size.
    fn blob(&self, d: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
        let digest = d.digest().to_string();
        let bytes = self.small(&blob_name(&digest), what)?;
        check(what, &digest, d.size(), &bytes)?;
        Ok(bytes)
    }

    /// The image named `reference` (or the only one).
    pub fn image(&self, reference: Option<&str>) -> Result<Image, OciError> {
        if self.has("index.json") {
            self.oci_image(reference)
        } else if self.has("manifest.json") {
            self.docker_image(reference)
        } else {
            Err(OciError::NotAnImage(
                "it has neither index.json (an OCI layout) nor manifest.json (docker save)".into(),
            ))
        }
    }

    fn oci_image(&self, reference: Option<&str>) -> Result<Image, OciError> {
        let index = ImageIndex::from_reader(&self.small("index.json", "index.json")?[..])
            .map_err(|e| invalid("index.json", e))?;
        let names = |d: &Descriptor| -> Vec<String> {
            let a = d.annotations().clone().unwrap_or_default();
            [REF_NAME, CONTAINERD_NAME]
                .iter()
                .filter_map(|k| a.get(*k).cloned())
                .collect()
        };
        let desc = pick(index.manifests(), names, reference, "index.json")?.clone();
        let reference = names(&desc)
            .into_iter()
            .next()
            .or(reference.map(str::to_owned));
        // An index for several platforms: the host's.
        let mut desc = desc;
        for depth in 0.. {
            if depth > 4 {
                return Err(invalid("index.json", "indexes nested too deep"));
            }
            if *desc.media_type() != MediaType::ImageIndex {
                break;
            }
            let bytes = self.blob(&desc, "a nested index")?;
            let inner =
                ImageIndex::from_reader(&bytes[..]).map_err(|e| invalid("a nested index", e))?;
            let pick = inner
                .manifests()
                .iter()
                .find(|m| {
                    m.platform().as_ref().is_some_and(|p| {
                        p.os().to_string() == "linux" && p.architecture().to_string() == host_arch()
                    })
                })
                .or_else(|| (inner.manifests().len() == 1).then(|| &inner.manifests()[0]))
                .cloned()
                .ok_or_else(|| {
                    OciError::Unsupported(format!(
                        "the image has no linux/{} manifest",
                        host_arch()
                    ))
                })?;
            desc = pick;
        }
        let digest = desc.digest().to_string();
        let manifest = ImageManifest::from_reader(&self.blob(&desc, "the manifest")?[..])
            .map_err(|e| invalid("the manifest", e))?;
        let config = ImageConfiguration::from_reader(
            &self.blob(manifest.config(), "the configuration")?[..],
        )
        .map_err(|e| invalid("the configuration", e))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(invalid(
                "the configuration",
                format!(
                    "{} diff_ids for {} layers",
                    diff_ids.len(),
                    manifest.layers().len()
                ),
            ));
        }
        let layers = manifest
            .layers()
            .iter()
            .zip(diff_ids)
            .map(|(l, diff)| Layer {
                name: blob_name(l.digest().as_ref()),
                digest: Some((l.digest().to_string(), l.size())),
                diff_id: Some(diff.clone()),
            })
            .collect();
        Ok(image_of(digest, reference, &config, layers))
    }

    fn docker_image(&self, reference: Option<&str>) -> Result<Image, OciError> {
        let entries: Vec<DockerEntry> =
            serde_json::from_slice(&self.small("manifest.json", "manifest.json")?)
                .map_err(|e| invalid("manifest.json", e))?;
        let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
        let entry = pick(&entries, tags, reference, "manifest.json")?;
        // The configuration's name is its digest (`<hex>.json` or `blobs/sha256/<hex>`).
        let config_name = clean(&entry.config);
        let hex = Path::new(&config_name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let digest = format!("sha256:{hex}");
        let bytes = self.small(&config_name, "the configuration")?;
        check("the configuration", &digest, bytes.len() as u64, &bytes)?;
        let config = ImageConfiguration::from_reader(&bytes[..])
            .map_err(|e| invalid("the configuration", e))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != entry.layers.len() {
            return Err(invalid(
                "the configuration",
                format!(
                    "{} diff_ids for {} layers",
                    diff_ids.len(),
                    entry.layers.len()
                ),
            ));
        }
        let layers = entry
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(name, diff)| Layer {
                name: clean(name),
                digest: None,
                diff_id: Some(diff.clone()),
            })
            .collect();
        let reference = tags(entry)
            .into_iter()
            .next()
            .or(reference.map(str::to_owned));
        Ok(image_of(digest, reference, &config, layers))
    }

    /// Checks each layer's compressed bytes against its digest and size (before any is
    /// applied: a tampered layer is never unpacked).
    pub fn verify_layers(&self, image: &Image, progress: &dyn Fn(&str)) -> Result<(), OciError> {
        for (i, l) in image.layers.iter().enumerate() {
            let what = format!("layer {}", i + 1);
            let (s, _) = self
                .section(&l.name)
                .ok_or_else(|| OciError::NotAnImage(format!("{what} ({}) is missing", l.name)))?;
            let Some((digest, size)) = &l.digest else {
                // (A `docker save` layer has only its uncompressed digest: checked
                // here too, before any layer is applied.)
                if let Some(diff) = &l.diff_id {
                    let n = Digesting::new(decompressed(s, &what)?, diff, &what)?
                        .drain_verified(diff, format!("{what} (uncompressed)"))?;
                    progress(&format!("{what}: {n} bytes, digest {diff} verified"));
                }
                continue;
            };
            let n = Digesting::new(s, digest, &what)?.drain_verified(digest, &what)?;
            if n != *size {
                return Err(OciError::Size {
                    what,
                    expected: *size,
                    actual: n,
                });
            }
            progress(&format!("{what}: {size} bytes, digest {digest} verified"));
        }
        Ok(())
    }

    /// Applies the image's layers, in order, beneath `root` (owners shifted by
    /// `id_base`); each layer's uncompressed content is checked against its `diff_id`.
    /// Call [`Self::verify_layers`] first.
    pub fn unpack(
        &self,
        image: &Image,
        root: &Path,
        id_base: u32,
        progress: &dyn Fn(&str),
    ) -> Result<unpack::Unpacked, OciError> {
        let target = unpack::Target::open(root, id_base)
            .map_err(|source| OciError::Layer { index: 0, source })?;
        let mut done = unpack::Unpacked::default();
        for (i, l) in image.layers.iter().enumerate() {
            let what = format!("layer {}", i + 1);
            let (s, _) = self
                .section(&l.name)
                .ok_or_else(|| OciError::NotAnImage(format!("{what} ({}) is missing", l.name)))?;
            let plain = decompressed(s, &what)?;
            let mut r = Digesting {
                inner: plain,
                hasher: match &l.diff_id {
                    Some(d) => Hasher::for_digest(d, &what)?,
                    None => Hasher::Sha256(sha2::Sha256::new()),
                },
                count: 0,
            };
            let before = done.clone();
            target
                .apply(&mut r, &mut done)
                .map_err(|source| OciError::Layer {
                    index: i + 1,
                    source,
                })?;
            // What follows the tar's end (padding) is part of the digest too; a little.
            let trailing =
                std::io::copy(&mut (&mut r).take(MAX_TRAILING + 1), &mut std::io::sink())?;
            if trailing > MAX_TRAILING {
                return Err(invalid(&what, "more than 1 MiB after the end of its tar"));
            }
            if let Some(expected) = &l.diff_id {
                r.hasher
                    .verify(expected, format!("{what} (uncompressed)"))?;
            }
            progress(&format!(
                "{what}: {} entries, {} bytes of files, {} whiteouts applied",
                done.entries - before.entries,
                done.bytes - before.bytes,
                done.whiteouts - before.whiteouts
            ));
        }
        Ok(done)
    }
}

/// Most bytes a layer may have after the end of its tar (padding).
const MAX_TRAILING: u64 = 1 << 20;

/// A layer's bytes decompressed (gzip, zstd, or none: by its first bytes).
fn decompressed(s: Box<dyn Read + Send>, what: &str) -> Result<Box<dyn Read>, OciError> {
    let mut raw = std::io::BufReader::new(s);
    let magic = {
        use std::io::BufRead as _;
        raw.fill_buf()?
            .get(..4)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    };
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(raw))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(raw)
                .map_err(|e| invalid(what, format!("zstd: {e}")))?,
        )
    } else {
        Box::new(raw)
    })
}

/// `a/./b/../c` as `a/c` (names inside the archive; never above its top).
fn normalize(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out.join("/")
}

fn check(what: &str, digest: &str, size: u64, bytes: &[u8]) -> Result<(), OciError> {
    if bytes.len() as u64 != size {
        return Err(OciError::Size {
            what: what.to_owned(),
            expected: size,
            actual: bytes.len() as u64,
        });
    }
    let mut h = Hasher::for_digest(digest, what)?;
    h.update(bytes);
    h.verify(digest, what)
}

fn image_of(
    digest: String,
    reference: Option<String>,
    config: &ImageConfiguration,
    layers: Vec<Layer>,
) -> Image {
    let c = config.config().clone().unwrap_or_default();
    let env = c
        .env()
        .clone()
        .unwrap_or_default()
        .iter()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            valid_env_name(k).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let workdir = c
        .working_dir()
        .clone()
        .filter(|w| w.starts_with('/') && !w.contains('\0'));
    Image {
        info: ImageInfo {
            digest,
            reference,
            user: c.user().clone().filter(|u| !u.is_empty()),
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            labels: c.labels().clone().unwrap_or_default().into_iter().collect(),
            layers: layers.len(),
        },
        env,
        workdir,
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_inside_an_archive_are_cleaned() {
        assert_eq!(clean("./blobs/sha256/ab"), "blobs/sha256/ab");
        assert_eq!(clean("/index.json"), "index.json");
        assert_eq!(normalize("abc/../def/layer.tar"), "def/layer.tar");
        assert_eq!(normalize("../../x"), "x");
        assert_eq!(blob_name("sha256:ab"), "blobs/sha256/ab");
        assert!(same_name("docker.io/library/app:latest", "app"));
        assert!(same_name("docker.io/library/app:latest", "app:latest"));
        assert!(same_name("registry.local:5000/team/app:v1", "v1"));
        assert!(same_name("app", "app"));
        assert!(!same_name("docker.io/library/app:v1", "app"));
        assert!(!same_name("docker.io/library/other:latest", "app"));
    }

    #[test]
    fn digests_are_checked() {
        let d = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        check("x", d, 5, b"hello").unwrap();
        assert!(matches!(
            check("x", d, 5, b"hellO"),
            Err(OciError::Digest { .. })
        ));
        assert!(matches!(
            check("x", d, 6, b"hello"),
            Err(OciError::Size { .. })
        ));
        assert!(matches!(
            check("x", "md5:abc", 5, b"hello"),
            Err(OciError::Unsupported(_))
        ));
        assert!(matches!(
            check("x", "sha256:zz", 5, b"hello"),
            Err(OciError::Invalid { .. })
        ));
        assert!(
            valid_env_name("PATH")
                && valid_env_name("_a1")
                && !valid_env_name("1a")
                && !valid_env_name("a-b")
        );
    }

    #[test]
    fn a_file_that_is_no_image_archive_says_so() {
        let t = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(t.reopen().unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "hello.txt", &b"hi"[..]).unwrap();
        b.finish().unwrap();
        let a = Archive::open(t.path()).unwrap();
        let e = a.image(None).err().unwrap();
        assert!(matches!(e, OciError::NotAnImage(_)), "{e}");
    }
}
