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
    let r = s
        .http
        .delete(s.url(&format!("/v1/volumes/{vol}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
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
    let r = s
        .http
        .delete(s.url(&format!("/v1/volumes/{vol}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(!img.exists());
    let (st, _) = get(&s, &format!("/v1/volumes/{vol}")).await;
    assert_eq!(st, 404);
}
