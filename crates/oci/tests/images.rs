//! Images made by standard tools from Debian (umoci for an OCI layout, skopeo for a
//! `docker save` archive of it), offline, from a small root filesystem (busybox), read
//! and unpacked: files, whiteouts, configuration, and a tampered layer refused.

#![allow(clippy::unwrap_used)]

use forkbox_oci::{Archive, OciError};
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/deps.sh installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test image (scripts/test-oci-image.sh): its OCI archive and `docker save` tar.
fn make_image(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-oci-image.sh");
    run(Command::new("bash").arg(script).arg(dir));
    (dir.join("image.tar"), dir.join("docker.tar"))
}

#[test]
fn umoci_and_docker_archives_unpack_with_whiteouts_and_configuration() {
    if !nix::unistd::getuid().is_root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (oci, docker) = make_image(t.path());
    for (archive, digest_prefix) in [(&oci, "sha256:"), (&docker, "sha256:")] {
        let a = Archive::open(archive).unwrap();
        let img = a.image(None).unwrap();
        assert!(img.info.digest.starts_with(digest_prefix));
        assert_eq!(img.env["GREETING"], "hello from the image");
        assert_eq!(img.workdir.as_deref(), Some("/app"));
        assert_eq!(img.info.user.as_deref(), Some("1000"));
        assert_eq!(img.info.cmd, ["/bin/sh"]);
        a.verify_layers(&img, &|_| {}).unwrap();
        let root = t.path().join(format!(
            "root-{}",
            archive.file_name().unwrap().to_string_lossy()
        ));
        std::fs::create_dir(&root).unwrap();
        let base = 200_000;
        let done = a.unpack(&img, &root, base, &|l| eprintln!("{l}")).unwrap();
        assert!(done.whiteouts >= 1, "{done:?}");
        assert_eq!(
            std::fs::read_to_string(root.join("app/keep.txt")).unwrap(),
            "kept\n"
        );
        assert!(!root.join("app/gone.txt").exists());
        use std::os::unix::fs::MetadataExt as _;
        let md = std::fs::metadata(root.join("app/keep.txt")).unwrap();
        assert_eq!((md.uid(), md.gid()), (base + 1000, base + 1000));
        assert_eq!(
            std::fs::metadata(root.join("bin/busybox")).unwrap().uid(),
            base
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        // Named: by its name in the archive; another name is refused with the list.
        assert!(a.image(Some("app")).is_ok());
        let e = a.image(Some("nope")).err().unwrap();
        assert!(matches!(e, OciError::NoSuchImage { .. }), "{e}");
        assert!(e.to_string().contains("app"), "{e}");
    }

    // A layer changed after the fact: its digest no longer matches; refused before
    // anything is unpacked.
    let layout = t.path().join("layout");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| layout.join("blobs").join(d.replacen(':', "/", 1));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layer = blob(manifest["layers"][1]["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&layer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::remove_file(&layer).unwrap();
    std::fs::write(&layer, bytes).unwrap();
    let tampered = t.path().join("tampered.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tampered)
        .arg("."));
    let a = Archive::open(&tampered).unwrap();
    let img = a.image(None).unwrap();
    let e = a.verify_layers(&img, &|_| {}).unwrap_err();
    assert!(matches!(e, OciError::Digest { .. }), "{e}");
    assert!(e.to_string().contains("layer 2: digest mismatch"), "{e}");
}
