//! Walking a tar's entries with bounded metadata: the `tar` crate reads a GNU long
//! name, long link or pax header whole into memory (a 256 MiB "name" costs 256 MiB), so
//! entries are read raw here and those headers taken at most [`MAX_EXTENSION`] bytes
//! each; pax `path`, `linkpath`, `uid` and `gid` apply to the next entry, a pax `size`
//! (files over 8 GiB) is refused.

use std::io::Read;
use std::path::PathBuf;

/// Largest long-name, long-link or pax header taken.
pub const MAX_EXTENSION: u64 = 64 * 1024;

/// What an entry says about itself, its extensions applied.
#[derive(Debug)]
pub struct Meta {
    pub path: PathBuf,
    pub link: Option<PathBuf>,
    pub uid: u64,
    pub gid: u64,
    /// It carries extended attributes (`SCHILY.xattr.*`), which are not applied.
    pub xattrs: bool,
}

fn bytes_path(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt as _;
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    PathBuf::from(std::ffi::OsStr::from_bytes(&b[..end]))
}

fn too_long(what: &str) -> std::io::Error {
    std::io::Error::other(format!("a {what} longer than {MAX_EXTENSION} bytes"))
}

/// Calls `f` for every entry of the tar `r` but extension headers, with its metadata.
pub fn walk<R: Read, E: From<std::io::Error>>(
    r: R,
    mut f: impl FnMut(Meta, &mut tar::Entry<'_, R>) -> Result<(), E>,
) -> Result<(), E> {
    let mut archive = tar::Archive::new(r);
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    for entry in archive.entries()?.raw(true) {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let ext = match kind {
            tar::EntryType::GNULongName => Some(&mut long_name),
            tar::EntryType::GNULongLink => Some(&mut long_link),
            tar::EntryType::XHeader => Some(&mut pax),
            _ => None,
        };
        if let Some(slot) = ext {
            if entry.size() > MAX_EXTENSION {
                return Err(too_long("long name or pax header").into());
            }
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            *slot = Some(data);
            continue;
        }
        if kind == tar::EntryType::XGlobalHeader {
            if entry.size() > MAX_EXTENSION {
                return Err(too_long("global pax header").into());
            }
            std::io::copy(&mut entry, &mut std::io::sink())?;
            continue;
        }
        let h = entry.header();
        let mut meta = Meta {
            path: bytes_path(&h.path_bytes()),
            link: h.link_name_bytes().map(|b| bytes_path(&b)),
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            xattrs: false,
        };
        if let Some(p) = pax.take() {
            for ext in tar::PaxExtensions::new(&p) {
                let ext = ext?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let number = || -> std::io::Result<u64> {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| std::io::Error::other("a pax number that is not one"))
                };
                match key {
                    b"path" => meta.path = bytes_path(value),
                    b"linkpath" => meta.link = Some(bytes_path(value)),
                    b"uid" => meta.uid = number()?,
                    b"gid" => meta.gid = number()?,
                    b"size" => {
                        return Err(std::io::Error::other(
                            "a pax size (files over 8 GiB) is not supported",
                        )
                        .into())
                    }
                    k if k.starts_with(b"SCHILY.xattr.") => meta.xattrs = true,
                    _ => {}
                }
            }
        }
        if let Some(n) = long_name.take() {
            meta.path = bytes_path(&n);
        }
        if let Some(l) = long_link.take() {
            meta.link = Some(bytes_path(&l));
        }
        f(meta, &mut entry)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_and_pax_apply_and_are_bounded() {
        let mut b = tar::Builder::new(Vec::new());
        let long = "d/".repeat(200) + "file";
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(7);
        b.append_data(&mut h, &long, &b"x"[..]).unwrap();
        b.append_pax_extensions([("path", b"pax/name".as_slice()), ("uid", b"1000")])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_mode(0o644);
        b.append_data(&mut h, "short", &b""[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut seen = Vec::new();
        walk::<_, std::io::Error>(&bytes[..], |m, _| {
            seen.push((m.path, m.uid));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [(PathBuf::from(&long), 7), (PathBuf::from("pax/name"), 1000)]
        );

        // A long name over the bound: refused before it is read.
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(MAX_EXTENSION + 1);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend(std::iter::repeat_n(b'a', (MAX_EXTENSION + 1) as usize));
        raw.resize(raw.len().div_ceil(512) * 512 + 1024, 0);
        let e = walk::<_, std::io::Error>(&raw[..], |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}
