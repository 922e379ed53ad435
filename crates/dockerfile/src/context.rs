//! A build context: the files a Dockerfile's `COPY` takes, sent as a tar. Read here
//! (never extracted on the host: the build sandbox extracts it) into an index of its
//! paths and a normalized tar whose member names are plain relative paths, so that a
//! `COPY` step can name its members exactly.

use std::collections::BTreeSet;

/// Where, inside the build sandbox, the normalized context is put for the build.
pub use forkbox_types::api::BUILD_CONTEXT_TAR as CONTEXT_TAR;

/// Most entries a context may hold.
pub const MAX_ENTRIES: usize = 10_000;

/// A context that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("build context: {0}")]
pub struct ContextError(pub String);

/// A build context, read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Regular files and symbolic links, by relative path.
    pub files: BTreeSet<String>,
    /// Directories (those named in the tar and every file's parents); `""` is the root.
    pub dirs: BTreeSet<String>,
    /// The tar again: the same entries under their normalized names (no `./`, no
    /// trailing `/`), regular files, directories and symbolic links only.
    pub tar: Vec<u8>,
    /// Per entry: a digest of its kind, mode and content (or link target).
    digests: std::collections::BTreeMap<String, [u8; 32]>,
    /// Regular files that are tar archives (plain, gzip, bzip2, xz or zstd, by their
    /// first bytes): what an `ADD` unpacks.
    archives: BTreeSet<String>,
}

/// Whether `data` starts like a (possibly compressed) tar archive.
fn is_archive(data: &[u8]) -> bool {
    data.starts_with(&[0x1f, 0x8b])
        || data.starts_with(b"BZh")
        || data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0])
        || data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || data.get(257..262) == Some(b"ustar")
}

