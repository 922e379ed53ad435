//! The `forkbox` command: `serve` runs the server; `template` prepares templates;
//! `bench` measures the spine's budgets.

mod bench;
mod client;
mod config;
mod serve;
mod shell;
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
    /// Manage API keys.
    Token(token::TokenArgs),
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
            Cmd::Serve(a) => serve::run(a).await,
            Cmd::Template {
                cmd: TemplateCmd::Prepare { host, name },
            } => {
                config::init_tracing(false);
                let rt = host.jail_runtime()?;
                rt.ensure_template(&name, &config::print_progress).await?;
                println!("template {name} ready");
                Ok(())
            }
            Cmd::Bench(a) => bench::run(a).await,
            Cmd::Token(a) => token::run(a).await,
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
