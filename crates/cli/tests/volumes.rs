//! End-to-end: volumes — data written by one sandbox is read by another and outlives
//! both; the size limit holds; a mounted volume cannot be deleted.

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, post, Server};
use serde_json::json;

#[tokio::test]
async fn volumes_are_shared_persistent_and_limited() {
    let s = Server::start();
    let (st, v) = post(&s, "/v1/volumes", json!({"name": "shared", "size_mb": 64})).await;
    assert_eq!(st, 201, "{v}");
    let vol = v["id"].as_str().unwrap().to_owned();
    assert!(vol.starts_with("vol-"));
    assert_eq!(
        (v["name"].as_str(), v["size_mb"].as_u64()),
        (Some("shared"), Some(64))
    );

    let a = s
        .create(json!({"volumes": [{"id": vol, "mount": "/data"}]}))
        .await;
    assert_eq!(a["volumes"], json!([{"id": vol, "mount": "/data"}]));
    let a = a["id"].as_str().unwrap().to_owned();
    let b = s
        .create(json!({"volumes": [{"id": vol, "mount": "/mnt/v"}]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, err, code) = s
        .sh(&a, "echo from-a > /data/note && mkdir -p /data/dir")
        .await;
    assert_eq!(code, 0, "{err}");
    // Seen at once by the other sandbox, which can write back.
    let (out, _, _) = s
        .sh(&b, "cat /mnt/v/note; echo from-b > /mnt/v/dir/reply")
        .await;
    assert_eq!(out, "from-a\n");
    let (out, _, _) = s.sh(&a, "cat /data/dir/reply; stat -c %U /data/note").await;
    assert_eq!(out, "from-b\nroot\n");
    // Fork children mount it too.
    let (st, f) = post(&s, &format!("/v1/sandboxes/{a}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{f}");
    let child = f["children"][0].as_str().unwrap().to_owned();
    let (out, _, _) = s.sh(&child, "cat /data/note").await;
    assert_eq!(out, "from-a\n");

    // Mounted: cannot be deleted.
    assert_eq!(s.delete_at(&format!("/v1/volumes/{vol}")).await, 409);
    for id in [&child, &a, &b] {
        assert_eq!(s.delete(id).await, 204);
    }

    // The data outlived both; the size limit holds (ENOSPC inside, image stays small).
    let c = s
        .create(json!({"volumes": [{"id": vol, "mount": "/data"}]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (out, _, _) = s.sh(&c, "cat /data/note /data/dir/reply").await;
    assert_eq!(out, "from-a\nfrom-b\n");
    let (_, err, code) = s
        .sh(
            &c,
            "dd if=/dev/zero of=/data/big bs=1M count=200 status=none",
        )
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("No space left on device"), "{err}");
    let (_, v) = get(&s, &format!("/v1/volumes/{vol}")).await;
    let used = v["used_bytes"].as_u64().unwrap();
    assert!(used > 40 << 20 && used <= 64 << 20, "used {used}");
    let img = s.data.path().join("volumes").join(format!("{vol}.img"));
    use std::os::unix::fs::MetadataExt as _;
    let on_disk = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(on_disk <= 70 << 20, "image takes {on_disk} bytes");
    assert_eq!(s.delete(&c).await, 204);

    // Bad mounts and unknown volumes.
    for (body, want) in [
        (json!({"volumes": [{"id": vol, "mount": "/proc"}]}), 400),
        (json!({"volumes": [{"id": vol, "mount": "data"}]}), 400),
        (
            json!({"volumes": [{"id": vol, "mount": "/a"}, {"id": vol, "mount": "/a/"}]}),
            400,
        ),
        (
            json!({"volumes": [{"id": "vol-0000000000000000", "mount": "/a"}]}),
            404,
        ),
    ] {
        let (st, v) = post(&s, "/v1/sandboxes", body.clone()).await;
        assert_eq!(st, want, "{body}: {v}");
    }
    let (st, _) = post(&s, "/v1/volumes", json!({"name": "tiny", "size_mb": 1})).await;
    assert_eq!(st, 400);

    let (_, list) = get(&s, "/v1/volumes").await;
    assert_eq!(list["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(s.delete_at(&format!("/v1/volumes/{vol}")).await, 204);
    assert!(!img.exists());
    let (st, _) = get(&s, &format!("/v1/volumes/{vol}")).await;
    assert_eq!(st, 404);
}

/// `read_only`: the sandbox (and its fork children) read what others write to the
/// volume and write nothing themselves, through commands or the files API; it cannot
/// remount it writable.
#[tokio::test]
async fn a_read_only_mount_reads_and_never_writes() {
    let s = Server::start();
    let (st, v) = post(&s, "/v1/volumes", json!({"name": "ro", "size_mb": 64})).await;
    assert_eq!(st, 201, "{v}");
    let vol = v["id"].as_str().unwrap().to_owned();
    let writer = s
        .create(json!({"volumes": [{"id": vol, "mount": "/data"}]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reader = s
        .create(json!({"volumes": [{"id": vol, "mount": "/data", "read_only": true}]}))
        .await;
    assert_eq!(
        reader["volumes"],
        json!([{"id": vol, "mount": "/data", "read_only": true}])
    );
    let reader = reader["id"].as_str().unwrap().to_owned();
    let (_, err, code) = s.sh(&writer, "echo one > /data/note").await;
    assert_eq!(code, 0, "{err}");
    let (st, f) = post(&s, &format!("/v1/sandboxes/{reader}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{f}");
    let child = f["children"][0].as_str().unwrap().to_owned();
    for id in [&reader, &child] {
        let (out, _, _) = s.sh(id, "cat /data/note").await;
        assert_eq!(out, "one\n", "{id}");
        let (_, err, code) = s
            .sh(id, "echo x > /data/x || mkdir /data/d || rm /data/note")
            .await;
        assert_ne!(code, 0, "{id}");
        assert!(err.contains("Read-only file system"), "{id}: {err}");
        let (_, err, code) = s.sh(id, "mount -o remount,rw /data").await;
        assert_ne!(code, 0, "{id}: remounted writable: {err}");
        let r = s
            .http
            .put(s.url(&format!("/v1/sandboxes/{id}/files?path=/data/y")))
            .body("no")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{id}");
        // The rest of its filesystem stays writable.
        let (_, err, code) = s.sh(id, "echo fine > /root/ok").await;
        assert_eq!(code, 0, "{id}: {err}");
    }
    // The writer's later changes show; the reader left nothing behind.
    let (_, err, code) = s.sh(&writer, "echo two >> /data/note; ls /data").await;
    assert_eq!(code, 0, "{err}");
    let (out, _, _) = s.sh(&reader, "cat /data/note").await;
    assert_eq!(out, "one\ntwo\n");
    let (out, _, _) = s.sh(&writer, "ls -A /data | grep -v lost+found").await;
    assert_eq!(out, "note\n");
}
