//! `forkbox bench --vm`: the vm runtime's rows, over real HTTP against a server in this
//! process running `jail,vm`, next to a bare `qemu-system-x86_64 -M microvm` boot of
//! the same kernel to a trivial init, measured in the same run. Written into the `vm`
//! section of `--markdown`.

use super::{
    children, in_process, ms, post_json, rows_table, time_echo_and_print, time_exec, BenchArgs, Row,
};
use anyhow::bail;
use std::time::{Duration, Instant};

/// Samples of the slow rows (cold boot, fork, hibernate, wake).
const FEW: usize = 5;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let data = args.host.data_dir();
    let assets = args.vm_assets.clone().unwrap_or_else(|| data.join("vm"));
    let (base, manager, srv) = in_process(args, &["jail", "vm"]).await?;
    let http = reqwest::Client::builder().build()?;
    let n = args.iterations.max(1);
    if !manager
        .runtimes_live()
        .iter()
        .any(|(name, _)| *name == "vm")
    {
        bail!(
            "this server has no vm runtime (assets in {}? `make vm-assets`)",
            assets.display()
        );
    }
    let create = |body: serde_json::Value| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let t = Instant::now();
            let v = post_json(&http, &format!("{base}/v1/sandboxes"), body).await?;
            let took = ms(t.elapsed());
            let id = v["id"].as_str().unwrap_or_default().to_owned();
            if v["runtime"] != "vm" {
                bail!("not a vm sandbox: {v}");
            }
            Ok::<_, anyhow::Error>((took, id))
        }
    };
    let delete = |id: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.delete(format!("{base}/v1/sandboxes/{id}"))
                .send()
                .await?;
            Ok::<_, anyhow::Error>(())
        }
    };
    let vm = serde_json::json!({"runtime": "vm"});

    // Cold boots: a boot image of the template is made in the background after each;
    // it is awaited (so it does not compete with the next sample) and removed (so the
    // next create boots).
    // The last one is kept: a parent whose RAM is a file of its own.
    let images = data.join("vm-run/images");
    let mut cold = Vec::with_capacity(FEW);
    let mut booted = String::new();
    for i in 0..FEW {
        let _ = std::fs::remove_dir_all(&images);
        let (took, id) = create(vm.clone()).await?;
        cold.push(took);
        if i + 1 < FEW {
            delete(id).await?;
        } else {
            booted = id;
        }
        wait_for_image(&images).await?;
    }
    // Fork into four, a parent made by a cold boot.
    let fork_booted = fork4(&http, &base, &booted).await?;
    delete(booted).await?;

    // The baseline: QEMU, the same kernel, a trivial init, nothing of forkbox's.
    let accel_now = match accel_of(&manager) {
        "kvm" => forkbox_vm::accel::Accel::Kvm,
        _ => forkbox_vm::accel::Accel::Tcg,
    };
    let mut bare = Vec::with_capacity(FEW);
    for i in 0..FEW {
        let took = forkbox_vm::accel::trivial_boot(
            std::path::Path::new("qemu-system-x86_64"),
            &assets.join("vmlinux"),
            &assets.join("busybox"),
            &data.join("vm-run").join(format!("bench-bare-{i}")),
            accel_now,
            Duration::from_secs(60),
        )
        .await;
        let _ = std::fs::remove_dir_all(data.join("vm-run").join(format!("bench-bare-{i}")));
        match took {
            Ok(Some(d)) => bare.push(ms(d)),
            Ok(None) => bail!("the bare microvm boot did not finish in 60 s"),
            Err(e) => bail!("bare microvm boot: {e}"),
        }
    }

    // Creates from the boot image (the vm runtime's warm pool).
    let mut pooled = Vec::with_capacity(n);
    for i in 0..n + 2 {
        let (took, id) = create(vm.clone()).await?;
        if i >= 2 {
            pooled.push(took);
        }
        delete(id).await?;
    }

    // Calls into a warm guest.
    let (_, id) = create(vm.clone()).await?;
    let url = format!("{base}/v1/sandboxes/{id}/exec");
    let (exec, run_code) = time_echo_and_print(&http, &url, n).await?;

    // Fork into four, a parent made from the boot image (whose RAM is a private
    // mapping of the image's: its device state alone and the pages it wrote).
    let fork_copy = fork4(&http, &base, &id).await?;
    // Hibernate (memory saved, QEMU gone) and wake (restored, agent answers).
    let (mut hibernate, mut wake) = (Vec::with_capacity(FEW), Vec::with_capacity(FEW));
    for _ in 0..FEW {
        let t = Instant::now();
        post_json(
            &http,
            &format!("{base}/v1/sandboxes/{id}/hibernate"),
            serde_json::json!({}),
        )
        .await?;
        hibernate.push(ms(t.elapsed()));
        let t = Instant::now();
        let v = post_json(
            &http,
            &format!("{base}/v1/sandboxes/{id}/wake"),
            serde_json::json!({}),
        )
        .await?;
        wake.push(ms(t.elapsed()));
        if v["memory_restored"] != true {
            bail!("wake did not restore memory: {v}");
        }
    }
    // The REPL's state survived fork, hibernate and wake (else this fails).
    time_exec(
        &http,
        &url,
        serde_json::json!({"code": "print(x)"}),
        "41\\n",
        0,
    )
    .await?;
    delete(id).await?;
    manager.shutdown().await;
    srv.abort();

    let rows = vec![
        Row {
            name: "bare `qemu-system-x86_64 -M microvm` boot of the kernel to a trivial init (baseline)",
            samples: bare,
            budget: None,
        },
        Row {
            name: "create → ready, cold boot (no boot image)",
            samples: cold,
            budget: None,
        },
        Row {
            name: "create → ready, copy of the template's boot image (the vm warm pool)",
            samples: pooled,
            budget: Some(150.0),
        },
        Row {
            name: "exec `echo hi` (warm guest)",
            samples: exec,
            budget: None,
        },
        Row {
            name: "run_code `print(1)` (warm guest REPL)",
            samples: run_code,
            budget: None,
        },
        Row {
            name: "fork n=4, parent booted cold (its RAM a file of its own; REPL and a background process)",
            samples: fork_booted,
            budget: Some(600.0),
        },
        Row {
            name: "fork n=4, parent a copy of the boot image (RAM a private mapping: the image's and the pages it wrote)",
            samples: fork_copy,
            budget: Some(600.0),
        },
        Row {
            name: "hibernate (memory saved, QEMU gone)",
            samples: hibernate,
            budget: None,
        },
        Row {
            name: "wake (memory restored, agent answers)",
            samples: wake,
            budget: None,
        },
    ];
    let (md, all_ok) = rows_table(&rows);
    let accel = accel_now.as_str();
    println!("forkbox bench --vm ({accel})\n\n{md}");
    if let Some(path) = &args.markdown {
        let body = format!(
            "Measured {} by `forkbox bench --vm --iterations {n}` (`make bench-vm`) on {}: \
             a server in-process with `jail,vm` ({accel}, 512 MiB guests, 1 vCPU), over \
             real HTTP on loopback; the bare boot in the same run. Slow rows (cold boot, \
             fork, hibernate, wake) have {FEW} samples.\n\n{md}",
            super::server::today(),
            super::server::host_line(),
        );
        super::server::write_section(path, "vm", "The vm runtime", &body)?;
    }
    if !all_ok {
        eprintln!("forkbox bench --vm: some figures are over budget");
    }
    Ok(())
}

