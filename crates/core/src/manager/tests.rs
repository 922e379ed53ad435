//! The manager over the fake runtime (`crate::testing`): lifecycle, admission, fork and
//! merge, the reaper and recovery, as an ordinary user.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::testing::{Fake, FakeRuntime};
use crate::RuntimeError;

async fn manager_on(dir: &std::path::Path, rt: &Arc<FakeRuntime>) -> Arc<Manager> {
    let store = Store::open(&dir.join("db.sqlite")).await.unwrap();
    Manager::new(store, Arc::new(Fake(rt.clone())), ManagerConfig::default())
}

async fn manager() -> (Arc<Manager>, Arc<FakeRuntime>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::new();
    (manager_on(dir.path(), &rt).await, rt, dir)
}

fn req(workspace: &str, template: &str) -> CreateRequest {
    CreateRequest {
        template: Some(template.into()),
        workspace: workspace.into(),
        ..Default::default()
    }
}

/// The local admin (what a server without keys treats every caller as).
fn admin() -> Principal {
    Principal {
        workspace: DEFAULT_WORKSPACE.into(),
        token_id: None,
        token_name: None,
        admin: true,
    }
}

fn r(id: &str) -> SandboxRef {
    SandboxRef::internal(id)
}

async fn echo(m: &Manager, id: &str, cmd: &str) -> Result<Vec<ExecEvent>, CoreError> {
    let events = m
        .exec(
            &r(id),
            ExecCommand {
                work: Work::Command(cmd.into()),
                cwd: None,
                env: Default::default(),
                timeout: None,
            },
        )
        .await?;
    Ok(events.collect().await)
}

fn kinds(m: &Manager, id: &str) -> Vec<&'static str> {
    m.events()
        .tail(id, 100)
        .iter()
        .map(|e| e.kind.as_str())
        .collect()
}

#[tokio::test]
async fn a_sandbox_goes_through_its_lifecycle() {
    let (m, rt, _dir) = manager().await;
    let s = m.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    assert_eq!(s.status, Status::Running);
    assert_eq!((rt.running(), m.live_count()), (1, 1));
    let ev = echo(&m, &s.id, "hi").await.unwrap();
    assert_eq!(ev[0].kind, EventKind::Stdout("hi\n".into()));
    assert_eq!(ev.last().unwrap().kind, EventKind::Exit(0));

    assert_eq!(m.pause(&r(&s.id)).await.unwrap().status, Status::Paused);
    assert!(matches!(
        echo(&m, &s.id, "hi").await,
        Err(CoreError::WrongState { .. })
    ));
    assert!(matches!(
        m.pause(&r(&s.id)).await,
        Err(CoreError::WrongState { .. })
    ));
    assert_eq!(m.resume(&r(&s.id)).await.unwrap().status, Status::Running);

    let h = m.hibernate(&r(&s.id)).await.unwrap();
    assert_eq!(h.status, Status::Hibernated);
    assert_eq!(rt.running(), 0);
    assert_eq!(m.wake(&r(&s.id)).await.unwrap().status, Status::Running);
    assert!(echo(&m, &s.id, "again").await.is_ok());

    m.delete(&r(&s.id)).await.unwrap();
    assert!(matches!(
        m.get(&r(&s.id)).await,
        Err(CoreError::Gone { .. })
    ));
    assert_eq!(
        m.any_record(&r(&s.id)).await.unwrap().status,
        Status::Deleted
    );
    assert_eq!((rt.running(), m.live_count()), (0, 0));
    assert_eq!(
        kinds(&m, &s.id),
        [
            "created",
            "paused",
            "resumed",
            "hibernated",
            "woken",
            "deleted"
        ]
    );
    // Bad input loses nothing.
    assert!(matches!(
        m.create(req(DEFAULT_WORKSPACE, "no-such")).await,
        Err(CoreError::Runtime(RuntimeError::UnknownTemplate(_)))
    ));
    let mut bad = req(DEFAULT_WORKSPACE, "python");
    bad.env.insert("A=B".into(), "x".into());
    assert!(matches!(m.create(bad).await, Err(CoreError::Invalid(_))));
}

#[tokio::test]
async fn an_exec_timeout_is_checked_against_the_servers_limit() {
    let (m, _rt, _dir) = manager().await;
    let s = m.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    for t in [0.0, -1.0, f64::NAN, 86400.5] {
        let e = m
            .exec(
                &r(&s.id),
                ExecCommand {
                    work: Work::Command("x".into()),
                    cwd: None,
                    env: Default::default(),
                    timeout: Some(t),
                },
            )
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("more than 0 and at most 86400 seconds"),
            "{t}: {e}"
        );
    }
}

