//! `tc-loadgen`: drives tensorcost-events and the systems users would pick
//! instead (nats-server, a Node.js socket.io 4.8 server, Redis itself) from
//! outside, like real clients, in one run, and writes the figures as JSON
//! and Markdown. `bench/run` installs the peers, builds, runs this and
//! draws the chart.
//!
//!     tc-loadgen --broker target/release/tensorcost-events --size full --out bench/results/full

mod clients;
mod mcp;
mod policies;
mod procs;
mod report;
mod scenarios;
mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Size {
    /// Runs in about a minute: proves the harness works (CI).
    Small,
    /// The sizes the targets are about.
    Full,
}

#[derive(Debug, Parser)]
#[command(
    name = "tc-loadgen",
    about = "Benchmarks tensorcost-events against its peers"
)]
pub struct Config {
    /// The tensorcost-events binary to run.
    #[arg(long)]
    pub broker: PathBuf,
    /// The Node.js Socket.IO peer's directory (with node_modules installed).
    #[arg(long, default_value = "bench/peers/socketio-server")]
    pub node_peer: PathBuf,
    #[arg(long, value_enum, default_value = "small")]
    pub size: Size,
    /// Scenarios to run, comma separated (6, the soak run, takes 10
    /// minutes at full size; 7 is webhooks, 8 the MCP server, 9 policies, 10
    /// the fan-out below saturation).
    #[arg(long, default_value = "1,2,3,4,5,6,7,8,9,10")]
    pub scenarios: String,
    /// Where results.json and results.md go.
    #[arg(long)]
    pub out: PathBuf,
}

fn main() -> ExitCode {
    let config = Config::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let wanted: Vec<u32> = config
        .scenarios
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut report = report::Report {
        size: format!("{:?}", config.size).to_lowercase(),
        started_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        machine: report::Machine::read(),
        scenarios: Vec::new(),
        persistence: None,
    };
    for id in wanted {
        eprintln!("scenario {id} ({:?})…", config.size);
        let scenario = match id {
            1 => scenarios::one_to_one(&config).await?,
            2 => scenarios::fanout(&config, false).await?.0,
            3 => {
                let (s, ceiling) = scenarios::fanout(&config, true).await?;
                report.persistence = ceiling;
                s
            }
            4 => scenarios::cross_instance(&config).await?,
            5 => scenarios::idle(&config).await?,
            6 => scenarios::soak(&config).await?,
            7 => webhooks::webhooks(&config).await?,
            8 => mcp::mcp(&config).await?,
            9 => policies::policies(&config).await?,
            10 => scenarios::below_saturation(&config).await?,
            other => anyhow::bail!("no scenario {other} (1 to 10)"),
        };
        report.scenarios.push(scenario);
        report::write(&report, &config.out)?;
    }
    // Scenario 3's targets need scenario 2's figure.
    let s2 = report
        .scenarios
        .iter()
        .find(|s| s.id == 2)
        .and_then(|s| s.rows.first())
        .map(|r| r.delivered_per_s);
    let ceiling = report.persistence.clone();
    if let Some(s3) = report.scenarios.iter_mut().find(|s| s.id == 3) {
        let delivered = s3.rows.first().map(|r| r.delivered_per_s).unwrap_or(0.0);
        if let Some(s2) = s2 {
            s3.targets.push(scenarios::Target {
                what: "delivered events/s ≥ 70% of scenario 2's".into(),
                measured: format!(
                    "{:.0}% ({delivered:.0} vs {s2:.0})",
                    100.0 * delivered / s2.max(1.0)
                ),
                met: delivered >= 0.7 * s2,
            });
        }
        if let Some(c) = ceiling {
            let xadd: f64 = c
                .note
                .as_deref()
                .and_then(|n| n.rsplit(": ").next())
                .and_then(|v| v.trim_end_matches("/s").parse().ok())
                .unwrap_or(0.0);
            s3.targets.push(scenarios::Target {
                what: "the writer (draining a backlog) ≥ 80% of redis-benchmark's pipelined XADD"
                    .into(),
                measured: format!(
                    "{:.0}% ({:.0} vs {xadd:.0})",
                    100.0 * c.delivered_per_s / xadd.max(1.0),
                    c.delivered_per_s
                ),
                met: c.delivered_per_s >= 0.8 * xadd,
            });
        }
    }
    report::write(&report, &config.out)?;
    print!("{}", report::markdown(&report));
    Ok(())
}