/// Waits (up to two minutes) until a boot image exists in `images`.
async fn wait_for_image(images: &std::path::Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let made = std::fs::read_dir(images)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("captured.json").exists());
        if made {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no boot image was made in {} within 120 s",
                images.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The vm runtime's accelerator as the server reports it.
fn accel_of(manager: &forkbox_core::Manager) -> &'static str {
    manager
        .runtimes_live()
        .into_iter()
        .find(|(name, _)| *name == "vm")
        .and_then(|(_, a)| a)
        .unwrap_or("tcg")
}

/// Times `FEW` forks of `parent` into four (after one warm-up), each child checked to
/// carry the parent's processes and deleted, untimed. The parent first gets a REPL
/// variable and a background process.
async fn fork4(http: &reqwest::Client, base: &str, parent: &str) -> anyhow::Result<Vec<f64>> {
    let url = format!("{base}/v1/sandboxes/{parent}/exec");
    time_exec(
        http,
        &url,
        serde_json::json!({"code": "x = 41; print(x)"}),
        "41\\n",
        0,
    )
    .await?;
    post_json(
        http,
        &url,
        serde_json::json!({"cmd": "sleep 3600", "background": true}),
    )
    .await?;
    let mut out = Vec::with_capacity(FEW);
    for i in 0..FEW + 1 {
        let t = Instant::now();
        let v = post_json(
            http,
            &format!("{base}/v1/sandboxes/{parent}/fork"),
            serde_json::json!({"n": 4}),
        )
        .await?;
        let took = ms(t.elapsed());
        let kids = children(&v);
        if kids.len() != 4 || !v["carried"].to_string().contains("processes") {
            bail!("vm fork did not carry the guest: {v}");
        }
        if i >= 1 {
            out.push(took);
        }
        for k in kids {
            http.delete(format!("{base}/v1/sandboxes/{k}"))
                .send()
                .await?;
        }
    }
    Ok(out)
}
