//! Memory images of a running VM: fork (children restored from one migration
//! stream) and hibernate (state to disk, QEMU stopped).

use super::*;

impl VmInstance {
    /// One child per spec from this VM's current state, every process and all memory
    /// included: the VM is stopped for the copy (disk snapshot, device state, sparse copy
    /// of its RAM file), then runs on; each child is a new QEMU mapping the RAM copy
    /// privately (copy-on-write) on its own qcow2 overlay of the frozen disk.
    pub(crate) async fn fork_in(&self, specs: Vec<CreateSpec>) -> Result<Forked, RuntimeError> {
        let rt = self.rt.clone();
        let io = |op: &'static str| {
            let id = self.id.clone();
            move |e: std::io::Error| RuntimeError::host(op, &id, e)
        };
        let layers = rt.cfg.run_dir.join("layers");
        std::fs::create_dir_all(&layers).map_err(io("fork"))?;
        let tag = format!(
            "{}-{}",
            self.id,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        // The frozen disk is shared by the parent (as its new backing) and the children,
        // so it lives outside every sandbox's run dir.
        let layer_disk = layers.join(format!("{tag}.qcow2"));
        let layer_state = layers.join(format!("{tag}.state"));
        let layer_ram = rt.cfg.ram_dir.join(format!("forkbox-vm-layer-{tag}.ram"));
        let (generation, current) = self.vm.active_disk();
        let size = image_size(&rt.cfg.qemu_img, &current).await?;
        let next = self.vm.dir.join(format!("disk-{}.qcow2", generation + 1));
        let state_file = std::fs::File::create(&layer_state).map_err(io("fork"))?;
        let started = Instant::now();
        let copied = {
            let mut g = self.qmp.lock().await;
            let q = g.as_mut().ok_or_else(|| {
                RuntimeError::host("fork", &self.id, std::io::Error::other("no QMP"))
            })?;
            let host = |e: qmp::QmpError| RuntimeError::host("fork", &self.id, e);
            q.stop().await.map_err(host)?;
            let r: Result<u64, RuntimeError> = async {
                // Disk first (migration inactivates the images until `cont`).
                std::fs::hard_link(&current, &layer_disk).map_err(io("fork"))?;
                overlay(&rt.cfg.qemu_img, &layer_disk, &next, size)
                    .await
                    .map_err(io("fork"))?;
                q.snapshot_disk("d0", &next).await.map_err(host)?;
                q.getfd("state", std::os::fd::AsFd::as_fd(&state_file))
                    .await
                    .map_err(host)?;
                q.save_devices_to_fd("state", Duration::from_secs(60))
                    .await
                    .map_err(host)?;
                let (from, to) = (self.ram.clone(), layer_ram.clone());
                tokio::task::spawn_blocking(move || sparse_copy(&from, &to))
                    .await
                    .map_err(|e| RuntimeError::host("fork", &self.id, e))?
                    .map_err(io("copy RAM"))
            }
            .await;
            let resumed = q.cont().await;
            match (r, resumed) {
                (Ok(n), Ok(())) => n,
                (Err(e), _) => {
                    let _ = std::fs::remove_file(&layer_ram);
                    let _ = std::fs::remove_file(&layer_state);
                    let _ = std::fs::remove_file(&next);
                    return Err(e);
                }
                (Ok(_), Err(e)) => return Err(host(e)),
            }
        };
        drop(state_file);
        tracing::info!(
            sandbox = %self.id,
            paused_ms = started.elapsed().as_millis() as u64,
            ram_copied_mib = copied >> 20,
            "vm fork: parent state taken"
        );
        let boots = specs.iter().map(|spec| {
            let rt = rt.clone();
            let (layer_disk, layer_state, layer_ram) =
                (layer_disk.clone(), layer_state.clone(), layer_ram.clone());
            let initrd = self.vm.initrd.clone();
            let parent_dir = self.vm.dir.clone();
            async move {
                let dir = rt.cfg.run_dir.join(&spec.id);
                let vm = Vm::paths(&dir);
                let io = |e: std::io::Error| RuntimeError::host("fork child", &spec.id, e);
                std::fs::create_dir_all(&dir).map_err(io)?;
                let made = async {
                    // The child holds a name of every layer under its disk (see
                    // `collect_layers`): the parent's frozen generations and its refs.
                    for (src, name) in chain_refs(&parent_dir, generation) {
                        std::fs::hard_link(&src, dir.join(name)).map_err(io)?;
                    }
                    overlay(&rt.cfg.qemu_img, &layer_disk, &vm.disk, size)
                        .await
                        .map_err(io)?;
                    // Only for QEMU's command line: the guest's memory is the parent's.
                    std::fs::copy(&initrd, &vm.initrd).map_err(io)?;
                    let child = rt
                        .boot(
                            spec,
                            Source::Fork {
                                state: &layer_state,
                                ram: &layer_ram,
                            },
                        )
                        .await?;
                    // Its memory is the parent's, hostname included: its own id instead.
                    if let Err(e) = child.client()?.set_hostname(&spec.id).await {
                        let _ = child.destroy().await;
                        return Err(child.agent_err(e));
                    }
                    Ok(child)
                }
                .await;
                if made.is_err() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                made
            }
        });
        let results = futures_util::future::join_all(boots).await;
        // Every child has its private mapping now; the copy's pages live on in them.
        let _ = std::fs::remove_file(&layer_ram);
        let _ = std::fs::remove_file(&layer_state);
        let mut children: Vec<Arc<dyn Instance>> = Vec::new();
        let mut failure = None;
        for r in results {
            match r {
                Ok(i) => children.push(i),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            for c in children {
                let _ = c.destroy().await;
            }
            return Err(e);
        }
        tracing::info!(
            sandbox = %self.id,
            children = specs.len(),
            total_ms = started.elapsed().as_millis() as u64,
            "vm fork done"
        );
        Ok(Forked {
            children,
            carried: vec![
                "filesystem".into(),
                "memory".into(),
                "processes".into(),
                "python".into(),
            ],
            not_carried: "nothing inside the guest (it is copied whole); connections held \
                          from outside, such as open terminals and streams, stay with the parent"
                .into(),
        })
    }

    /// Saves the whole VM (device state and RAM) into its run dir and stops QEMU.
    pub(crate) async fn hibernate_in(&self) -> Result<(), RuntimeError> {
        let host = |e: qmp::QmpError| RuntimeError::host("hibernate", &self.id, e);
        let tmp = self.vm.state.with_extension("tmp");
        let file = std::fs::File::create(&tmp)
            .map_err(|e| RuntimeError::host("hibernate", &self.id, e))?;
        let saved = {
            let mut g = self.qmp.lock().await;
            let q = g.as_mut().ok_or_else(|| {
                RuntimeError::host("hibernate", &self.id, std::io::Error::other("no QMP"))
            })?;
            q.stop().await.map_err(host)?;
            let r = async {
                q.getfd("state", std::os::fd::AsFd::as_fd(&file)).await?;
                q.save_to_fd("state", Duration::from_secs(300)).await
            }
            .await;
            if r.is_err() {
                let _ = q.cont().await;
            }
            r
        };
        drop(file);
        if let Err(e) = saved {
            let _ = std::fs::remove_file(&tmp);
            return Err(host(e));
        }
        std::fs::rename(&tmp, &self.vm.state)
            .map_err(|e| RuntimeError::host("hibernate", &self.id, e))?;
        self.stop_qemu().await;
        Ok(())
    }
}
