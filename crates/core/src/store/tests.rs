//! The store on each backend: SQLite always, PostgreSQL when a server is given.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::auth::{Quota, Token};

/// A database of each backend for one test: SQLite in `dir`; PostgreSQL, when
/// `FORKBOX_TEST_DATABASE_URL` names a server (`scripts/with-postgres.sh` starts
/// one), a fresh database on it. `make test` sets `FORKBOX_REQUIRE_POSTGRES`, so
/// there a missing server fails instead of skipping. Each store is given with how
/// to open it again.
async fn backends(dir: &Path) -> Vec<(Store, String)> {
    let file = dir.join("db.sqlite").display().to_string();
    let mut out = vec![(Store::open_target(&file).await.unwrap(), file)];
    match std::env::var("FORKBOX_TEST_DATABASE_URL") {
        Ok(url) => {
            let name = format!("fbt_{:016x}", rand::random::<u64>());
            let admin = Store::connect(&url).await.unwrap();
            let Db::Postgres(pool) = &admin.db else {
                panic!("not a PostgreSQL URL: {url}");
            };
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(pool)
                .await
                .unwrap();
            let opts = PgConnectOptions::from_str(&url).unwrap().database(&name);
            let store = Store::connect_with(opts, &url).await.unwrap();
            // Reopened by URL: the same server, this database.
            let again = if url.contains('?') {
                format!("{}&dbname={name}", url)
            } else {
                format!("{url}?dbname={name}")
            };
            out.push((store, again));
        }
        Err(_) if std::env::var_os("FORKBOX_REQUIRE_POSTGRES").is_some() => {
            panic!("FORKBOX_REQUIRE_POSTGRES is set but FORKBOX_TEST_DATABASE_URL is not")
        }
        Err(_) => eprintln!("PostgreSQL store tests skipped: no FORKBOX_TEST_DATABASE_URL"),
    }
    out
}

fn sandbox(id: &str) -> Sandbox {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    Sandbox {
        id: id.into(),
        status: Status::Running,
        runtime: "jail".into(),
        template: "python".into(),
        cpu: 1.0,
        memory_mb: 512,
        timeout: 300,
        metadata: Default::default(),
        created_at: now,
        expires_at: now + time::Duration::seconds(300),
        ended_at: None,
        end_reason: None,
        boot_ms: 1.0,
        parent: None,
        host_pid: None,
        resource_id: id.into(),
        env: Default::default(),
        on_timeout: OnTimeout::Kill,
        traceparent: None,
        workspace: "default".into(),
        egress: None,
        volumes: vec![],
        disk_mb: 8192,
        idle_timeout: None,
        node: Some(LOCAL_NODE.into()),
    }
}

#[tokio::test]
async fn sandboxes_round_trip_and_end() {
    let dir = tempfile::tempdir().unwrap();
    for (store, target) in backends(dir.path()).await {
        round_trip(store, &target).await;
    }
}

async fn round_trip(store: Store, target: &str) {
    let backend = store.backend();
    // Every field set to something other than the defaults of `sandbox()`.
    let s = Sandbox {
        metadata: [("k".to_owned(), "v".to_owned())].into(),
        boot_ms: 7.5,
        host_pid: Some(42),
        env: [("A".to_owned(), "b".to_owned())].into(),
        on_timeout: OnTimeout::Hibernate,
        traceparent: Some("00-4bf92f3564d486ad4bf92f3564d486ad-00f067aa0ba902b7-01".into()),
        workspace: "team-a".into(),
        egress: Some(vec!["pypi.org".into()]),
        volumes: vec![crate::model::VolumeMount {
            id: "vol-0123456789abcdef".into(),
            mount: "/data".into(),
            read_only: true,
        }],
        disk_mb: 2048,
        idle_timeout: Some(60),
        ..sandbox("sbx-0123456789abcdef")
    };
    let now = s.created_at;
    store.insert_sandbox(&s).await.unwrap();
    assert_eq!(store.get_sandbox(&s.id).await.unwrap().unwrap(), s);
    assert_eq!(
        store
            .sandboxes_with_status(Status::Running)
            .await
            .unwrap()
            .len(),
        1
    );
    store
        .end_sandbox(&s.id, Status::Deleted, "deleted by client", now)
        .await
        .unwrap();
    let got = store.get_sandbox(&s.id).await.unwrap().unwrap();
    assert_eq!(got.status, Status::Deleted);
    assert_eq!(got.end_reason.as_deref(), Some("deleted by client"));
    assert!(store.get_sandbox("sbx-nope").await.unwrap().is_none());
    // Listing: live ones by default, pages with a cursor, filters.
    for i in 0..5 {
        let mut t = s.clone();
        t.id = format!("sbx-{i:016}");
        t.template = if i % 2 == 0 {
            "python".into()
        } else {
            "other".into()
        };
        store.insert_sandbox(&t).await.unwrap();
    }
    let mut f = ListFilter {
        limit: 2,
        ..Default::default()
    };
    let (page, next) = store.list_sandboxes(&f).await.unwrap();
    assert_eq!(
        page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["sbx-0000000000000000", "sbx-0000000000000001"]
    );
    f.after = next;
    let (page2, next2) = store.list_sandboxes(&f).await.unwrap();
    assert_eq!(page2.len(), 2);
    f.after = next2;
    let (page3, next3) = store.list_sandboxes(&f).await.unwrap();
    assert_eq!((page3.len(), next3), (1, None));
    let only = ListFilter {
        limit: 10,
        template: Some("other".into()),
        ..Default::default()
    };
    assert_eq!(store.list_sandboxes(&only).await.unwrap().0.len(), 2);
    let deleted = ListFilter {
        limit: 10,
        status: Some(Status::Deleted),
        ..Default::default()
    };
    assert_eq!(store.list_sandboxes(&deleted).await.unwrap().0.len(), 1);
    let all = ListFilter {
        limit: 10,
        all: true,
        ..Default::default()
    };
    assert_eq!(store.list_sandboxes(&all).await.unwrap().0.len(), 6);
    store
        .set_status("sbx-0000000000000000", Status::Paused)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_sandbox("sbx-0000000000000000")
            .await
            .unwrap()
            .unwrap()
            .status,
        Status::Paused
    );
    // Reopening keeps everything (migrations are not re-applied).
    drop(store);
    let again = Store::open_target(target).await.unwrap();
    assert_eq!(again.backend(), backend);
    assert_eq!(
        again.get_sandbox(&s.id).await.unwrap().unwrap().status,
        Status::Deleted
    );
}

