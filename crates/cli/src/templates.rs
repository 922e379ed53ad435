//! `forkbox template build|import|ls|rm`: templates of a running server. `build -f
//! template.toml` takes the fields of `POST /v1/templates` in TOML (or a Dockerfile)
//! and shows the build's progress as it streams; `import` streams an OCI image
//! archive to `POST /v1/templates/{name}/image` and shows the import's.

use crate::client::{Api, Conn};
use anyhow::{bail, Context};
use forkbox_types::api::{BuildEvent, TemplateBody, TemplateList};
use forkbox_types::ndjson::Decoder;
use futures_util::StreamExt;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// Whether `file` is a Dockerfile by its name (`Dockerfile`, `*.Dockerfile`,
/// `Dockerfile.*`, any case).
fn is_dockerfile(file: &std::path::Path) -> bool {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name == "dockerfile" || name.ends_with(".dockerfile") || name.starts_with("dockerfile.")
}

/// The files under `dir` as a tar (names relative to it), base64: a build context.
fn context_tar(dir: &std::path::Path) -> anyhow::Result<String> {
    use base64::Engine as _;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)
        .with_context(|| format!("read the build context {}", dir.display()))?;
    let bytes = b.into_inner().context("make the build context's tar")?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `forkbox template build`.
pub async fn build(
    conn: &Conn,
    file: &PathBuf,
    name: Option<String>,
    build_args: &[String],
    context: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let mut args = std::collections::BTreeMap::new();
    for a in build_args {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("--build-arg {a}: expected KEY=VALUE"))?;
        args.insert(k.to_owned(), v.to_owned());
    }
    let t = if is_dockerfile(file) {
        // The server reads it (and says which line it cannot build).
        let Some(name) = name else {
            bail!("a Dockerfile names no template: give --name");
        };
        let context = match context {
            Some(dir) => Some(context_tar(dir)?),
            None => None,
        };
        TemplateBody {
            name,
            dockerfile: Some(text),
            build_args: args,
            context,
            ..Default::default()
        }
    } else {
        if !args.is_empty() || context.is_some() {
            bail!("--build-arg and --context go with a Dockerfile");
        }
        // A template file is the body of `POST /v1/templates`, in TOML.
        let mut t: TemplateBody =
            toml::from_str(&text).with_context(|| format!("parse {}", file.display()))?;
        if let Some(n) = name {
            t.name = n;
        }
        t
    };
    let api = Api::new(conn)?;
    let r = api
        .send(api.http.post(format!("{}/v1/templates", api.base)).json(&t))
        .await?;
    follow(conn, r, &t.name, "building").await
}

/// `forkbox template import`: the archive at `archive` (`-`: standard input) streamed.
pub async fn import(
    conn: &Conn,
    archive: &std::path::Path,
    name: &str,
    reference: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let body = if archive == std::path::Path::new("-") {
        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::io::stdin()))
    } else {
        let f = tokio::fs::File::open(archive)
            .await
            .with_context(|| format!("open {}", archive.display()))?;
        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20))
    };
    let api = Api::new(conn)?;
    let mut req = api
        .http
        .post(format!("{}/v1/templates/{name}/image", api.base))
        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
        .body(body);
    if let Some(r) = reference {
        req = req.query(&[("ref", r)]);
    }
    let r = api.send(req).await?;
    follow(conn, r, name, "importing").await
}

/// Shows a build's events as they stream; its outcome as the exit code.
async fn follow(
    conn: &Conn,
    r: reqwest::Response,
    name: &str,
    doing: &str,
) -> anyhow::Result<ExitCode> {
    let fancy = !conn.json && std::io::stderr().is_terminal();
    let bar = if fancy {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb.set_message(format!("{doing} template {name}"));
        Some(pb)
    } else {
        None
    };
    let mut stream = r.bytes_stream();
    let mut lines = Decoder::<BuildEvent>::default();
    let mut outcome: Option<BuildEvent> = None;
    while let Some(chunk) = stream.next().await {
        lines.push(&chunk.context("the build stream broke off")?);
        while let Some(ev) = lines.next_item() {
            let ev = ev.context("bad build event")?;
            if conn.json {
                println!("{}", serde_json::to_string(&ev)?);
            }
            match ev {
                BuildEvent::Progress { data } => match &bar {
                    Some(pb) => {
                        pb.println(&data);
                        pb.set_message(data.chars().take(120).collect::<String>());
                    }
                    None if !conn.json => eprintln!("{data}"),
                    None => {}
                },
                done => outcome = Some(done),
            }
        }
    }
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    match outcome {
        Some(BuildEvent::Ready { template }) => {
            if !conn.json {
                println!(
                    "template {name} ready ({}, {:.0}s)",
                    size(template.size),
                    template.build_seconds.unwrap_or(0.0)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(BuildEvent::Failed { error }) => {
            if !conn.json {
                eprintln!("forkbox: template {name} failed: {error}");
            }
            Ok(ExitCode::FAILURE)
        }
        _ => bail!("the build stream ended without an outcome; see GET /v1/templates/{name}"),
    }
}

fn size(v: Option<u64>) -> String {
    match v {
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
    let rows = r.json::<TemplateList>().await?.templates;
    if conn.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<9} {:<16} {:>9}  {:<20}  PACKAGES",
        "NAME", "STATUS", "BASE", "SIZE", "CREATED"
    );
    for t in rows {
        println!(
            "{:<24} {:<9} {:<16} {:>9}  {:<20}  {}",
            t.name,
            t.status,
            t.base,
            size(t.size),
            t.created.get(..19).unwrap_or(""),
            t.packages.join(" ")
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
            println!("{}", serde_json::json!({"deleted": n}));
        } else {
            println!("deleted {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
