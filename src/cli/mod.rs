//! The binary's commands: `serve`, `publish`, `tail`, `token`,
//! `check-token`, `version`. Client commands talk gRPC to a running broker
//! like any other client; they hold no broker logic.

mod admin;
mod dev;
mod policy;
mod rest;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::auth::{self, Authenticator, Scopes, rbac};
use crate::config::Settings;
use crate::event::Event;
use crate::proto::event_broker_client::EventBrokerClient;
use crate::proto::{self, PublishRequest, SubscribeRequest, subscribe_response};
use crate::server;

#[derive(Debug, Parser)]
#[command(
    name = "tensorcost-events",
    version,
    about = "Multi-tenant real-time event broker",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker. With no configuration: a single instance in
    /// development mode with a generated secret.
    Serve(Box<Settings>),
    /// Publish one event.
    Publish(PublishArgs),
    /// Follow events, one JSON envelope per line.
    Tail(TailArgs),
    /// Mint an HS256 token with the configured secret.
    Token(TokenArgs),
    /// Say whether a token is accepted, and why not.
    CheckToken(CheckTokenArgs),
    /// Serve MCP on standard input and output (Claude Desktop, local
    /// agents): relayed to the broker at TC_SERVER, or with a broker run in
    /// this process when TC_SERVER is not set.
    Mcp(Box<McpArgs>),
    /// Read or change the tenant's settings (REST on the HTTP listener).
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// List, read, create, change, delete and dry-run the tenant's
    /// enforcement policies (REST on the HTTP listener).
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Per-tenant rate-limit overrides and Cognito memberships (REST on the
    /// HTTP listener; a token of scope admin for every tenant).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Check a configuration file and print the effective settings, or
    /// print a complete commented one.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Exit 0 when the broker on this host answers `/healthz` (or
    /// `/readyz`): a container's HEALTHCHECK without curl in the image.
    Healthcheck(HealthcheckArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The broker's HTTP listen address, as `serve` reads it; an
    /// unspecified address (0.0.0.0, ::) means this host.
    #[arg(long, env = "TC_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: std::net::SocketAddr,
    /// Set when the listener speaks TLS (as `serve` reads it): the check
    /// then uses https, without checking the certificate (it is this host).
    #[arg(long, env = "TC_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Check `/readyz` (ready for traffic) instead of `/healthz` (alive).
    #[arg(long)]
    ready: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check FILE (default: TC_CONFIG, else none) with the environment, and
    /// print the effective settings as TOML, each with where it came from
    /// (secrets masked). Exits 2 naming the line of a bad value.
    Check {
        /// The configuration file.
        file: Option<PathBuf>,
    },
    /// Print a configuration file with every setting at its default,
    /// commented out, under its help text.
    Example,
}

/// The command line, with the configuration file of `serve` or `mcp`
/// (`--config`, `TC_CONFIG`) read first: its values become the settings'
/// defaults, so the environment and flags override them.
pub fn parse() -> anyhow::Result<Cli> {
    use clap::{CommandFactory, FromArgMatches};
    let cli = Cli::parse();
    let path = match &cli.command {
        Command::Serve(settings) => settings.config.clone(),
        Command::Mcp(args) => args.settings.config.clone(),
        _ => None,
    };
    let Some(path) = path else {
        return Ok(cli);
    };
    let file = crate::config::file::ConfigFile::load(&path)?;
    let command = Cli::command()
        .mut_subcommand("serve", |c| file.apply(c))
        .mut_subcommand("mcp", |c| file.apply(c));
    Cli::from_arg_matches(&command.get_matches()).map_err(|e| e.exit())
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Broker gRPC address.
    #[arg(long, env = "TC_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Bearer token (`serve` prints one in development mode).
    #[arg(long, env = "TC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub ca: crate::tls::CaArgs,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Event type, e.g. cost.updated.
    #[arg(long = "type", short = 't')]
    pub event_type: String,
    /// Payload as JSON text; `-` reads standard input.
    #[arg(long, short = 'd', default_value = "{}")]
    pub data: String,
    /// Your own event id (default: the broker stamps a UUIDv7).
    #[arg(long)]
    pub id: Option<String>,
    /// Tenant to publish for (tokens with scope events:all_tenants only).
    #[arg(long)]
    pub tenant: Option<String>,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Comma-separated types or prefixes, e.g. 'cost.*,alert.created'.
    #[arg(long, default_value = "")]
    pub types: String,
    /// Resume after this event id.
    #[arg(long)]
    pub since: Option<String>,
    /// Tenant to follow (tokens with scope events:all_tenants only).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// The token's tenant's MCP settings; with options, changed first
    /// (read, changed, written back) and printed as they now are.
    Mcp(McpSettingsArgs),
}

#[derive(Debug, Args)]
pub struct McpSettingsArgs {
    /// The broker, and a token with scope settings:read (settings:write to
    /// change).
    #[command(flatten)]
    pub rest: rest::RestArgs,
    /// The tenant's MCP tools answer at all.
    #[arg(long)]
    pub enabled: Option<bool>,
    /// Write tools may run (with a grant for each).
    #[arg(long)]
    pub write_tools_enabled: Option<bool>,
    /// Grant a write tool, e.g. recommendations.accept (repeatable).
    #[arg(long, value_name = "TOOL")]
    pub grant: Vec<String>,
    /// Take a write tool's grant back (repeatable).
    #[arg(long, value_name = "TOOL")]
    pub revoke: Vec<String>,
}

#[derive(Debug, Args)]
pub struct McpArgs {
    /// A running broker's HTTP address (`http://127.0.0.1:8080`, or its
    /// `/mcp` URL): relay every message to it. Unset: run a broker in this
    /// process, with the settings `serve` takes.
    #[arg(long, env = "TC_SERVER")]
    pub server: Option<String>,
    /// Bearer token: whose tenant and scopes the tools act with.
    #[arg(long, env = "TC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The tenant to act for, for a Cognito user of several tenants.
    #[arg(long, env = "TC_ACTIVE_TENANT")]
    pub active_tenant: Option<String>,
    #[command(flatten)]
    pub ca: crate::tls::CaArgs,
    #[command(flatten)]
    pub settings: Settings,
}

/// Where the HS256 secret comes from for `token` and `check-token`.
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// HS256 secret the broker uses (default: that of a broker running in
    /// development mode, from its secret file).
    #[arg(long, env = "TC_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Where a broker in development mode keeps its secret.
    #[arg(long, env = "TC_DEV_SECRET_FILE")]
    pub dev_secret_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The secret, and whether it is development mode's (said on standard
    /// error).
    fn resolve(self) -> anyhow::Result<(String, bool)> {
        let file = self.dev_secret_file.or_else(dev::default_secret_file);
        let (secret, note) = dev::client_secret(self.secret, file.as_deref())?;
        if let Some(note) = &note {
            eprintln!("# {note}");
        }
        Ok((secret, note.is_some()))
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Tenant claim (tenantId).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Space- or comma-separated scopes.
    #[arg(long, default_value = rbac::DEFAULT_SCOPES)]
    pub scope: String,
    /// Lifetime, e.g. 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Subject claim.
    #[arg(long)]
    pub sub: Option<String>,
    /// agent_id claim: the caller is this agent, and its gRPC streams are
    /// announced as agent.connected / agent.disconnected.
    #[arg(long)]
    pub agent_id: Option<String>,
    #[command(flatten)]
    pub secret: SecretArgs,
}

#[derive(Debug, Args)]
pub struct CheckTokenArgs {
    /// The token (default: TC_TOKEN).
    #[arg(env = "TC_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// Scopes of a token without a scope claim, as the broker is configured.
    #[arg(long, env = "TC_DEFAULT_SCOPES", default_value = rbac::DEFAULT_SCOPES)]
    pub default_scopes: String,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(settings) => serve(*settings).await,
        Command::Config(ConfigCommand::Example) => {
            print!("{}", crate::config::file::example());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let path = file.or_else(|| std::env::var_os("TC_CONFIG").map(PathBuf::from));
            let file = path
                .as_deref()
                .map(crate::config::file::ConfigFile::load)
                .transpose()?;
            print!("{}", crate::config::file::check(file.as_ref())?);
            if let Some(file) = &file {
                eprintln!("{}: ok", file.path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish(args) => publish(args).await,
        Command::Tail(args) => tail(args).await,
        Command::Token(args) => token(args),
        Command::CheckToken(args) => check_token(args).await,
        Command::Mcp(args) => mcp(*args).await,
        Command::Settings(SettingsCommand::Mcp(args)) => mcp_settings(args).await,
        Command::Policy(command) => policy::run(command).await,
        Command::Admin(command) => admin::run(command).await,
        Command::Healthcheck(args) => healthcheck(args).await,
        Command::Version => {
            println!(
                "tensorcost-events {} (gRPC API tensorcost.events.v1)",
                env!("CARGO_PKG_VERSION")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<ExitCode> {
    crate::telemetry::init(&settings.log);
    let (secret, dev_mode) = match settings
        .auth
        .jwt_secret
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        Some(s) => {
            if s.len() < 32 {
                tracing::warn!(
                    "TC_JWT_SECRET is {} bytes; use at least 32 random bytes",
                    s.len()
                );
            }
            (s.to_string(), false)
        }
        None => (auth::generate_secret(), true),
    };
    let mut settings = settings;
    if dev_mode {
        settings.listen.dev_token = Some(dev::token(&secret)?);
    }
    let running = server::start(&settings, secret.as_bytes()).await?;
    // Removed (if still this run's) when serve returns.
    let mut _secret_file = None;
    if dev_mode {
        let path = settings
            .listen
            .dev_secret_file
            .clone()
            .or_else(dev::default_secret_file);
        let written = path.as_deref().and_then(|p| {
            dev::SecretFile::write(p, &secret, running.grpc_addr, running.http_addr)
                .map_err(|e| {
                    tracing::warn!("{e:#}: client commands will not find the development secret")
                })
                .ok()
        });
        let shown = written.is_some().then_some(path.as_deref()).flatten();
        let token = settings.listen.dev_token.as_deref().unwrap_or_default();
        dev::print_banner(token, running.grpc_addr, running.http_addr, shown)?;
        _secret_file = written;
    }
    let shutdown = running.shutdown_token();
    tokio::select! {
        () = server::signal() => tracing::info!("shutting down"),
        () = shutdown.cancelled() => {}
    }
    running.stop().await?;
    Ok(ExitCode::SUCCESS)
}

/// `GET /healthz` (or `/readyz`) on this host's listener within 3 s.
async fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let mut addr = args.http_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let path = if args.ready { "readyz" } else { "healthz" };
    let url = format!("{scheme}://{addr}/{path}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .tls_danger_accept_invalid_certs(true)
        .build()?;
    match client.get(&url).send().await {
        Ok(answer) if answer.status().is_success() => {
            println!("{url}: {}", answer.status());
            Ok(ExitCode::SUCCESS)
        }
        Ok(answer) => {
            eprintln!("{url}: {}", answer.status());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            eprintln!("{url}: {text}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn mcp(args: McpArgs) -> anyhow::Result<ExitCode> {
    crate::telemetry::init(&args.settings.log);
    let token = args
        .token
        .as_deref()
        .filter(|t| !t.trim().is_empty())
        .context(
            "no token: set TC_TOKEN (the tools act with its tenant and scopes; `token` mints one)",
        )?;
    let tenant = args.active_tenant.as_deref().filter(|t| !t.is_empty());
    match args.server.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(server) => crate::mcp::stdio::relay(server, token, tenant, &args.ca).await?,
        None => crate::mcp::stdio::in_process(&args.settings, token, tenant).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn mcp_settings(args: McpSettingsArgs) -> anyhow::Result<ExitCode> {
    const PATH: &str = "/v1/settings/mcp";
    let rest = rest::Rest::new(
        &args.rest,
        "scope settings:read, or settings:write to change",
    )?;
    let mut settings = rest.call(reqwest::Method::GET, PATH, None).await?;
    let changing = args.enabled.is_some()
        || args.write_tools_enabled.is_some()
        || !args.grant.is_empty()
        || !args.revoke.is_empty();
    if changing {
        if let Some(enabled) = args.enabled {
            settings["enabled"] = enabled.into();
        }
        if let Some(write) = args.write_tools_enabled {
            settings["write_tools_enabled"] = write.into();
        }
        let mut grants: Vec<String> = settings["write_grants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(str::to_string))
            .filter(|g| !args.revoke.contains(g))
            .collect();
        for grant in args.grant {
            if !grants.contains(&grant) {
                grants.push(grant);
            }
        }
        settings["write_grants"] = grants.into();
        settings = rest
            .call(reqwest::Method::PUT, PATH, Some(settings.to_string()))
            .await?;
    }
    println!("{settings}");
    Ok(ExitCode::SUCCESS)
}

/// Adds the bearer token to every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = EventBrokerClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let token = args
        .token
        .as_deref()
        .context("no token: pass --token or set TC_TOKEN (`serve` prints one in development mode; `token` mints one)")?;
    let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
        .context("token: contains characters that cannot go in a header")?;
    let channel = crate::tls::grpc_channel(&args.server, &args.ca).await?;
    Ok(
        EventBrokerClient::with_interceptor(channel, Bearer(Some(value)))
            .max_decoding_message_size(usize::MAX),
    )
}

/// Prints a refusal the way the broker worded it.
fn refused(status: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let data = if args.data == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)
            .context("cannot read data from standard input")?;
        buf
    } else {
        args.data
    };
    let mut client = connect(&args.client).await?;
    let request = PublishRequest {
        events: vec![proto::Event {
            id: args.id.unwrap_or_default(),
            r#type: args.event_type,
            tenant_id: args.tenant.unwrap_or_default(),
            data,
            ..Default::default()
        }],
    };
    let response = client.publish(request).await.map_err(|s| refused(&s))?;
    for result in response.into_inner().results {
        println!(
            "{{\"id\":{},\"duplicate\":{}}}",
            serde_json::Value::from(result.id),
            result.duplicate
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    let types: Vec<String> = args
        .types
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    let mut since = args.since.unwrap_or_default();
    let mut printed = 0u64;
    let mut out = std::io::stdout();
    loop {
        let request = SubscribeRequest {
            types: types.clone(),
            since_id: since.clone(),
            tenant_id: args.tenant.clone().unwrap_or_default(),
            max_batch: 64,
        };
        let mut stream = client
            .subscribe(request)
            .await
            .map_err(|s| refused(&s))?
            .into_inner();
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(m) => m,
                // Too slow: resume after the last event printed.
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    eprintln!("# {}; resuming", s.message());
                    break;
                }
                Err(s) => return Err(refused(&s)),
            };
            let mut events = Vec::new();
            match message.message {
                Some(subscribe_response::Message::Status(st)) => {
                    if st.resumed {
                        eprintln!(
                            "# following {}: resumed, recovered={}, {} replayed",
                            st.tenant_id, st.recovered, st.replayed
                        );
                    } else {
                        eprintln!("# following {}", st.tenant_id);
                    }
                }
                Some(subscribe_response::Message::Event(e)) => events.push(e),
                Some(subscribe_response::Message::Events(batch)) => events = batch.events,
                None => {}
            }
            for e in events.drain(..) {
                if print_event(&mut out, &e, &mut since, &mut printed, args.count)? {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        if since.is_empty() {
            bail!("the broker ended the stream");
        }
    }
}

/// Prints one envelope; true once `count` events have been printed.
fn print_event(
    out: &mut std::io::Stdout,
    e: &proto::Event,
    since: &mut String,
    printed: &mut u64,
    count: Option<u64>,
) -> anyhow::Result<bool> {
    since.clone_from(&e.id);
    writeln!(out, "{}", Event::from_received(e.clone()).to_json())?;
    out.flush()?;
    *printed += 1;
    Ok(count.is_some_and(|n| *printed >= n))
}

fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let (secret, _) = args.secret.resolve()?;
    let scopes: BTreeSet<String> = args
        .scope
        .split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if args.tenant.is_none() && !scopes.contains(rbac::ALL_TENANTS) {
        bail!(
            "--tenant is required (only a token with scope {} may have none)",
            rbac::ALL_TENANTS
        );
    }
    let token = auth::mint_agent_hs256(
        secret.as_bytes(),
        args.tenant.as_deref(),
        args.sub.as_deref(),
        Some(&scopes),
        args.ttl,
        args.agent_id.as_deref(),
    )?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

async fn check_token(args: CheckTokenArgs) -> anyhow::Result<ExitCode> {
    let (secret, development) = args.secret.resolve()?;
    let auth = Authenticator::new(
        secret.as_bytes(),
        Scopes::parse(&args.default_scopes.replace(',', " ")),
    );
    match auth.verify(args.token.trim(), None).await {
        Ok(identity) => {
            let now = crate::clock::unix_secs();
            let left = Duration::from_secs(identity.expires_at.saturating_sub(now));
            println!(
                "accepted: tenant={} subject={} scopes={} expires={} (in {})",
                identity.tenant.as_deref().unwrap_or("(all tenants)"),
                identity.subject.as_deref().unwrap_or("(none)"),
                identity.scopes,
                crate::clock::format_unix_secs(identity.expires_at),
                humantime::format_duration(left)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let hint = match e {
                auth::AuthError::InvalidSignature if development => {
                    " (development mode makes a new secret each time serve starts: use the token it printed last)"
                }
                _ => "",
            };
            println!("refused: {e}{hint}");
            Ok(ExitCode::from(1))
        }
    }
}
