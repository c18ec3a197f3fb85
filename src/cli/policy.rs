//! `tensorcost-events policy …`: the tenant's enforcement policies over
//! the broker's REST API (`/v1/policies`, `/v1/policy-simulations`),
//! through the same door as every other surface.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;

use super::rest::{Rest, RestArgs};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Every policy of the token's tenant, one JSON object per line.
    List(RestArgs),
    /// One policy.
    Get(IdArgs),
    /// Creates or replaces the policy a JSON file (`-`: standard input)
    /// holds; prints it as stored.
    Put(FileArgs),
    /// Deletes a policy.
    Delete(IdArgs),
    /// Dry-runs a policy file, or a stored policy (`--id`), over the
    /// tenant's recent events: what would have fired.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// The policy's id.
    pub id: String,
    #[command(flatten)]
    pub rest: RestArgs,
}

#[derive(Debug, Args)]
pub struct FileArgs {
    /// A JSON policy document (docs/policies.md); `-` reads standard input.
    pub file: PathBuf,
    #[command(flatten)]
    pub rest: RestArgs,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// A JSON policy document to try; or `--id`.
    #[arg(required_unless_present = "id", conflicts_with = "id")]
    pub file: Option<PathBuf>,
    /// A stored policy's id.
    #[arg(long)]
    pub id: Option<String>,
    /// How far back from `--until` (`24h`, `90m`).
    #[arg(long, default_value = "24h")]
    pub window: String,
    /// End of the span, RFC 3339 (default now).
    #[arg(long)]
    pub until: Option<String>,
    #[command(flatten)]
    pub rest: RestArgs,
}

const READ: &str = "scope enforcement:read";
const WRITE: &str = "scope enforcement:write";

fn read_document(file: &PathBuf) -> anyhow::Result<serde_json::Value> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))
}

/// The path of a policy (ids are letters, digits, `-` and `_`; anything
/// else is refused by the broker, named).
fn id_path(id: &str) -> String {
    format!("/v1/policies/{}", super::rest::segment(id))
}

pub async fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    let answer = match command {
        PolicyCommand::List(rest) => {
            let list = Rest::new(&rest, READ)?
                .call(Method::GET, "/v1/policies", None)
                .await?;
            for policy in list["policies"].as_array().into_iter().flatten() {
                println!("{policy}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        PolicyCommand::Get(args) => {
            Rest::new(&args.rest, READ)?
                .call(Method::GET, &id_path(&args.id), None)
                .await?
        }
        PolicyCommand::Put(args) => {
            let document = read_document(&args.file)?;
            let id = document["id"]
                .as_str()
                .context("the policy document has no \"id\"")?
                .to_string();
            Rest::new(&args.rest, WRITE)?
                .call(Method::PUT, &id_path(&id), Some(document.to_string()))
                .await?
        }
        PolicyCommand::Delete(args) => {
            Rest::new(&args.rest, WRITE)?
                .call(Method::DELETE, &id_path(&args.id), None)
                .await?;
            println!("deleted {}", args.id);
            return Ok(ExitCode::SUCCESS);
        }
        PolicyCommand::Simulate(args) => {
            let mut body = serde_json::json!({ "window": args.window });
            match (&args.file, &args.id) {
                (Some(file), _) => body["policy"] = read_document(file)?,
                (None, Some(id)) => body["policy_id"] = id.clone().into(),
                (None, None) => anyhow::bail!("give a policy file or --id"),
            }
            if let Some(until) = &args.until {
                body["until"] = until.clone().into();
            }
            Rest::new(&args.rest, READ)?
                .call(
                    Method::POST,
                    "/v1/policy-simulations",
                    Some(body.to_string()),
                )
                .await?
        }
    };
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}
