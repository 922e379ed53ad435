//! The `forkbox` command: `serve` runs the server; `template` prepares (locally) or
//! builds, lists and deletes (through a server) templates;
//! `bench` measures the spine's budgets.

mod bench;
mod client;
mod config;
mod down;
mod node;
mod serve;
mod shell;
mod templates;
mod token;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "forkbox",
    version,
    about = "A self-hosted sandbox server for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Manage templates.
    Template {
        #[command(subcommand)]
        cmd: TemplateCmd,
    },
    /// Measure create and exec latency against the unshare+chroot baseline.
    Bench(bench::BenchArgs),
    /// Run code once in a throw-away sandbox; exits with its exit code.
    Run(client::RunArgs),
    /// Manage sandboxes of a running server.
    Sandbox {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::SandboxCmd,
    },
    /// Serve forkbox's tools to an MCP client over stdio (against a running server).
    Mcp {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Manage API keys.
    Token(token::TokenArgs),
    /// The nodes (servers) sharing a database: list, drain.
    Node {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: node::NodeCmd,
    },
    /// End every sandbox, VM, mount, cgroup and network namespace of a data dir whose
    /// server is gone (idempotent; says what it removed).
    Down(down::DownArgs),
    /// Watches a data dir's server and takes the data dir down when it stays gone
    /// (started by `serve`).
    #[command(hide = true)]
    Warden(down::WardenArgs),
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Build a template if it is missing (the default one unless named).
    Prepare {
        #[command(flatten)]
        host: config::HostArgs,
        /// Template name.
        #[arg(default_value = "python")]
        name: String,
    },
    /// Build a template on a server from a TOML file (the fields of POST
    /// /v1/templates: name, base, packages, run, env, workdir, egress_allowlist),
    /// showing its progress; exits non-zero when the build fails.
    Build {
        #[command(flatten)]
        conn: client::Conn,
        /// The template file: the fields of `POST /v1/templates` in TOML, or a
        /// Dockerfile (a file named `Dockerfile`, `*.Dockerfile` or `Dockerfile.*`;
        /// then `--name` is required).
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
        /// Build under this name instead of the file's.
        #[arg(long)]
        name: Option<String>,
        /// A Dockerfile's `ARG` value, `KEY=VALUE` (repeatable).
        #[arg(long = "build-arg", value_name = "KEY=VALUE")]
        build_args: Vec<String>,
        /// A Dockerfile's build context: the directory its `COPY` takes files from
        /// (sent as a tar; within the request size limit).
        #[arg(long, value_name = "DIR")]
        context: Option<std::path::PathBuf>,
    },
    /// Import an OCI image as a template on a server: an image archive (an OCI
    /// layout as a tar, e.g. `skopeo copy … oci-archive:image.tar`, or a `docker save`
    /// tar; `-` reads standard input), streamed; shows the import's progress; exits
    /// non-zero when it fails (a digest mismatch, a layer that cannot be applied).
    Import {
        #[command(flatten)]
        conn: client::Conn,
        /// The image archive (`-`: standard input).
        archive: std::path::PathBuf,
        /// Name of the template to make.
        #[arg(long)]
        name: String,
        /// Which image of the archive (its name or tag), when it holds several.
        #[arg(long = "ref")]
        reference: Option<String>,
    },
    /// List a server's templates.
    Ls {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Delete templates (refused while live sandboxes use them).
    Rm {
        #[command(flatten)]
        conn: client::Conn,
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("forkbox: start async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(a) => return client::run(a).await,
            Cmd::Sandbox { conn, cmd } => return client::sandbox(conn, cmd).await,
            Cmd::Node { conn, cmd } => return node::run(conn, cmd).await,
            Cmd::Serve(a) => serve::run(a).await,
            Cmd::Mcp { conn } => {
                let server = forkbox_mcp::Forkbox::new(conn.url, conn.api_key);
                forkbox_mcp::serve_stdio(server)
                    .await
                    .map_err(anyhow::Error::from)
            }
            Cmd::Template {
                cmd: TemplateCmd::Prepare { host, name },
            } => {
                config::init_tracing(false);
                let rt = host.jail_runtime()?;
                let netns = rt.egress_netns().to_owned();
                let had_netns = std::path::Path::new("/run/netns").join(&netns).exists();
                rt.ensure_template(&name, &config::print_progress).await?;
                // A recipe whose commands reach the network made the data dir's egress
                // namespace for its build sandbox; unless a server holds the data dir
                // now, nothing else uses it: it goes, as `forkbox down` would take it.
                if !had_netns {
                    if let Some(_lock) = down::try_hold(&host.data_dir())? {
                        forkbox_net::remove_netns(&netns).await;
                    }
                }
                println!("template {name} ready");
                Ok(())
            }
            Cmd::Template {
                cmd:
                    TemplateCmd::Build {
                        conn,
                        file,
                        name,
                        build_args,
                        context,
                    },
            } => {
                return templates::build(&conn, &file, name, &build_args, context.as_deref()).await
            }
            Cmd::Template {
                cmd:
                    TemplateCmd::Import {
                        conn,
                        archive,
                        name,
                        reference,
                    },
            } => return templates::import(&conn, &archive, &name, reference.as_deref()).await,
            Cmd::Template {
                cmd: TemplateCmd::Ls { conn },
            } => return templates::ls(&conn).await,
            Cmd::Template {
                cmd: TemplateCmd::Rm { conn, names },
            } => return templates::rm(&conn, &names).await,
            Cmd::Bench(a) => bench::run(a).await,
            Cmd::Token(a) => token::run(a).await,
            Cmd::Down(a) => {
                // What it removed goes to stdout; the log only says what went wrong.
                config::init_tracing_at(false, "warn");
                down::down(a).await
            }
            Cmd::Warden(a) => {
                config::init_tracing(false);
                down::warden(a).await
            }
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forkbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}