#[tokio::test]
async fn admission_is_per_workspace() {
    let (m, rt, _dir) = manager().await;
    let admin = admin();
    let one = Quota {
        max_sandboxes: Some(1),
        max_memory_mb: None,
    };
    m.set_quota(&admin, "a", one).await.unwrap();
    m.set_quota(&admin, "b", one).await.unwrap();
    // A cold create of workspace a holds a's admission while it runs…
    let m2 = m.clone();
    let slow = tokio::spawn(async move { m2.create(req("a", "slow")).await });
    while rt.creates() == 0 {
        tokio::task::yield_now().await;
    }
    // …and workspace b is admitted meanwhile (no global lock); its quota holds.
    let b = tokio::time::timeout(Duration::from_secs(10), m.create(req("b", "python")))
        .await
        .expect("b waited behind a's create")
        .unwrap();
    assert_eq!(b.workspace, "b");
    assert!(matches!(
        m.create(req("b", "python")).await,
        Err(CoreError::Quota(_))
    ));
    // a's second create waits for its first, then is refused by a's quota.
    let m3 = m.clone();
    let second = tokio::spawn(async move { m3.create(req("a", "python")).await });
    rt.release(1);
    assert_eq!(slow.await.unwrap().unwrap().workspace, "a");
    assert!(matches!(second.await.unwrap(), Err(CoreError::Quota(_))));
    let u = m.usage("a").await.unwrap();
    assert_eq!(u.sandboxes, 1);
}

#[tokio::test]
async fn a_fork_child_merges_into_its_parent() {
    let (m, rt, _dir) = manager().await;
    let p = m.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("k".to_owned(), "v".to_owned());
    let out = m.fork(&r(&p.id), 2, &meta).await.unwrap();
    assert_eq!(out.children.len(), 2);
    assert_eq!(out.carried, ["filesystem"]);
    for c in &out.children {
        assert_eq!(c.parent.as_deref(), Some(p.id.as_str()));
        assert_eq!(c.metadata.get("k").map(String::as_str), Some("v"));
    }
    assert_eq!(rt.running(), 3);
    assert!(matches!(
        m.fork(&r(&p.id), MAX_FORK + 1, &BTreeMap::new()).await,
        Err(CoreError::Invalid(_))
    ));
    let (a, b) = (&out.children[0].id, &out.children[1].id);
    // Only a descendant merges into an ancestor.
    assert!(matches!(
        m.merge_into(&r(&p.id), &r(a)).await,
        Err(CoreError::Conflict(_))
    ));
    assert!(matches!(
        m.merge_into(&r(a), &r(a)).await,
        Err(CoreError::Invalid(_) | CoreError::Conflict(_))
    ));
    let merged = m.merge_into(&r(a), &r(&p.id)).await.unwrap();
    assert_eq!(
        (merged.id.as_str(), merged.status),
        (p.id.as_str(), Status::Running)
    );
    assert_eq!(m.any_record(&r(a)).await.unwrap().status, Status::Merged);
    // The parent runs the winner's instance; the sibling lives on.
    assert!(echo(&m, &p.id, "after").await.is_ok());
    assert_eq!(m.get(&r(b)).await.unwrap().status, Status::Running);
}

#[tokio::test]
async fn the_reaper_ends_expired_and_dead_sandboxes() {
    let (m, rt, _dir) = manager().await;
    let mut short = req(DEFAULT_WORKSPACE, "python");
    short.timeout = Some(1);
    let expired = m.create(short).await.unwrap();
    let dying = m.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    let kept = m.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    rt.instance(&dying.resource_id).unwrap().kill();
    m.reap_once().await;
    let d = m.any_record(&r(&dying.id)).await.unwrap();
    assert_eq!(
        (d.status, d.end_reason.as_deref()),
        (Status::Failed, Some("agent exited"))
    );
    assert_eq!(
        m.get(&r(&expired.id)).await.unwrap().status,
        Status::Running
    );
    // Past its time to live.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    m.reap_once().await;
    let e = m.any_record(&r(&expired.id)).await.unwrap();
    assert_eq!(
        (e.status, e.end_reason.as_deref()),
        (Status::Killed, Some("timeout expired"))
    );
    assert!(kinds(&m, &expired.id).contains(&"timeout"));
    assert_eq!(m.get(&r(&kept.id)).await.unwrap().status, Status::Running);
    assert_eq!(rt.running(), 1);
}