#[tokio::test]
async fn hand_over_moves_a_sandbox_to_the_end_of_listings() {
    let dir = tempfile::tempdir().unwrap();
    for (store, _) in backends(dir.path()).await {
        for id in ["sbx-a", "sbx-b", "sbx-c"] {
            store.insert_sandbox(&sandbox(id)).await.unwrap();
        }
        let mut a = sandbox("sbx-a");
        a.workspace = "team".into();
        assert!(store.hand_over(&a).await.unwrap());
        let all = ListFilter {
            limit: 10,
            ..Default::default()
        };
        let ids: Vec<String> = store
            .list_sandboxes(&all)
            .await
            .unwrap()
            .0
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["sbx-b", "sbx-c", "sbx-a"], "{}", store.backend());
        store
            .end_sandbox("sbx-b", Status::Deleted, "gone", OffsetDateTime::now_utc())
            .await
            .unwrap();
        assert!(!store.hand_over(&sandbox("sbx-b")).await.unwrap());
    }
}

#[tokio::test]
async fn workspaces_quotas_usage_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (store, _) in backends(dir.path()).await {
        let b = store.backend();
        store.ensure_workspace("team").await.unwrap();
        store.ensure_workspace("team").await.unwrap();
        assert_eq!(store.quota("team").await.unwrap(), Quota::default());
        let quota = Quota {
            max_sandboxes: Some(3),
            max_memory_mb: Some(4096),
        };
        store.set_quota("team", quota).await.unwrap();
        assert_eq!(store.quota("team").await.unwrap(), quota, "{b}");
        for (id, status) in [
            ("sbx-1", Status::Running),
            ("sbx-2", Status::Paused),
            ("sbx-3", Status::Hibernated),
        ] {
            let mut s = sandbox(id);
            s.workspace = "team".into();
            s.status = status;
            store.insert_sandbox(&s).await.unwrap();
        }
        let u = store.usage("team").await.unwrap();
        assert_eq!((u.sandboxes, u.memory_mb), (3, 1024), "{b}");
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        for (id, admin) in [("tok-1", true), ("tok-2", false)] {
            let t = Token {
                id: id.into(),
                name: "k".into(),
                workspace: "team".into(),
                prefix: "fbk_x".into(),
                admin,
                created_at: now,
                revoked_at: None,
                expires_at: Some(now + time::Duration::days(1)),
            };
            store.insert_token(&t, &format!("hash-{id}")).await.unwrap();
        }
        let got = store.token_by_hash("hash-tok-1").await.unwrap().unwrap();
        assert!(got.admin, "{b}");
        assert!(!store.get_token("tok-2").await.unwrap().unwrap().admin);
        store.revoke_token("tok-1").await.unwrap();
        assert!(store.token_by_hash("hash-tok-1").await.unwrap().is_none());
        let listed = store.list_tokens(Some("team")).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(store.list_tokens(Some("other")).await.unwrap().is_empty());
        assert_eq!(store.list_tokens(None).await.unwrap().len(), 2);
    }
}

