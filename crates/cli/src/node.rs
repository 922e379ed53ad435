//! `forkbox node ls|drain|undrain`: the nodes (servers) sharing a database, through
//! any of them (`--url`).

use crate::client::{Api, Conn};
use clap::Subcommand;
use forkbox_types::api::NodeList;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List the nodes: up or down, draining, sandboxes, URL.
    Ls,
    /// Place no new sandboxes on NAME; what runs there keeps running.
    Drain { name: String },
    /// Place new sandboxes on NAME again.
    Undrain { name: String },
}

pub async fn run(conn: Conn, cmd: NodeCmd) -> anyhow::Result<ExitCode> {
    let api = Api::new(&conn)?;
    let list: NodeList = match &cmd {
        NodeCmd::Ls => {
            api.send(api.http.get(format!("{}/v1/nodes", api.base)))
                .await?
                .json()
                .await?
        }
        NodeCmd::Drain { name } | NodeCmd::Undrain { name } => {
            let draining = matches!(cmd, NodeCmd::Drain { .. });
            api.post(
                &format!("/v1/nodes/{name}/drain"),
                &serde_json::json!({ "draining": draining }),
            )
            .await?
        }
    };
    if conn.json {
        println!("{}", serde_json::to_string(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<5} {:<9} {:>9}  URL",
        "NAME", "STATE", "DRAINING", "SANDBOXES"
    );
    for n in list.nodes {
        println!(
            "{:<20} {:<5} {:<9} {:>9}  {}{}",
            n.name,
            n.state,
            if n.draining { "yes" } else { "no" },
            n.sandboxes,
            n.url,
            if n.this { "  (answered)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