#[tokio::test]
async fn a_restarted_server_adopts_survivors_and_marks_the_rest_lost() {
    let dir = tempfile::tempdir().unwrap();
    let first = FakeRuntime::new();
    let m1 = manager_on(dir.path(), &first).await;
    let a = m1.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    let b = m1.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    m1.pause(&r(&b.id)).await.unwrap();
    drop(m1);

    // A server whose runtime finds the processes: both adopted as they were.
    let second = FakeRuntime::new();
    let m2 = manager_on(dir.path(), &second).await;
    assert_eq!(m2.recover().await.unwrap(), (2, 0));
    assert_eq!(m2.get(&r(&a.id)).await.unwrap().status, Status::Running);
    assert_eq!(m2.get(&r(&b.id)).await.unwrap().status, Status::Paused);
    assert!(echo(&m2, &a.id, "still").await.is_ok());
    assert_eq!(kinds(&m2, &a.id), ["adopted"]);
    // Recovering again adopts nothing twice.
    assert_eq!(m2.recover().await.unwrap(), (0, 0));
    drop(m2);

    // One whose runtime finds nothing: both lost, with the reason, never forgotten.
    let third = FakeRuntime::new();
    third.set_adopt_fails(true);
    let m3 = manager_on(dir.path(), &third).await;
    assert_eq!(m3.recover().await.unwrap(), (0, 2));
    for id in [&a.id, &b.id] {
        let rec = m3.any_record(&r(id)).await.unwrap();
        assert_eq!(rec.status, Status::Lost);
        assert!(rec.end_reason.unwrap().contains("did not survive"));
    }
    assert_eq!(m3.live_count(), 0);
}

