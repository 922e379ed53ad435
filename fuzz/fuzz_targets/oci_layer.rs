//! The OCI layer unpacker (`forkbox_oci::unpack`, which the server runs as host root on
//! image layers) on arbitrary layers: entries of every kind with names and link targets
//! made of escape attempts (`..`, absolute paths, symlinks climbing out, whiteouts and
//! opaque directories through them, hard links to outside files), applied one layer
//! after another. It never panics, and nothing outside its root changes: the directory
//! holding the root keeps exactly the root and a sibling file, whose content and mode
//! stay as they were.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::PermissionsExt as _;

#[derive(Arbitrary, Debug)]
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Fifo,
    Device,
}

#[derive(Arbitrary, Debug)]
struct Entry {
    kind: Kind,
    /// Indexes into NAMES, joined by `/`.
    path: Vec<u8>,
    target: Vec<u8>,
    mode: u16,
    owner: u8,
    data: Vec<u8>,
}

const NAMES: &[&str] = &[
    "a",
    "b",
    "..",
    ".",
    "",
    "/",
    "sibling",
    "root",
    ".wh.a",
    ".wh..wh..opq",
    ".wh.sibling",
    ".wh.root",
    ".wh..",
    ".wh...",
    ".wh.",
    "etc",
    "/tmp",
    "..%2f",
    "a/../..",
];

fn join(ix: &[u8]) -> String {
    ix.iter()
        .take(8)
        .map(|i| NAMES[*i as usize % NAMES.len()])
        .collect::<Vec<_>>()
        .join("/")
}

fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries.iter().take(64) {
        let mut h = tar::Header::new_gnu();
        let path = join(&e.path);
        let target = join(&e.target);
        let (kind, data): (tar::EntryType, &[u8]) = match e.kind {
            Kind::File => (tar::EntryType::Regular, &e.data),
            Kind::Dir => (tar::EntryType::Directory, &[]),
            Kind::Symlink => (tar::EntryType::Symlink, &[]),
            Kind::HardLink => (tar::EntryType::Link, &[]),
            Kind::Fifo => (tar::EntryType::Fifo, &[]),
            Kind::Device => (tar::EntryType::Char, &[]),
        };
        h.set_entry_type(kind);
        h.set_mode(u32::from(e.mode) & 0o7777);
        // Ids around the limit: 0, 1000, 65535 and 65536 (refused).
        let id = [0u64, 1000, 65535, 65536][usize::from(e.owner % 4)];
        h.set_uid(id);
        h.set_gid(id);
        h.set_size(data.len() as u64);
        // Raw names: the builder would refuse `..` and absolute ones.
        let Some(g) = h.as_gnu_mut() else { continue };
        let n = path.as_bytes();
        if n.len() > g.name.len() || target.len() > g.linkname.len() {
            continue;
        }
        g.name[..n.len()].copy_from_slice(n);
        g.linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        let _ = b.append(&h, data);
    }
    b.into_inner().unwrap_or_default()
}

fuzz_target!(|layers: Vec<Vec<Entry>>| {
    let outer = tempfile::tempdir().expect("a temporary directory");
    let root = outer.path().join("root");
    std::fs::create_dir(&root).expect("the root");
    let sibling = outer.path().join("sibling");
    std::fs::write(&sibling, b"outside").expect("the sibling");
    std::fs::set_permissions(&sibling, std::fs::Permissions::from_mode(0o644)).expect("its mode");
    let base = if nix::unistd::getuid().is_root() {
        100_000
    } else {
        nix::unistd::getuid().as_raw()
    };
    let target = forkbox_oci::unpack::Target::open(&root, base).expect("open the root");
    let mut done = forkbox_oci::unpack::Unpacked::default();
    for l in layers.iter().take(4) {
        let _ = target.apply(&layer(l)[..], &mut done);
    }
    let mut names: Vec<String> = std::fs::read_dir(outer.path())
        .expect("list the outer directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["root", "sibling"],
        "something was made beside the root"
    );
    assert_eq!(std::fs::read(&sibling).expect("the sibling"), b"outside");
    let md = std::fs::symlink_metadata(&sibling).expect("the sibling");
    assert!(
        md.is_file() && md.permissions().mode() & 0o7777 == 0o644,
        "the sibling changed: {md:?}"
    );
    assert!(std::fs::symlink_metadata(&root).expect("the root").is_dir());
});