#[tokio::test]
async fn volumes_know_who_mounts_them() {
    let dir = tempfile::tempdir().unwrap();
    for (store, _) in backends(dir.path()).await {
        let v = Volume {
            id: "vol-1".into(),
            name: "data".into(),
            size_mb: 64,
            workspace: "default".into(),
            created_at: OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
        };
        store.insert_volume(&v).await.unwrap();
        assert_eq!(
            store.list_volumes(None).await.unwrap(),
            std::slice::from_ref(&v)
        );
        // It lives on the node that made it.
        assert_eq!(
            store.node_of("vol-1").await.unwrap().as_deref(),
            Some(LOCAL_NODE)
        );
        let mut s = sandbox("sbx-m");
        s.volumes = vec![crate::model::VolumeMount {
            id: "vol-1".into(),
            mount: "/data".into(),
            read_only: false,
        }];
        store.insert_sandbox(&s).await.unwrap();
        store.insert_sandbox(&sandbox("sbx-n")).await.unwrap();
        let mut r = sandbox("sbx-r");
        r.runtime = "vm".into();
        r.volumes = vec![crate::model::VolumeMount {
            id: "vol-1".into(),
            mount: "/ro".into(),
            read_only: true,
        }];
        store.insert_sandbox(&r).await.unwrap();
        // Who mounts it, in which runtime, how.
        let mut users = store.volume_users("vol-1").await.unwrap();
        users.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
        assert_eq!(
            users,
            [
                crate::store::VolumeUser {
                    sandbox: "sbx-m".into(),
                    runtime: s.runtime.clone(),
                    read_only: false
                },
                crate::store::VolumeUser {
                    sandbox: "sbx-r".into(),
                    runtime: "vm".into(),
                    read_only: true
                },
            ]
        );
        store
            .end_sandbox("sbx-r", Status::Killed, "x", OffsetDateTime::now_utc())
            .await
            .unwrap();
        assert_eq!(store.sandboxes_mounting("vol-1").await.unwrap(), ["sbx-m"]);
        store
            .end_sandbox("sbx-m", Status::Killed, "x", OffsetDateTime::now_utc())
            .await
            .unwrap();
        assert!(store.sandboxes_mounting("vol-1").await.unwrap().is_empty());
        assert!(store
            .ended_resource_ids()
            .await
            .unwrap()
            .contains(&"sbx-m".to_owned()));
        store.delete_volume("vol-1").await.unwrap();
        assert!(store.get_volume("vol-1").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn nodes_claim_their_names_and_see_their_own_sandboxes() {
    let dir = tempfile::tempdir().unwrap();
    for (store, target) in backends(dir.path()).await {
        let b = store.backend();
        // A record from before nodes becomes the first claimant's.
        store.insert_sandbox(&sandbox("sbx-old")).await.unwrap();
        on_db!(store, pool => {
            sqlx::query("UPDATE sandboxes SET node = NULL").execute(pool).await.unwrap();
        });
        let a = store.clone().on_node("a");
        let info = |url: &str| NodeInfo {
            url: url.into(),
            runtimes: vec!["jail".into()],
            cpus: 2,
            memory_mb: 4096,
            templates: vec!["python".into()],
            orphan_grace_s: 600,
        };
        a.claim(&target, &info("http://a:7070")).await.unwrap();
        assert_eq!(a.node_of("sbx-old").await.unwrap().as_deref(), Some("a"));
        if b == "postgres" {
            let twin = Store::open_target(&target).await.unwrap().on_node("a");
            assert!(matches!(
                twin.claim(&target, &info("http://x")).await,
                Err(StoreError::InUse { .. })
            ));
        }
        let other = Store::open_target(&target).await.unwrap().on_node("b");
        other.claim(&target, &info("http://b:7070")).await.unwrap();
        other.insert_sandbox(&sandbox("sbx-b")).await.unwrap();
        a.insert_sandbox(&sandbox("sbx-a")).await.unwrap();
        let ids = |v: Vec<Sandbox>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(
            ids(a.sandboxes_with_status(Status::Running).await.unwrap()),
            ["sbx-old", "sbx-a"],
            "{b}"
        );
        assert_eq!(
            ids(other.sandboxes_with_status(Status::Running).await.unwrap()),
            ["sbx-b"]
        );
        other
            .end_sandbox("sbx-b", Status::Deleted, "x", OffsetDateTime::now_utc())
            .await
            .unwrap();
        assert!(!a
            .ended_resource_ids()
            .await
            .unwrap()
            .contains(&"sbx-b".into()));
        assert!(other
            .ended_resource_ids()
            .await
            .unwrap()
            .contains(&"sbx-b".into()));
        other
            .heartbeat(7, &["python".into(), "base".into()])
            .await
            .unwrap();
        assert!(other.set_draining("b", true).await.unwrap());
        assert!(!other.set_draining("nope", true).await.unwrap());
        let loads = a.node_loads().await.unwrap();
        assert_eq!(
            loads["a"],
            NodeLoad {
                sandboxes: 2,
                reserved_mb: 1024
            },
            "{b}"
        );
        assert!(!loads.contains_key("b"));
        let nodes = a.nodes().await.unwrap();
        assert_eq!(
            nodes
                .iter()
                .map(|n| (n.name.as_str(), n.url.as_str(), n.sandboxes))
                .collect::<Vec<_>>(),
            [("a", "http://a:7070", 0), ("b", "http://b:7070", 7)],
            "{b}"
        );
        assert_eq!(nodes[0].runtimes, ["jail"]);
        assert_eq!((nodes[0].cpus, nodes[0].memory_mb), (2, 4096));
        assert_eq!(nodes[1].templates, ["python", "base"]);
        assert!(nodes[1].draining && !nodes[0].draining);
    }
}

#[test]
fn loads_leave_the_warm_pools_out() {
    assert!(super::nodes::LOADS.contains(&format!("'{}'", crate::warm::POOL_WORKSPACE)));
}

#[tokio::test]
async fn placements_reserve_capacity_atomically_across_servers() {
    let dir = tempfile::tempdir().unwrap();
    for (store, target) in backends(dir.path()).await {
        let b = store.backend();
        // Two servers (PostgreSQL) place 8 creates at once, each on the node with the
        // least reserved: with every choice seen by the next, they split evenly.
        let other = if b == "postgres" {
            Store::open_target(&target).await.unwrap()
        } else {
            store.clone()
        };
        let ttl = std::time::Duration::from_secs(60);
        let places = (0..8).map(|i| {
            let s = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            async move {
                s.reserve_placement(100, ttl, |loads| {
                    let mem = |n: &str| loads.get(n).map_or(0, |l| l.reserved_mb);
                    Some(if mem("b") < mem("a") { "b" } else { "a" }.to_owned())
                })
                .await
                .unwrap()
                .unwrap()
            }
        });
        let made = futures_util::future::join_all(places).await;
        let loads = store.node_loads().await.unwrap();
        let on = |n: &str| loads.get(n).copied().unwrap_or_default();
        assert_eq!(
            (on("a"), on("b")),
            (
                NodeLoad {
                    sandboxes: 4,
                    reserved_mb: 400
                },
                NodeLoad {
                    sandboxes: 4,
                    reserved_mb: 400
                }
            ),
            "{b}"
        );
        // Released, a reservation no longer counts; neither does an expired one.
        let (token, node) = &made[0];
        store.release_placement(token).await.unwrap();
        assert_eq!(store.node_loads().await.unwrap()[node].sandboxes, 3, "{b}");
        store
            .reserve_placement(100, std::time::Duration::ZERO, |_| Some("c".into()))
            .await
            .unwrap();
        assert!(!store.node_loads().await.unwrap().contains_key("c"), "{b}");
        assert!(store
            .reserve_placement(100, ttl, |_| None)
            .await
            .unwrap()
            .is_none());
    }
}

#[tokio::test]
async fn workspace_locks_exclude_each_other_across_servers() {
    let dir = tempfile::tempdir().unwrap();
    for (store, target) in backends(dir.path()).await {
        let held = store.lock_workspace("team").await.unwrap();
        if store.backend() == "sqlite" {
            assert!(held.is_none());
            continue;
        }
        let other = Store::open_target(&target).await.unwrap();
        // Another workspace is free; this one waits until the first is let go.
        other.lock_workspace("else").await.unwrap().unwrap();
        let waiting = tokio::spawn(async move { other.lock_workspace("team").await });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!waiting.is_finished());
        drop(held);
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the lock was not released")
            .unwrap()
            .unwrap();
        assert!(got.is_some());
    }
}

#[test]
fn both_backends_have_the_same_migrations() {
    let versions = |m: &Migrator| {
        m.iter()
            .map(|m| (m.version, m.description.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(versions(&SQLITE_MIGRATIONS), versions(&POSTGRES_MIGRATIONS));
}

#[test]
fn passwords_are_not_shown() {
    assert_eq!(
        redacted("postgres://fb:secret@db:5432/forkbox?sslmode=disable"),
        "postgres://fb:***@db:5432/forkbox?sslmode=disable"
    );
    assert_eq!(redacted("postgres://fb@db/x"), "postgres://fb@db/x");
    assert_eq!(
        redacted("/var/lib/forkbox/forkbox.db"),
        "/var/lib/forkbox/forkbox.db"
    );
}
