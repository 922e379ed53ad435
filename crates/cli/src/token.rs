//! `forkbox token create|ls|revoke`: API keys, through a running server or, with
//! `--local`, straight in the data dir's database (how the first admin key is made).

use crate::client::{Api, Conn};
use anyhow::Context;
use clap::{Args, Subcommand};
use forkbox_core::auth::{self, Token};
use forkbox_core::store::Store;
use forkbox_types::api::{CreateTokenBody, TokenList, TokenView};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(flatten)]
    conn: Conn,
    /// Work on the database of the data dir instead of a server (no key needed; for
    /// the first admin key).
    #[arg(long, global = true)]
    local: bool,
    /// Data dir for `--local` (default as for `serve`).
    #[arg(long, env = "FORKBOX_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Database for `--local` (as for `serve`: a PostgreSQL URL, else the data dir's).
    #[arg(
        long,
        env = "FORKBOX_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database: Option<String>,
    #[command(subcommand)]
    cmd: TokenCmd,
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Make a key; prints it once.
    Create {
        /// A label for the key.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Its workspace (default: the caller's; `default` with `--local`).
        #[arg(long)]
        workspace: Option<String>,
        /// May manage every workspace's keys and quotas.
        #[arg(long)]
        admin: bool,
    },
    /// List keys (never the keys themselves).
    Ls,
    /// Revoke a key by id (`tok-…`); it fails from the next request on.
    Revoke { id: String },
}

pub async fn run(a: TokenArgs) -> anyhow::Result<()> {
    let tokens: Vec<TokenView> = if a.local {
        local(&a).await?
    } else {
        remote(&a).await?
    };
    if a.conn.json {
        let out = match a.cmd {
            TokenCmd::Ls => serde_json::to_string_pretty(&TokenList { tokens })?,
            _ => serde_json::to_string_pretty(&tokens.first())?,
        };
        println!("{out}");
        return Ok(());
    }
    if let (TokenCmd::Create { .. }, Some(t)) = (&a.cmd, tokens.first()) {
        println!("{}", t.key.as_deref().unwrap_or_default());
        eprintln!(
            "key {} of workspace {} made; it is shown only now",
            t.id, t.workspace
        );
        return Ok(());
    }
    println!(
        "{:<22} {:<16} {:<16} {:<12} {:<6} {:<21} REVOKED",
        "ID", "NAME", "WORKSPACE", "PREFIX", "ADMIN", "CREATED"
    );
    for t in tokens {
        println!(
            "{:<22} {:<16} {:<16} {:<12} {:<6} {:<21} {}",
            t.id,
            t.name,
            t.workspace,
            t.prefix,
            t.admin,
            t.created_at,
            t.revoked_at.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

async fn remote(a: &TokenArgs) -> anyhow::Result<Vec<TokenView>> {
    let api = Api::new(&a.conn)?;
    Ok(match &a.cmd {
        TokenCmd::Create {
            name,
            workspace,
            admin,
        } => {
            let body = CreateTokenBody {
                name: Some(name.clone()),
                workspace: workspace.clone(),
                admin: *admin,
                expires_in: None,
            };
            vec![api.post("/v1/auth/tokens", &body).await?]
        }
        TokenCmd::Ls => {
            let r = api
                .send(api.http.get(format!("{}/v1/auth/tokens", api.base)))
                .await?;
            r.json::<TokenList>().await?.tokens
        }
        TokenCmd::Revoke { id } => {
            let r = api
                .send(api.http.delete(format!("{}/v1/auth/tokens/{id}", api.base)))
                .await?;
            vec![r.json().await?]
        }
    })
}

async fn local(a: &TokenArgs) -> anyhow::Result<Vec<TokenView>> {
    let data = crate::config::HostArgs::default_data_dir(a.data_dir.as_deref());
    let db = crate::config::HostArgs::database_of(a.database.as_deref(), &data);
    if a.database.is_none() {
        std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    }
    let store = Store::open_target(&db)
        .await
        .with_context(|| format!("open database {}", forkbox_core::store::redacted(&db)))?;
    let view = |t: &Token| forkbox_api::token_view(t.clone());
    Ok(match &a.cmd {
        TokenCmd::Create {
            name,
            workspace,
            admin,
        } => {
            let ws = workspace.as_deref().unwrap_or(auth::DEFAULT_WORKSPACE);
            anyhow::ensure!(
                auth::valid_workspace(ws),
                "workspace must be 1-64 characters of a-z, 0-9, '-' and '_'"
            );
            let made = auth::issue(&store, &auth::new_key(), name, ws, *admin, None).await?;
            let mut v = view(&made.token);
            v.key = Some(made.key);
            vec![v]
        }
        TokenCmd::Ls => store.list_tokens(None).await?.iter().map(view).collect(),
        TokenCmd::Revoke { id } => {
            store.revoke_token(id).await?;
            let t = store.get_token(id).await?.with_context(|| {
                format!("no key {id} in {}", forkbox_core::store::redacted(&db))
            })?;
            vec![view(&t)]
        }
    })
}
