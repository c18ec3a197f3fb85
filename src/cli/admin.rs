//! `tensorcost-events admin …`: per-tenant rate-limit overrides and
//! Cognito memberships over the broker's REST API (`/v1/admin/…`), with a
//! token of scope `admin` and `events:all_tenants` and no tenant.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;

use super::rest::{Rest, RestArgs, segment};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// A tenant's emit rate limit: read, set or remove its override.
    #[command(subcommand)]
    RateLimit(RateLimitCommand),
    /// A Cognito user's tenants: read, replace or remove.
    #[command(subcommand)]
    Membership(MembershipCommand),
}

#[derive(Debug, Subcommand)]
pub enum RateLimitCommand {
    /// The tenant's limit and where it comes from (override, setting, default).
    Get(TenantArgs),
    /// Sets the tenant's override, in events per second.
    Set(SetRateArgs),
    /// Removes the tenant's override: back to the setting or the default.
    Delete(TenantArgs),
}

#[derive(Debug, Subcommand)]
pub enum MembershipCommand {
    /// The user's tenants.
    Get(SubArgs),
    /// Replaces the user's tenants.
    Set(SetMembershipArgs),
    /// Removes the user: a member of no tenant.
    Delete(SubArgs),
}

#[derive(Debug, Args)]
pub struct TenantArgs {
    pub tenant: String,
    #[command(flatten)]
    pub rest: RestArgs,
}

#[derive(Debug, Args)]
pub struct SetRateArgs {
    pub tenant: String,
    /// Events per second emitted to the tenant's sockets.
    pub events_per_second: u32,
    #[command(flatten)]
    pub rest: RestArgs,
}

#[derive(Debug, Args)]
pub struct SubArgs {
    /// The user's `cognito_sub`.
    pub cognito_sub: String,
    #[command(flatten)]
    pub rest: RestArgs,
}

#[derive(Debug, Args)]
pub struct SetMembershipArgs {
    /// The user's `cognito_sub`.
    pub cognito_sub: String,
    /// Tenant ids, one or more.
    #[arg(required = true)]
    pub tenants: Vec<String>,
    #[command(flatten)]
    pub rest: RestArgs,
}

const SCOPE: &str = "scope admin, with events:all_tenants and no tenant";

pub async fn run(command: AdminCommand) -> anyhow::Result<ExitCode> {
    let rate = |tenant: &str| format!("/v1/admin/tenants/{}/rate-limit", segment(tenant));
    let member = |sub: &str| format!("/v1/admin/memberships/{}", segment(sub));
    let answer = match command {
        AdminCommand::RateLimit(RateLimitCommand::Get(a)) => {
            Rest::new(&a.rest, SCOPE)?
                .call(Method::GET, &rate(&a.tenant), None)
                .await?
        }
        AdminCommand::RateLimit(RateLimitCommand::Set(a)) => {
            let body = serde_json::json!({ "events_per_second": a.events_per_second });
            Rest::new(&a.rest, SCOPE)?
                .call(Method::PUT, &rate(&a.tenant), Some(body.to_string()))
                .await?
        }
        AdminCommand::RateLimit(RateLimitCommand::Delete(a)) => {
            Rest::new(&a.rest, SCOPE)?
                .call(Method::DELETE, &rate(&a.tenant), None)
                .await?
        }
        AdminCommand::Membership(MembershipCommand::Get(a)) => {
            Rest::new(&a.rest, SCOPE)?
                .call(Method::GET, &member(&a.cognito_sub), None)
                .await?
        }
        AdminCommand::Membership(MembershipCommand::Set(a)) => {
            let body = serde_json::json!({ "tenants": a.tenants });
            Rest::new(&a.rest, SCOPE)?
                .call(Method::PUT, &member(&a.cognito_sub), Some(body.to_string()))
                .await?
        }
        AdminCommand::Membership(MembershipCommand::Delete(a)) => {
            Rest::new(&a.rest, SCOPE)?
                .call(Method::DELETE, &member(&a.cognito_sub), None)
                .await?;
            println!("deleted {}", a.cognito_sub);
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}