#[tokio::test]
async fn a_key_expires() {
    let (m, _rt, _dir) = manager().await;
    let admin = admin();
    let now = OffsetDateTime::now_utc();
    for bad in [
        now - time::Duration::seconds(1),
        now + time::Duration::days(4000),
    ] {
        assert!(matches!(
            m.create_token(&admin, "k", None, false, Some(bad)).await,
            Err(CoreError::Invalid(_))
        ));
    }
    let soon = m
        .create_token(
            &admin,
            "soon",
            None,
            false,
            Some(now + time::Duration::seconds(1)),
        )
        .await
        .unwrap();
    let forever = m
        .create_token(&admin, "forever", None, false, None)
        .await
        .unwrap();
    assert!(m.authenticate(&soon.key).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(m.authenticate(&soon.key).await.unwrap().is_none());
    assert!(m.authenticate(&forever.key).await.unwrap().is_some());
    let listed = m.tokens(&admin).await.unwrap();
    let t = listed.iter().find(|t| t.id == soon.token.id).unwrap();
    assert!(t.expires_at.is_some() && !t.in_force(OffsetDateTime::now_utc()));
}

#[tokio::test]
async fn shutdown_waits_for_background_work() {
    let (m, rt, _dir) = manager().await;
    let p = m.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    let c = m.fork(&r(&p.id), 1, &BTreeMap::new()).await.unwrap();
    // The merge releases the parent's old state off the request path, slowly.
    rt.set_destroy_ms(300);
    m.merge_into(&r(&c.children[0].id), &r(&p.id))
        .await
        .unwrap();
    assert_eq!(
        rt.running(),
        2,
        "the old state is released in the background"
    );
    assert!(m.drain(Duration::from_secs(5)).await);
    assert_eq!(rt.running(), 1, "drain returned before the release ended");
    m.shutdown().await;
    assert_eq!((m.live_count(), rt.running()), (0, 0));
}

/// Builds template `tools` (on `python`, one run command) on `m`: its build events.
async fn build_tools(m: &Arc<Manager>) -> Vec<crate::templates::BuildEvent> {
    m.build_template(crate::TemplateSpec {
        name: "tools".into(),
        base: Some("python".into()),
        run: vec!["echo built".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .collect()
    .await
}

#[tokio::test]
async fn templates_are_built_used_and_deleted_through_the_host_stores() {
    let (m, _rt, _dir) = manager().await;
    let events = build_tools(&m).await;
    assert!(
        matches!(events.last(), Some(crate::templates::BuildEvent::Ready(t)) if t.name == "tools"),
        "{events:?}"
    );
    assert!(m.templates().await.iter().any(|t| t.name == "tools"));
    // A second build of the name is refused; a sandbox is made from it.
    let again = m
        .build_template(crate::TemplateSpec {
            name: "tools".into(),
            base: Some("python".into()),
            ..Default::default()
        })
        .await;
    assert!(matches!(again, Err(CoreError::Conflict(_))));
    let s = m.create(req(DEFAULT_WORKSPACE, "tools")).await.unwrap();
    // In use: not deleted until its sandbox ends.
    assert!(matches!(
        m.delete_template("tools").await,
        Err(CoreError::Conflict(_))
    ));
    m.delete(&r(&s.id)).await.unwrap();
    m.delete_template("tools").await.unwrap();
    assert!(m.template("tools").await.is_err());
}

#[tokio::test]
async fn volumes_are_kept_by_the_host_stores() {
    let (m, _rt, _dir) = manager().await;
    let v = m
        .create_volume(DEFAULT_WORKSPACE, "data", 64)
        .await
        .unwrap();
    assert_eq!(m.volume_used(&v.id).await, Some(0));
    m.delete_volume(DEFAULT_WORKSPACE, &v.id).await.unwrap();
    assert_eq!(m.volume_used(&v.id).await, None);
}

#[tokio::test]
async fn a_fenced_node_ends_its_sandboxes_and_records_them_later() {
    let (m, rt, _dir) = manager().await;
    let s = m.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    m.fence().await;
    assert_eq!((rt.running(), m.live_count()), (0, 0));
    // Once the database answers (the next heartbeat), the record says so.
    m.settle_fenced().await;
    let rec = m.any_record(&r(&s.id)).await.unwrap();
    assert_eq!(rec.status, Status::Lost);
    assert!(rec.end_reason.unwrap().contains("fenced"));
    assert!(kinds(&m, &s.id).contains(&"lost"));
}

#[tokio::test]
async fn a_template_built_on_one_node_is_built_on_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (rt1, rt2) = (FakeRuntime::new(), FakeRuntime::new());
    let m1 = manager_on(dir.path(), &rt1).await;
    let store2 = Store::open(&dir.path().join("db.sqlite"))
        .await
        .unwrap()
        .on_node("other");
    let m2 = Manager::new(
        store2,
        Arc::new(Fake(rt2.clone())),
        ManagerConfig::default(),
    );
    let events = build_tools(&m1).await;
    assert!(matches!(
        events.last(),
        Some(crate::templates::BuildEvent::Ready(_))
    ));
    assert!(m2.template("tools").await.is_err());
    m2.sync_templates().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(t) = m2.template("tools").await {
            if t.status == crate::templates::TemplateStatus::Ready {
                assert_eq!(t.run, ["echo built"]);
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never built on the other node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Deleted on one node: its recipe goes (the others keep their copy until deleted).
    m1.delete_template("tools").await.unwrap();
    assert!(m1.store().template_recipes().await.unwrap().is_empty());
}

/// A snapshot names the runtime that took it: deleting one goes to that runtime's
/// stores, and one whose runtime this server does not run is kept (409), its record
/// too, rather than its files leaking behind a deleted record.
#[tokio::test]
async fn snapshots_are_deleted_by_the_runtime_that_took_them() {
    let (m, _rt, _dir) = manager().await;
    let sb = m.create(req("default", "python")).await.unwrap();
    let snap = m.snapshot(&r(&sb.id), "s").await.unwrap();
    assert_eq!(snap.runtime, "fake");
    let mut foreign = snap.clone();
    foreign.id = crate::ids::new("snap");
    foreign.runtime = "vm".into();
    m.store().insert_snapshot(&foreign).await.unwrap();
    let gone = m.snapshot_ref(&admin(), &foreign.id).await.unwrap();
    let e = m.delete_snapshot(&gone).await.unwrap_err();
    assert!(matches!(e, CoreError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("vm runtime"), "{e}");
    assert!(m.store().get_snapshot(&foreign.id).await.unwrap().is_some());
    // A create from it goes to that runtime too: unknown here.
    let e = m
        .create(CreateRequest {
            snapshot: Some(foreign.id.clone()),
            ..req("default", "python")
        })
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::Invalid(_)), "{e}");
    let own = m.snapshot_ref(&admin(), &snap.id).await.unwrap();
    m.delete_snapshot(&own).await.unwrap();
    assert!(m.store().get_snapshot(&snap.id).await.unwrap().is_none());
}

/// An agent call that fails because its sandbox was ended meanwhile (a delete racing a
/// file read) is "gone" (410), not a broken agent (502); while the sandbox lives, the
/// failure stays what it is.
#[tokio::test]
async fn an_agent_failure_of_an_ended_sandbox_is_gone() {
    let (m, _rt, _dir) = manager().await;
    let s = m.create(req(DEFAULT_WORKSPACE, "python")).await.unwrap();
    let broken = || crate::runtime::RuntimeError::Agent {
        id: s.id.clone(),
        source: "agent request: connection error".into(),
    };
    assert!(matches!(
        m.failed(&s.id, broken()),
        CoreError::Runtime(crate::runtime::RuntimeError::Agent { .. })
    ));
    m.delete(&r(&s.id)).await.unwrap();
    assert!(matches!(m.failed(&s.id, broken()), CoreError::Ending(_)));
}
