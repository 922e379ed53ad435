//! Embeds the web console (`ui/dist`, built by `make ui`) into the binary: its files are
//! copied into OUT_DIR for `include_bytes!` (`src/ui.rs`). Without a build (a bare
//! `cargo build`), a page saying how to make one takes its place.

use std::path::PathBuf;

const FILES: &[(&str, &str)] = &[
    (
        "index.html",
        "<!doctype html><meta charset=utf-8><title>forkbox</title>\
         <p>The web console was not built into this binary: run <code>make ui</code> \
         (or <code>make build</code>) and build forkbox again.",
    ),
    ("app.js", ""),
    ("app.css", ""),
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let dist = manifest.join("../../ui/dist");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("ui");
    if let Err(e) = std::fs::create_dir_all(&out) {
        panic!("create {}: {e}", out.display());
    }
    println!("cargo:rerun-if-changed={}", dist.display());
    for (name, placeholder) in FILES {
        let src = dist.join(name);
        println!("cargo:rerun-if-changed={}", src.display());
        let bytes = std::fs::read(&src).unwrap_or_else(|_| placeholder.as_bytes().to_vec());
        if let Err(e) = std::fs::write(out.join(name), bytes) {
            panic!("write {}: {e}", out.join(name).display());
        }
    }
}
