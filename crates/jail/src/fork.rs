//! Forking a running jail sandbox: children made by the parent's agent, and the
//! Python REPL carried into them.

use super::*;
use tracing::Instrument as _;

impl JailInstance {
    /// See `docs/fork-design.md`: snapshot the frozen parent once per child, start each
    /// child nested in the parent's namespaces, fork the parent's Python kernel into
    /// them, and move each copy into its child's cgroup.
    pub(crate) async fn fork_children(
        &self,
        specs: Vec<CreateSpec>,
    ) -> Result<Forked, RuntimeError> {
        let id = self.id.as_str();
        if self.rt.lineage().depth(id) + 1 > MAX_FORK_DEPTH {
            return Err(RuntimeError::Rejected(format!(
                "sandbox {id} is already {MAX_FORK_DEPTH} forks deep (the kernel nests namespaces at most 32 levels); fork an earlier ancestor"
            )));
        }
        // 1. Filesystem: one read-only snapshot of the frozen parent's subvolume, a
        //    layer every child's root stands on (its `upper` when the parent is
        //    layered itself, under the parent's own layers).
        let t0 = std::time::Instant::now();
        // Each phase a span (exported over OTLP when configured; its duration is the
        // phase's): `fork.snapshot`, `fork.start_children`, `fork.carry_python`.
        let phase = tracing::info_span!("fork.snapshot", sandbox = id);
        let layer_id = format!("fork-{}-{}", self.id, &token()[..8]);
        let layer = self.rt.pool.layers().join(&layer_id);
        let below = layers::read_chain(&self.rt.pool.sandbox_chain(id))
            .map_err(|e| RuntimeError::host("read the parent's layers", id, e))?;
        let mut lowers = vec![Lower::Layer {
            id: layer_id.clone(),
            upper: below.is_some(),
        }];
        lowers.extend(below.unwrap_or_default());
        if lowers.len() > forkbox_sys::overlay::MAX_LOWERS {
            return Err(RuntimeError::Rejected(format!(
                "sandbox {id} stands on {} layers already (snapshots of snapshots); at most {} — fork an earlier one",
                lowers.len() - 1,
                forkbox_sys::overlay::MAX_LOWERS
            )));
        }
        // Named by a claim of this fork's own until the children's chains name it.
        let claim = layers::Pending::claim(&self.rt.pool, &layer_id)
            .map_err(|e| RuntimeError::host("claim the fork layer", id, e))?;
        self.freeze(true).await?;
        let (src, dst) = (self.rootfs.clone(), layer.clone());
        let snap =
            tokio::task::spawn_blocking(move || forkbox_sys::btrfs::snapshot(&src, &dst, true))
                .await;
        let thawed = self.freeze(false).await;
        let snap = match snap {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RuntimeError::host("snapshot parent", id, e)),
            Err(e) => Err(RuntimeError::host("snapshot parent", id, e)),
        };
        if let Some(e) = snap.err().or(thawed.err()) {
            let _ = delete_subvolume_patiently(&layer);
            return Err(e);
        }
        let t_snap = t0.elapsed();
        drop(phase);
        let phase = tracing::info_span!("fork.start_children", sandbox = id, n = specs.len());
        // 2. Children, concurrently, nested in our namespaces, in our uid range.
        let (family, cached) = {
            let r = self.resources.lock().await;
            (r.slot.clone(), r.nested.clone())
        };
        let nested = match (&family, cached) {
            (_, Some(n)) => Some(Ok(n)),
            (Some(s), None) => Some(
                self.rt
                    .agent
                    .as_ref()
                    .ok_or_else(|| std::io::Error::other("no agent image"))
                    .and_then(|a| a.nested_for(s.host_uid()).map_err(std::io::Error::other))
                    .map(Arc::new),
            ),
            (None, None) => None,
        };
        let (slot, nested) = match (family, nested) {
            (Some(slot), Some(Ok(nested))) if slot.index() > 0 => {
                self.resources.lock().await.nested = Some(nested.clone());
                (slot, nested)
            }
            (_, Some(Err(e))) => {
                let _ = delete_subvolume_patiently(&layer);
                return Err(RuntimeError::host("make the nested agent image", id, e));
            }
            _ => {
                let _ = delete_subvolume_patiently(&layer);
                return Err(RuntimeError::Conflict(format!(
                    "sandbox {id} has no uid range of its own (it predates them); hibernate and wake it to fork it"
                )));
            }
        };
        let cached = self.resources.lock().await.helper_ns.clone();
        let helper = match cached {
            Some(h) => h,
            None => match self.rt.helper_ns(id).await {
                Ok(h) => {
                    let h = Arc::new(h);
                    self.resources.lock().await.helper_ns = Some(h.clone());
                    h
                }
                Err(e) => {
                    let _ = delete_subvolume_patiently(&layer);
                    return Err(e);
                }
            },
        };
        let tokens: Vec<String> = specs.iter().map(|_| token()).collect();
        let started =
            futures_util::future::join_all(specs.iter().zip(&tokens).map(|(spec, token)| {
                self.rt.start(
                    spec,
                    Origin::Fork {
                        parent_pid: self.pid,
                        token: token.clone(),
                        lowers: lowers.clone(),
                        slot: slot.clone(),
                        nested: nested.clone(),
                        helper: helper.clone(),
                    },
                )
            }))
            // Each child's `create.*` phases are its children.
            .instrument(phase.clone())
            .await;
        drop(claim);
        let mut children: Vec<Arc<JailInstance>> = Vec::new();
        let mut failure = None;
        for r in started {
            match r {
                Ok(c) => children.push(c),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        // The layer stays while a child stands on it (swept after; `layers::sweep`);
        // a fork that made no child drops it now, off the request path.
        if children.is_empty() {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = delete_subvolume_patiently(&layer) {
                    tracing::warn!(path = %layer.display(), error = %e, "deleting an unused fork layer");
                }
            });
        }
        let t_start = t0.elapsed();
        drop(phase);
        let outcome = match failure {
            Some(e) => Err(e),
            None => {
                self.carry_python(&children, &tokens)
                    .instrument(tracing::info_span!("fork.carry_python", sandbox = id))
                    .await
            }
        };
        tracing::debug!(
            sandbox = id,
            n = specs.len(),
            snapshot_ms = t_snap.as_secs_f64() * 1e3,
            start_children_ms = (t_start - t_snap).as_secs_f64() * 1e3,
            carry_python_ms = (t0.elapsed() - t_start).as_secs_f64() * 1e3,
            "fork phases"
        );
        match outcome {
            Ok(python) => {
                for c in &children {
                    self.rt.track(&c.id, Some(self.id.clone()), Some(c.pid));
                }
                let mut carried = vec!["filesystem".to_owned()];
                if python {
                    carried.push("python".to_owned());
                }
                Ok(Forked {
                    children: children
                        .into_iter()
                        .map(|c| c as Arc<dyn Instance>)
                        .collect(),
                    carried,
                    not_carried: "running processes other than the Python REPL (commands, \
                                  background jobs, javascript and bash kernels), open files and \
                                  sockets of the REPL"
                        .into(),
                })
            }
            Err(e) => {
                for c in children {
                    let mut res = c.resources.lock().await;
                    let _ = res.release().await;
                }
                Err(e)
            }
        }
    }

    /// Forks our Python kernel (if one runs) into `children`; true when carried.
    pub(crate) async fn carry_python(
        &self,
        children: &[Arc<JailInstance>],
        tokens: &[String],
    ) -> Result<bool, RuntimeError> {
        let id = self.id.as_str();
        let agent_err = |e: forkbox_agent_client::AgentError| RuntimeError::Agent {
            id: id.to_owned(),
            source: e.into(),
        };
        // Each child's agent pid as our PID namespace numbers it.
        let depth = nspid(self.pid)
            .map_err(|e| RuntimeError::host("read parent's NSpid", id, e))?
            .len();
        let mut fork_children = Vec::new();
        for (c, token) in children.iter().zip(tokens) {
            let ns =
                nspid(c.pid).map_err(|e| RuntimeError::host("read child's NSpid", &c.id, e))?;
            let pid = *ns.get(depth - 1).ok_or_else(|| {
                RuntimeError::host(
                    "locate fork child",
                    &c.id,
                    std::io::Error::other("not nested in its parent"),
                )
            })?;
            fork_children.push(ForkChild {
                pid,
                token: token.clone(),
            });
        }
        let reply = self
            .client
            .fork(&ForkRequest {
                children: fork_children,
            })
            .await
            .map_err(agent_err)?;
        let errors: Vec<String> = (0..children.len())
            .map(|i| {
                reply.errors.get(i).cloned().unwrap_or_else(|| {
                    if reply.python {
                        "no answer for this child".into()
                    } else {
                        String::new()
                    }
                })
            })
            .collect();
        let adopts =
            futures_util::future::join_all(children.iter().zip(&errors).map(|(c, error)| {
                let req = AdoptRequest {
                    expect: reply.python && error.is_empty(),
                };
                async move { c.client.adopt(&req).await }
            }))
            .await;
        if !reply.python {
            return Ok(false);
        }
        for ((c, error), r) in children.iter().zip(errors).zip(adopts) {
            let r = r.map_err(|e| RuntimeError::Agent {
                id: c.id.clone(),
                source: e.into(),
            })?;
            if !error.is_empty() || r.pid.is_none() {
                return Err(RuntimeError::host(
                    "carry the Python REPL",
                    &c.id,
                    std::io::Error::other(if error.is_empty() {
                        "the child's agent never received its copy".to_owned()
                    } else {
                        error
                    }),
                ));
            }
        }
        // The copies were born in our cgroup: move each into its child's, found by
        // the PID namespace it now lives in.
        let mine = self
            .cgroup
            .pids()
            .map_err(|e| RuntimeError::host("list parent's processes", id, e))?;
        let by_ns: HashMap<PathBuf, Vec<i32>> =
            mine.into_iter().fold(HashMap::new(), |mut m, p| {
                if let Some(ns) = pidns_of(p) {
                    m.entry(ns).or_default().push(p);
                }
                m
            });
        for c in children {
            let Some(pids) = pidns_of(c.pid).and_then(|ns| by_ns.get(&ns)) else {
                continue;
            };
            for p in pids {
                c.cgroup
                    .add(*p)
                    .map_err(|e| RuntimeError::host("move REPL copy to its cgroup", &c.id, e))?;
            }
        }
        Ok(true)
    }
}
