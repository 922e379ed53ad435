//! End-to-end: fork and merge_into over real HTTP with real sandboxes.

#![allow(clippy::unwrap_used)]

mod common;

use common::{post, py, Server};
use serde_json::json;

async fn fork(s: &Server, id: &str, n: u32) -> Vec<String> {
    let (st, body) = post(s, &format!("/v1/sandboxes/{id}/fork"), json!({ "n": n })).await;
    assert_eq!(st, 200, "{body}");
    body["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

async fn status_of(s: &Server, id: &str) -> u16 {
    s.http
        .get(s.url(&format!("/v1/sandboxes/{id}")))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn children_start_from_the_parent_and_diverge_and_a_merge_wins() {
    let s = Server::start();
    let parent = s.create_id().await;
    py(
        &s,
        &parent,
        "data = list(range(10**6))\nopen('/root/note.txt','w').write('parent')",
    )
    .await;
    let (st, body) = post(&s, &format!("/v1/sandboxes/{parent}/fork"), json!({"n": 3})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["carried"], json!(["filesystem", "python"]));
    let kids: Vec<String> = body["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kids.len(), 3);
    assert_eq!(body["sandboxes"][0]["parent"], json!(parent));
    // Each child sees the parent's REPL state and file, then changes them its own way.
    for (i, k) in kids.iter().enumerate() {
        assert_eq!(
            py(
                &s,
                k,
                "len(data), sum(data[:10]), open('/root/note.txt').read()"
            )
            .await
            .0,
            "(1000000, 45, 'parent')\n",
            "child {k}"
        );
        let (out, err, code) = py(
            &s,
            k,
            &format!("data.append({i}); open('/root/note.txt','w').write('child{i}'); len(data)"),
        )
        .await;
        assert_eq!((out.as_str(), err.as_str(), code), ("1000001\n", "", 0));
        // Commands see the child's own filesystem too.
        assert_eq!(s.sh(k, "cat /root/note.txt").await.0, format!("child{i}"));
        // The copy runs with no capabilities, like every user process.
        let caps = py(&s, k, "[l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff','CapBnd','CapPrm'))]").await.0;
        assert_eq!(
            caps,
            "['0000000000000000', '0000000000000000', '0000000000000000']\n"
        );
    }
    // Parent and siblings are unaffected.
    assert_eq!(
        py(&s, &parent, "len(data), open('/root/note.txt').read()")
            .await
            .0,
        "(1000000, 'parent')\n"
    );
    assert_eq!(s.sh(&parent, "cat /root/note.txt").await.0, "parent");
    assert_eq!(py(&s, &kids[0], "data[-1]").await.0, "0\n");
    // A child's REPL lives in the child: its pid namespace and hostname.
    assert_eq!(
        py(&s, &kids[1], "import socket; socket.gethostname()")
            .await
            .0,
        format!("'{}'\n", kids[1])
    );
    // Merge child 2 into the parent: the parent shows child 2's values and file.
    let (st, body) = post(
        &s,
        &format!("/v1/sandboxes/{parent}/merge_into/{}", kids[2]),
        json!({}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["id"], json!(parent));
    assert_eq!(
        py(
            &s,
            &parent,
            "data[-1], len(data), open('/root/note.txt').read()"
        )
        .await
        .0,
        "(2, 1000001, 'child2')\n"
    );
    assert_eq!(s.sh(&parent, "cat /root/note.txt").await.0, "child2");
    // The merged child's id is consumed; siblings still work.
    assert_eq!(status_of(&s, &kids[2]).await, 410);
    let (st, _) = s.exec(&kids[2], json!({"code": "1"})).await;
    assert_eq!(st, 410);
    assert_eq!(py(&s, &kids[0], "data[-1]").await.0, "0\n");
    assert_eq!(py(&s, &kids[1], "data[-1]").await.0, "1\n");
    // Bad n → 400 naming the limit.
    for bad in [json!({"n": 33}), json!({"n": 0})] {
        let (st, body) = post(&s, &format!("/v1/sandboxes/{parent}/fork"), bad).await;
        assert_eq!(st, 400, "{body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains("32")
                || body.to_string().contains("32"),
            "{body}"
        );
    }
    // Merge errors: unknown → 404, consumed → 410, not a descendant → 409.
    let (st, _) = post(
        &s,
        &format!("/v1/sandboxes/{parent}/merge_into/sbx-nope"),
        json!({}),
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = post(
        &s,
        &format!("/v1/sandboxes/{parent}/merge_into/{}", kids[2]),
        json!({}),
    )
    .await;
    assert_eq!(st, 410);
    let other = s.create_id().await;
    let (st, body) = post(
        &s,
        &format!("/v1/sandboxes/{parent}/merge_into/{other}"),
        json!({}),
    )
    .await;
    assert_eq!(st, 409, "{body}");
    // The other way round (the descendant first) is 409, saying so.
    let (st, body) = post(
        &s,
        &format!("/v1/sandboxes/{}/merge_into/{parent}", kids[0]),
        json!({}),
    )
    .await;
    assert_eq!(st, 409, "{body}");
    assert!(body.to_string().contains("other way round"), "{body}");
    for id in [&parent, &kids[0], &kids[1], &other] {
        assert_eq!(s.delete(id).await, 204);
    }
}

#[tokio::test]
async fn forks_of_forks_and_deleting_a_parent_keep_children_working() {
    let s = Server::start();
    let root = s.create_id().await;
    py(&s, &root, "gen = ['root']").await;
    let a = fork(&s, &root, 1).await.remove(0);
    py(&s, &a, "gen.append('a')").await;
    let b = fork(&s, &a, 2).await;
    py(&s, &b[0], "gen.append('b0')").await;
    // Deleting the parent and the grandparent leaves the grandchildren working.
    assert_eq!(s.delete(&root).await, 204);
    assert_eq!(s.delete(&a).await, 204);
    assert_eq!(py(&s, &b[0], "gen").await.0, "['root', 'a', 'b0']\n");
    assert_eq!(py(&s, &b[1], "gen").await.0, "['root', 'a']\n");
    assert_eq!(s.sh(&b[1], "echo alive").await.0, "alive\n");
    // A merge into a deleted parent is a clear error.
    let (st, _) = post(
        &s,
        &format!("/v1/sandboxes/{a}/merge_into/{}", b[0]),
        json!({}),
    )
    .await;
    assert_eq!(st, 410);
    // Children keep the parent's metadata, with the fork's own over it.
    let tagged = s
        .create(json!({"metadata": {"run": "1", "owner": "me"}}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (st, body) = post(
        &s,
        &format!("/v1/sandboxes/{tagged}/fork"),
        json!({"n": 2, "metadata": {"run": "2", "branch": "x"}}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    for v in body["sandboxes"].as_array().unwrap() {
        assert_eq!(
            v["metadata"],
            json!({"run": "2", "owner": "me", "branch": "x"}),
            "{v}"
        );
    }
    let (_, v) = common::get(&s, &format!("/v1/sandboxes/{tagged}")).await;
    assert_eq!(v["metadata"], json!({"run": "1", "owner": "me"}));
    // Without a Python kernel only the filesystem is carried, and the child gets a
    // fresh REPL on first use.
    let plain = s.create_id().await;
    s.sh(&plain, "echo hi > /root/f").await;
    let (st, body) = post(&s, &format!("/v1/sandboxes/{plain}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["carried"], json!(["filesystem"]));
    let c = body["children"][0].as_str().unwrap().to_owned();
    assert_eq!(s.sh(&c, "cat /root/f").await.0, "hi\n");
    assert_eq!(py(&s, &c, "1 + 1").await.0, "2\n");
    // Two merges into one parent run one after the other; the last one wins.
    let p = s.create_id().await;
    py(&s, &p, "v = 'p'").await;
    let kids = fork(&s, &p, 2).await;
    py(&s, &kids[0], "v = 'k0'").await;
    py(&s, &kids[1], "v = 'k1'").await;
    let (u0, u1) = (
        format!("/v1/sandboxes/{p}/merge_into/{}", kids[0]),
        format!("/v1/sandboxes/{p}/merge_into/{}", kids[1]),
    );
    let m0 = post(&s, &u0, json!({}));
    let m1 = post(&s, &u1, json!({}));
    let ((s0, _), (s1, _)) = tokio::join!(m0, m1);
    assert_eq!((s0, s1), (200, 200));
    let v = py(&s, &p, "v").await.0;
    assert!(v == "'k0'\n" || v == "'k1'\n", "{v}");
    for id in [&b[0], &b[1], &plain, &c, &p] {
        assert_eq!(s.delete(id).await, 204, "{id}");
    }
    // Nothing is left on the host once every sandbox of a lineage is gone: no root
    // filesystem, chain of layers or fork layer.
    let ids = [&root, &a, &b[0], &b[1], &plain, &c, &p, &kids[0], &kids[1]];
    let mut left = Vec::new();
    for _ in 0..100 {
        left = std::fs::read_dir(s.pool.join("sandboxes"))
            .unwrap()
            .chain(std::fs::read_dir(s.pool.join("layers")).unwrap())
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                let stem = n.strip_suffix(".lower").unwrap_or(n);
                ids.iter()
                    .any(|id| stem == id.as_str() || n.starts_with(&format!("fork-{id}-")))
            })
            .collect();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(left.is_empty(), "left behind: {left:?}");
}