impl Context {
    /// Reads the tar `bytes`. Absolute names, `..`, hard links, devices and more than
    /// [`MAX_ENTRIES`] entries are refused.
    pub fn read(bytes: &[u8]) -> Result<Context, ContextError> {
        let bad = |m: String| ContextError(m);
        let mut archive = tar::Archive::new(bytes);
        let mut out = tar::Builder::new(Vec::new());
        out.mode(tar::HeaderMode::Deterministic);
        let mut ctx = Context::default();
        ctx.dirs.insert(String::new());
        let entries = archive
            .entries()
            .map_err(|e| bad(format!("not a tar: {e}")))?;
        for (n, entry) in entries.enumerate() {
            if n >= MAX_ENTRIES {
                return Err(bad(format!("more than {MAX_ENTRIES} entries")));
            }
            let mut entry = entry.map_err(|e| bad(format!("not a tar: {e}")))?;
            let raw = entry
                .path()
                .map_err(|e| bad(format!("bad entry name: {e}")))?
                .to_string_lossy()
                .into_owned();
            let name =
                normalize(&raw).ok_or_else(|| bad(format!("entry {raw:?} leaves the context")))?;
            let kind = entry.header().entry_type();
            // A fresh header for every entry written (never the sender's: its size or
            // type could say something else to the sandbox's tar than to us).
            let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
            let fresh = |t: tar::EntryType, size: u64| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(t);
                h.set_mode(mode);
                h.set_size(size);
                h.set_mtime(0);
                h.set_uid(0);
                h.set_gid(0);
                h
            };
            match kind {
                tar::EntryType::Directory => {
                    if name.is_empty() {
                        continue;
                    }
                    add_parents(&mut ctx.dirs, &name);
                    ctx.dirs.insert(name.clone());
                    ctx.digests.insert(name.clone(), digest(b"d", mode, &[]));
                    let mut h = fresh(tar::EntryType::Directory, 0);
                    out.append_data(&mut h, &name, std::io::empty())
                        .map_err(|e| bad(e.to_string()))?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    if name.is_empty() {
                        return Err(bad("a file with no name".into()));
                    }
                    add_parents(&mut ctx.dirs, &name);
                    ctx.files.insert(name.clone());
                    let mut data = Vec::new();
                    std::io::Read::read_to_end(&mut entry, &mut data)
                        .map_err(|e| bad(format!("entry {raw:?}: {e}")))?;
                    ctx.digests.insert(name.clone(), digest(b"f", mode, &data));
                    if is_archive(&data) {
                        ctx.archives.insert(name.clone());
                    }
                    let mut h = fresh(tar::EntryType::Regular, data.len() as u64);
                    out.append_data(&mut h, &name, data.as_slice())
                        .map_err(|e| bad(e.to_string()))?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(|e| bad(e.to_string()))?
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    add_parents(&mut ctx.dirs, &name);
                    ctx.files.insert(name.clone());
                    ctx.digests
                        .insert(name.clone(), digest(b"l", 0, target.as_bytes()));
                    let mut h = fresh(tar::EntryType::Symlink, 0);
                    out.append_link(&mut h, &name, &target)
                        .map_err(|e| bad(e.to_string()))?;
                }
                // pax and GNU long-name headers are read by the iterator itself.
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
                other => {
                    return Err(bad(format!(
                        "entry {raw:?} is a {other:?}: only files, directories and symbolic links"
                    )))
                }
            }
        }
        ctx.tar = out.into_inner().map_err(|e| bad(e.to_string()))?;
        Ok(ctx)
    }

    /// A `COPY` source as a path of the context: `Ok(Some(path))`, `Ok(None)` for the
    /// whole context (`.`), or why not.
    pub(crate) fn source(&self, src: &str) -> Result<Option<String>, String> {
        if src.contains(['*', '?', '[']) {
            return Err(format!("COPY {src}: patterns are not supported yet"));
        }
        if src.contains("://") {
            return Err(format!("COPY {src}: URLs are not supported"));
        }
        let path = normalize(src).ok_or_else(|| format!("COPY {src}: leaves the build context"))?;
        if path.is_empty() {
            return Ok(None);
        }
        if self.files.contains(&path) || self.dirs.contains(&path) {
            Ok(Some(path))
        } else {
            Err(format!("COPY {src}: not in the build context"))
        }
    }

    pub(crate) fn is_dir(&self, path: &str) -> bool {
        self.dirs.contains(path)
    }

    pub(crate) fn is_archive(&self, path: &str) -> bool {
        self.archives.contains(path)
    }

    /// A digest of what a `COPY` of `sources` takes (their names, kinds, modes and
    /// contents, whatever else the context holds), hex: a build step's cache key
    /// changes with the files it copies only.
    pub(crate) fn digest_of(&self, sources: &[Option<String>]) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for (name, d) in &self.digests {
            let taken = sources.iter().any(|s| match s {
                None => true,
                Some(p) => {
                    name == p
                        || name
                            .strip_prefix(p.as_str())
                            .is_some_and(|r| r.starts_with('/'))
                }
            });
            if taken {
                h.update(name.as_bytes());
                h.update(b"\0");
                h.update(d);
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn digest(kind: &[u8], mode: u32, data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(kind);
    h.update(mode.to_le_bytes());
    h.update(data);
    h.finalize().into()
}

/// `./a//b/` → `a/b`; `.`/`` → ``; `None` if it is absolute or climbs out with `..`.
fn normalize(p: &str) -> Option<String> {
    let p = p.trim_start_matches("./");
    if p.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn add_parents(dirs: &mut BTreeSet<String>, path: &str) {
    let mut p = path;
    while let Some((parent, _)) = p.rsplit_once('/') {
        dirs.insert(parent.to_owned());
        p = parent;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, name, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, name, std::io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_context_is_indexed_and_normalized() {
        let t = tar_of(&[
            ("./", None),
            ("./app.py", Some(b"print(1)")),
            ("./lib/", None),
            ("./lib/util/x.py", Some(b"x = 1")),
        ]);
        let c = Context::read(&t).unwrap();
        assert_eq!(
            c.files,
            BTreeSet::from(["app.py".to_owned(), "lib/util/x.py".to_owned()])
        );
        assert!(c.is_dir("lib") && c.is_dir("lib/util") && c.is_dir(""));
        let again = Context::read(&c.tar).unwrap();
        assert_eq!(again.files, c.files);
        let mut names: Vec<String> = tar::Archive::new(&c.tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["app.py", "lib", "lib/util/x.py"]);
        assert_eq!(c.source("./lib/").unwrap().as_deref(), Some("lib"));
        assert_eq!(c.source(".").unwrap(), None);
        assert!(c
            .source("nope.py")
            .unwrap_err()
            .contains("not in the build context"));
        assert!(c.source("*.py").unwrap_err().contains("patterns"));
        assert!(c.source("../etc/passwd").unwrap_err().contains("leaves"));
    }

    #[test]
    fn contexts_that_leave_themselves_are_refused() {
        // The tar crate refuses to write such names; a raw header says them anyway.
        for name in ["../x", "/etc/passwd", "a/../../x"] {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o644);
            h.set_cksum();
            let mut raw = h.as_bytes().to_vec();
            raw.extend_from_slice(&[0u8; 1024]);
            let e = Context::read(&raw).unwrap_err();
            assert!(e.0.contains("leaves the context"), "{name}: {e}");
        }
        assert!(Context::read(b"definitely not a tar archive").is_err());
    }
}
