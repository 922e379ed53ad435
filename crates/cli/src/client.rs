//! Client commands: `forkbox run` (one-shot code) and `forkbox sandbox …`, talking to a
//! server over HTTP (`--url`, or `FORKBOX_URL`, default http://127.0.0.1:7070).

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use forkbox_types::api::{
    CreateBody, ErrorBody, ExecBody, ForkBody, ForkView, ListView, SandboxView,
};
use forkbox_types::exec::{EventKind, ExecEvent};
use forkbox_types::ndjson::Decoder;
use futures_util::StreamExt;
use std::io::Write;
use std::process::ExitCode;

#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// Server URL.
    #[arg(
        long,
        env = "FORKBOX_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub url: String,
    /// API key (sent as a bearer token).
    #[arg(long, env = "FORKBOX_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Machine-readable output (JSON).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    conn: Conn,
    /// python, javascript (node), or bash.
    language: String,
    /// A file with the code (`-` for standard input).
    file: Option<String>,
    /// The code itself.
    #[arg(short = 'c', long = "code", conflicts_with = "file")]
    code: Option<String>,
    /// Template to run in.
    #[arg(long)]
    template: Option<String>,
    /// Seconds before the run is killed.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Create a sandbox; prints its id.
    Create {
        #[arg(long)]
        template: Option<String>,
        #[arg(long)]
        memory_mb: Option<u64>,
        #[arg(long)]
        cpu: Option<f64>,
        /// Seconds of life.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// List live sandboxes (`--all` for every one).
    Ls {
        #[arg(long)]
        all: bool,
    },
    /// Run a command in a sandbox, streaming its output; exits with its code.
    Exec {
        id: String,
        /// The command line (after `--`).
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// An interactive terminal in a sandbox (a login shell unless --cmd); exits with
    /// its exit code. With a pipe on stdin, the terminal settings are left alone and
    /// Ctrl-D is sent at the end of the input.
    Shell {
        id: String,
        /// Run this command line instead of the login shell.
        #[arg(long)]
        cmd: Option<String>,
    },
    /// Fork a sandbox into N children; prints their ids.
    Fork {
        id: String,
        #[arg(short = 'n', long, default_value_t = 1)]
        n: u32,
    },
    /// Make WINNER's state ID's (WINNER, a fork descendant of ID, is consumed).
    Merge { id: String, winner: String },
    /// Delete sandboxes.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
}

impl Api {
    pub(crate) fn new(c: &Conn) -> anyhow::Result<Api> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(k) = &c.api_key {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {k}").parse().context("api key")?,
            );
        }
        Ok(Api {
            http: reqwest::Client::builder()
                .default_headers(headers)
                .build()?,
            base: c.url.trim_end_matches('/').to_owned(),
        })
    }

    pub(crate) async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let r = req
            .send()
            .await
            .with_context(|| format!("cannot reach the forkbox server at {}", self.base))?;
        if !r.status().is_success() {
            let status = r.status();
            match r.json::<ErrorBody>().await {
                Ok(e) => bail!("{} ({status}, {})", e.error, e.code),
                Err(_) => bail!("request failed ({status})"),
            }
        }
        Ok(r)
    }

    /// `POST path` with `body`; the answer as `T`.
    pub(crate) async fn post<B: serde::Serialize + ?Sized, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let r = self
            .send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await?;
        r.json()
            .await
            .with_context(|| format!("unexpected answer to POST {path}"))
    }

    /// Runs an exec call, copying its output to ours; its exit code.
    async fn stream_exec(&self, id: &str, body: &ExecBody) -> anyhow::Result<i32> {
        let r = self
            .send(
                self.http
                    .post(format!("{}/v1/sandboxes/{id}/exec", self.base))
                    .json(body),
            )
            .await?;
        let mut stream = r.bytes_stream();
        let mut lines = Decoder::<ExecEvent>::default();
        let mut code = -1;
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        while let Some(chunk) = stream.next().await {
            lines.push(&chunk?);
            while let Some(ev) = lines.next_item() {
                match ev.context("bad exec event")?.kind {
                    EventKind::Stdout(d) => {
                        out.write_all(d.as_bytes())?;
                        out.flush()?;
                    }
                    EventKind::Stderr(d) => err.write_all(d.as_bytes())?,
                    EventKind::Exit(c) => code = c,
                }
            }
        }
        Ok(code)
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `forkbox run <language> <file|-c code>`: a throw-away sandbox runs the code.
pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&a.conn)?;
    let code = match (&a.code, a.file.as_deref()) {
        (Some(c), _) => c.clone(),
        (None, Some("-")) => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            s
        }
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("read {f}"))?,
        (None, None) => bail!("give a file or -c CODE"),
    };
    let (file, cmd) = match a.language.to_ascii_lowercase().as_str() {
        "python" | "python3" | "py" => ("/root/main.py", "python3 /root/main.py"),
        "javascript" | "js" | "node" | "nodejs" => ("/root/main.js", "node /root/main.js"),
        "bash" | "sh" | "shell" => ("/root/main.sh", "bash /root/main.sh"),
        other => bail!("unsupported language {other}; use python, javascript or bash"),
    };
    let body = CreateBody {
        timeout: Some((a.timeout.ceil() as u64).max(1) + 30),
        template: a.template.clone(),
        ..Default::default()
    };
    let sb: SandboxView = api.post("/v1/sandboxes", &body).await?;
    let id = sb.id;
    let result = async {
        api.send(
            api.http
                .put(format!("{}/v1/sandboxes/{id}/files", api.base))
                .query(&[("path", file)])
                .body(code),
        )
        .await?;
        let exec = ExecBody {
            cmd: Some(cmd.to_owned()),
            timeout: Some(a.timeout),
            ..Default::default()
        };
        api.stream_exec(&id, &exec).await
    }
    .await;
    let _ = api
        .send(api.http.delete(format!("{}/v1/sandboxes/{id}", api.base)))
        .await;
    Ok(exit_code(result?))
}

