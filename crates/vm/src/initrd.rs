//! The guest's initramfs: busybox, the virtio modules, the init script and the agent in
//! one `newc` cpio archive made once per runtime, plus a tiny archive per VM with its
//! start-up config, concatenated (the kernel unpacks one after the other).

use std::path::Path;

/// Builds a `newc` (SVR4, no CRC) cpio archive in memory.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, S_IFREG | (mode & 0o7777), (0, 0), data);
    }

    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | (mode & 0o7777), (major, minor), &[]);
    }

    /// The archive, ended by its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// Modules the init script loads, in order.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
];

/// The guest init (`/init`).
pub const INIT: &str = include_str!("init.sh");

/// The base archive: `/init`, busybox, the modules found in `assets/modules`, the agent.
pub fn base(assets: &Path, agent: &Path) -> std::io::Result<Vec<u8>> {
    let read = |p: &Path| {
        std::fs::read(p)
            .map_err(|e| std::io::Error::new(e.kind(), format!("read {}: {e}", p.display())))
    };
    let mut c = Cpio::default();
    c.dir("dev");
    c.char_dev("dev/console", 0o600, 5, 1);
    c.dir("bin");
    c.file("bin/busybox", 0o755, &read(&assets.join("busybox"))?);
    c.file("init", 0o755, INIT.as_bytes());
    c.dir("lib");
    c.dir("lib/modules");
    for m in MODULES {
        let p = assets.join("modules").join(format!("{m}.ko"));
        if p.exists() {
            c.file(&format!("lib/modules/{m}.ko"), 0o644, &read(&p)?);
        }
    }
    c.dir("forkbox");
    c.file("forkbox/agent", 0o755, &read(agent)?);
    Ok(c.finish())
}

/// The per-VM archive: `/forkbox/init.json`.
pub fn per_vm(init_json: &[u8]) -> Vec<u8> {
    let mut c = Cpio::default();
    c.file("forkbox/init.json", 0o644, init_json);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("a");
        c.file("a/b", 0o644, b"hello");
        let out = c.finish();
        assert!(out.len().is_multiple_of(4));
        assert!(out.starts_with(b"070701"));
        // header (110) + "a\0" padded to 112
        assert_eq!(&out[112..118], b"070701");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("a/b\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
