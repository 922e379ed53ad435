//! `forkbox template build|ls|rm`: templates of a running server. `build -f
//! template.toml` takes the fields of `POST /v1/templates` in TOML and shows the
//! build's progress as it streams.

use crate::client::{Api, Conn};
use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// A template file: the body of `POST /v1/templates`, in TOML.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    base: Option<String>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    run: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    egress_allowlist: Option<Vec<String>>,
}

/// `forkbox template build`.
pub async fn build(conn: &Conn, file: &PathBuf, name: Option<String>) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let mut t: TemplateFile =
        toml::from_str(&text).with_context(|| format!("parse {}", file.display()))?;
    if let Some(n) = name {
        t.name = n;
    }
    let api = Api::new(conn)?;
    let r = api
        .send(
            api.http
                .post(format!("{}/v1/templates", api.base))
                .json(&serde_json::to_value(&t)?),
        )
        .await?;
    let fancy = !conn.json && std::io::stderr().is_terminal();
    let bar = if fancy {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb.set_message(format!("building template {}", t.name));
        Some(pb)
    } else {
        None
    };
    let mut stream = r.bytes_stream();
    let mut buf = Vec::new();
    let mut outcome: Option<Value> = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("the build stream broke off")?);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let ev: Value = serde_json::from_slice(&line).context("bad build event")?;
            if conn.json {
                println!("{ev}");
            }
            match ev["type"].as_str() {
                Some("progress") => {
                    let l = ev["data"].as_str().unwrap_or_default();
                    match &bar {
                        Some(pb) => {
                            pb.println(l);
                            pb.set_message(l.chars().take(120).collect::<String>());
                        }
                        None if !conn.json => eprintln!("{l}"),
                        None => {}
                    }
                }
                Some("ready") | Some("failed") => outcome = Some(ev),
                _ => {}
            }
        }
    }
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    let Some(ev) = outcome else {
        bail!(
            "the build stream ended without an outcome; see GET /v1/templates/{}",
            t.name
        );
    };
    if ev["type"] == "failed" {
        if !conn.json {
            eprintln!(
                "forkbox: template {} failed: {}",
                t.name,
                ev["error"].as_str().unwrap_or("unknown error")
            );
        }
        return Ok(ExitCode::FAILURE);
    }
    if !conn.json {
        let tpl = &ev["template"];
        println!(
            "template {} ready ({}, {:.0}s)",
            t.name,
            size(&tpl["size"]),
            tpl["build_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn size(v: &Value) -> String {
    match v.as_u64() {
        Some(b) if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
        None => "-".into(),
    }
}

/// `forkbox template ls`.
pub async fn ls(conn: &Conn) -> anyhow::Result<ExitCode> {
    let api = Api::new(conn)?;
    let r = api
        .send(api.http.get(format!("{}/v1/templates", api.base)))
        .await?;
    let v: Value = r.json().await?;
    let rows = v["templates"].as_array().cloned().unwrap_or_default();
    if conn.json {
        println!("{}", json!(rows));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<9} {:<16} {:>9}  {:<20}  PACKAGES",
        "NAME", "STATUS", "BASE", "SIZE", "CREATED"
    );
    for t in rows {
        let pk: Vec<&str> = t["packages"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "{:<24} {:<9} {:<16} {:>9}  {:<20}  {}",
            t["name"].as_str().unwrap_or(""),
            t["status"].as_str().unwrap_or(""),
            t["base"].as_str().unwrap_or(""),
            size(&t["size"]),
            t["created"].as_str().unwrap_or("").get(..19).unwrap_or(""),
            pk.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `forkbox template rm`.
pub async fn rm(conn: &Conn, names: &[String]) -> anyhow::Result<ExitCode> {
    let api = Api::new(conn)?;
    for n in names {
        api.send(api.http.delete(format!("{}/v1/templates/{n}", api.base)))
            .await
            .with_context(|| format!("delete template {n}"))?;
        if conn.json {
            println!("{}", json!({"deleted": n}));
        } else {
            println!("deleted {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