fn print_table(rows: &[SandboxView]) {
    println!(
        "{:<22} {:<10} {:<10} {:>6} {:>8}  PARENT",
        "ID", "STATUS", "TEMPLATE", "CPU", "MEM_MB"
    );
    for s in rows {
        println!(
            "{:<22} {:<10} {:<10} {:>6} {:>8}  {}",
            s.id,
            s.status,
            s.template,
            s.cpu,
            s.memory_mb,
            s.parent.as_deref().unwrap_or("-"),
        );
    }
}

/// `forkbox sandbox …`.
pub async fn sandbox(conn: Conn, cmd: SandboxCmd) -> anyhow::Result<ExitCode> {
    let api = Api::new(&conn)?;
    match cmd {
        SandboxCmd::Create {
            template,
            memory_mb,
            cpu,
            timeout,
        } => {
            let body = CreateBody {
                template,
                memory_mb,
                cpu,
                timeout,
                ..Default::default()
            };
            let v: SandboxView = api.post("/v1/sandboxes", &body).await?;
            if conn.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{}", v.id);
            }
        }
        SandboxCmd::Ls { all } => {
            let mut rows = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut q = vec![("limit", "1000".to_owned())];
                if all {
                    q.push(("status", "all".into()));
                }
                if let Some(t) = &token {
                    q.push(("next_token", t.clone()));
                }
                let r = api
                    .send(api.http.get(format!("{}/v1/sandboxes", api.base)).query(&q))
                    .await?;
                let page: ListView = r.json().await?;
                rows.extend(page.sandboxes);
                match page.next_token {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
            if conn.json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                print_table(&rows);
            }
        }
        SandboxCmd::Exec { id, cmd } => {
            let exec = ExecBody {
                cmd: Some(cmd.join(" ")),
                ..Default::default()
            };
            let code = api.stream_exec(&id, &exec).await?;
            return Ok(exit_code(code));
        }
        SandboxCmd::Shell { id, cmd } => {
            let code = crate::shell::shell(&api.base, conn.api_key.as_deref(), &id, cmd.as_deref())
                .await?;
            return Ok(exit_code(code));
        }
        SandboxCmd::Fork { id, n } => {
            let body = ForkBody {
                n: Some(n.into()),
                ..Default::default()
            };
            let v: ForkView = api.post(&format!("/v1/sandboxes/{id}/fork"), &body).await?;
            if conn.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                for c in v.children {
                    println!("{c}");
                }
            }
        }
        SandboxCmd::Merge { id, winner } => {
            let v: SandboxView = api
                .post(
                    &format!("/v1/sandboxes/{id}/merge_into/{winner}"),
                    &serde_json::json!({}),
                )
                .await?;
            if conn.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{id} now has the state of {winner}");
            }
        }
        SandboxCmd::Rm { ids } => {
            for id in ids {
                api.send(api.http.delete(format!("{}/v1/sandboxes/{id}", api.base)))
                    .await?;
                if !conn.json {
                    println!("deleted {id}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
