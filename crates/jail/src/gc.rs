//! Clean-up and recovery: adopting an earlier server's sandboxes, freeing what ended
//! sandboxes left, and removing one sandbox's leftovers.

use super::*;

impl Inner {
    pub(crate) async fn collect_garbage(
        &self,
        keep: &std::collections::HashSet<String>,
        candidates: Vec<String>,
    ) -> Result<GcReport, RuntimeError> {
        let mut report = GcReport::default();
        let mut cands: std::collections::BTreeSet<String> = candidates.into_iter().collect();
        if let Ok(rd) = std::fs::read_dir(&self.run_dir) {
            cands.extend(
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned)),
            );
        }
        // PID-namespace ancestry of every live sandbox, nearest first.
        let live: Vec<(String, Vec<u64>)> = {
            let lin = self.lineage();
            lin.nodes
                .iter()
                .filter(|(_, n)| n.live)
                .filter_map(|(id, n)| n.agent.map(|p| (id.clone(), pidns_chain(p))))
                .collect()
        };
        let mut hollow: Vec<(String, u64)> = Vec::new();
        for c in &cands {
            if keep.contains(c) || c.contains('/') || c.starts_with('.') || c.is_empty() {
                continue;
            }
            let Ok(cg) = self.cgroups.open(c) else {
                continue;
            };
            let rootfs = self.pool.sandbox(c);
            let run = self.run_dir.join(c);
            let (has_cg, has_fs, has_run) = (cg.exists(), rootfs.exists(), run.exists());
            let staged = self
                .pool
                .root()
                .join("sandboxes")
                .join(format!("{}{c}", forkbox_sys::btrfs::STAGING_PREFIX))
                .exists();
            if !(has_cg || has_fs || has_run || staged) {
                continue;
            }
            // A hollow fork ancestor whose PID 1 live sandboxes hang off: keep it.
            let pid1 = cg
                .pids()
                .unwrap_or_default()
                .into_iter()
                .find(|p| nspid(*p).ok().and_then(|v| v.last().copied()) == Some(1));
            if let Some(p1) = pid1 {
                let ino = pidns_chain(p1).first().copied();
                if let Some(ino) = ino.filter(|i| live.iter().any(|(_, ch)| ch[1..].contains(i))) {
                    let keepalive = AgentClient::connect_unix(&run.join("agent.sock"))
                        .await
                        .ok();
                    let res = Resources {
                        id: c.clone(),
                        rootfs: has_fs.then_some(rootfs),
                        cgroup: Some(cg),
                        run_dir: has_run.then_some(run),
                        pidfd: forkbox_sys::pidfd::open(p1).ok().map(Arc::new),
                        pid: Some(p1),
                        egress: None,
                        keepalive,
                        slot: self.claim_slot(p1),
                        nested: None,
                        helper_ns: None,
                    };
                    self.lineage().nodes.insert(
                        c.clone(),
                        Node {
                            parent: None,
                            agent: Some(p1),
                            live: false,
                            hollow: Some(res),
                        },
                    );
                    hollow.push((c.clone(), ino));
                    report.kept += 1;
                    continue;
                }
            }
            match self.cleanup_in(c).await {
                Ok(()) => report.freed += 1,
                Err(e) => tracing::warn!(sandbox = %c, error = %e, "garbage collection"),
            }
        }
        // Re-link the lineage: each sandbox's parent is its nearest hollow ancestor.
        {
            let mut lin = self.lineage();
            let chains: Vec<(String, Vec<u64>)> = live
                .into_iter()
                .chain(hollow.iter().filter_map(|(h, _)| {
                    lin.nodes
                        .get(h)
                        .and_then(|n| n.agent)
                        .map(|p| (h.clone(), pidns_chain(p)))
                }))
                .collect();
            for (id, chain) in chains {
                let nearest = chain.iter().skip(1).find_map(|ino| {
                    hollow
                        .iter()
                        .find(|(_, i)| i == ino)
                        .map(|(h, _)| h.clone())
                });
                if let (Some(h), Some(n)) = (nearest, lin.nodes.get_mut(&id)) {
                    if n.parent.is_none() {
                        n.parent = Some(h);
                    }
                }
            }
        }
        // Snapshots a crash left in their private directory before renaming them into
        // place (a minute old: never one being taken now).
        for dir in ["sandboxes", "snapshots", "templates"] {
            report.staging += forkbox_sys::btrfs::remove_stale_staging(
                &self.pool.root().join(dir),
                forkbox_sys::btrfs::STALE_STAGING,
            );
        }
        // Layers nothing stands on any more.
        let pool = self.pool.clone();
        report.staging +=
            tokio::task::spawn_blocking(move || layers::sweep(&pool, layers::LAYER_GRACE))
                .await
                .unwrap_or(0);
        // Staging snapshots of forks this server's sandboxes were making.
        if let Ok(rd) = std::fs::read_dir(self.pool.root().join("sandboxes")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(".fork-") else {
                    continue;
                };
                let owner = rest.rsplit_once('-').map(|(o, _)| o).unwrap_or("");
                if (cands.contains(owner) || keep.contains(owner))
                    && delete_subvolume_patiently(&e.path()).is_ok()
                {
                    report.staging += 1;
                }
            }
        }
        Ok(report)
    }

    /// Reconnects to a sandbox an earlier server started: its PID 1 must still be a
    /// `forkbox-agent` in the sandbox's cgroup, and answer on its socket.
    pub(crate) async fn adopt(
        self: &Arc<Self>,
        spec: &CreateSpec,
        pid: i32,
        paused: bool,
    ) -> Result<Arc<JailInstance>, RuntimeError> {
        let id = spec.id.as_str();
        let gone = |why: String| RuntimeError::Unavailable(why);
        let pidfd = Arc::new(
            forkbox_sys::pidfd::open(pid).map_err(|e| gone(format!("process {pid}: {e}")))?,
        );
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if comm.trim() != "forkbox-agent" || !cgroups.contains(&format!("/{id}\n")) {
            return Err(gone(format!("process {pid} is no longer its agent")));
        }
        let cgroup = self
            .cgroups
            .open(id)
            .map_err(|e| RuntimeError::host("open cgroup", id, e))?;
        let run = self.run_dir.join(id);
        let client = AgentClient::connect_unix(&run.join("agent.sock"))
            .await
            .map_err(|e| gone(format!("its agent does not answer: {e}")))?;
        if !paused {
            match tokio::time::timeout(Duration::from_secs(5), client.health()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(gone(format!("its agent does not answer: {e}"))),
                Err(_) => return Err(gone("its agent does not answer".into())),
            }
        }
        let rootfs = self.pool.sandbox(id);
        let slot = self.claim_slot(pid);
        // The link survived with the sandbox; its proxy did not: link it afresh.
        let egress = self.attach_egress(spec, pid).await?;
        let alive = watch_liveness(&pidfd);
        Ok(Arc::new(JailInstance {
            id: id.to_owned(),
            pid,
            rootfs: rootfs.clone(),
            cgroup: cgroup.clone(),
            client,
            alive,
            resources: tokio::sync::Mutex::new(Resources {
                id: id.to_owned(),
                rootfs: Some(rootfs),
                cgroup: Some(cgroup),
                run_dir: Some(run),
                pidfd: Some(pidfd),
                pid: Some(pid),
                egress,
                keepalive: None,
                slot,
                nested: None,
                helper_ns: None,
            }),
            rt: self.clone(),
        }))
    }

    pub(crate) async fn cleanup_in(&self, id: &str) -> Result<(), RuntimeError> {
        // A snapshot of it a crash left in its staging directory (it is ours and
        // nothing else makes one under this name while we clean up).
        let sandboxes = self.pool.root().join("sandboxes");
        let mut staging = std::ffi::OsString::from(forkbox_sys::btrfs::STAGING_PREFIX);
        staging.push(id);
        let staging = sandboxes.join(staging);
        if staging.exists() {
            let (inner, dir) = (staging.join(id), staging.clone());
            tokio::task::spawn_blocking(move || {
                if inner.exists() {
                    delete_subvolume_patiently(&inner)?;
                }
                let _ = std::fs::remove_dir(&dir);
                Ok::<_, forkbox_sys::btrfs::BtrfsError>(())
            })
            .await
            .map_err(|e| RuntimeError::host("delete staging snapshot", id, e))?
            .map_err(|e| RuntimeError::host("delete staging snapshot", id, e))?;
        }
        let cgroup = self
            .cgroups
            .open(id)
            .map_err(|e| RuntimeError::host("open cgroup", id, e))?;
        let rootfs = self.pool.sandbox(id);
        let run_dir = self.run_dir.join(id);
        let mut res = Resources {
            id: id.to_owned(),
            rootfs: rootfs.exists().then_some(rootfs),
            cgroup: cgroup.exists().then_some(cgroup),
            run_dir: run_dir.exists().then_some(run_dir),
            pidfd: None,
            pid: None,
            egress: None,
            keepalive: None,
            slot: None,
            nested: None,
            helper_ns: None,
        };
        res.release().await
    }
}
