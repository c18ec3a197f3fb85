//! The systems under test, as real processes on free ports (the broker and
//! redis-server from the test kit, the Node.js Socket.IO peer and
//! nats-server here), and their CPU and memory as the kernel reports them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use tensorcost_testkit::broker::{BrokerOptions, BrokerProcess};
use tensorcost_testkit::process::{Process, Stop, free_port, wait_tcp};
use tensorcost_testkit::redis::{RedisOptions, RedisServer};

pub const SECRET: &str = "loadgen-secret-0123456789abcdef0123456789";

/// How long a server gets to finish after SIGTERM (a profiler wrapping it
/// writes its data then).
const GRACE: Duration = Duration::from_secs(5);

/// Words to run a system under test with. With `TC_LOADGEN_SERVER_CPUS`
/// (e.g. `0`) it runs under `taskset -c <cpus>`, so servers and the load
/// generator (pinned elsewhere by its caller) do not share cores.
fn server_prefix() -> Vec<String> {
    match std::env::var("TC_LOADGEN_SERVER_CPUS") {
        Ok(cpus) if !cpus.trim().is_empty() => {
            vec!["taskset".into(), "-c".into(), cpus.trim().to_string()]
        }
        _ => Vec::new(),
    }
}

fn server_command(program: &str) -> Command {
    let mut words = server_prefix().into_iter().chain([program.to_string()]);
    // The chain always yields `program` last, so there is a first word.
    let mut c = Command::new(words.next().unwrap_or_default());
    c.args(words);
    c
}

/// Resident memory of a process in KiB.
pub fn rss_kib(p: &Process) -> u64 {
    p.rss_kib()
}

/// CPU use of a process over a window, in percent of one core.
pub struct CpuWindow {
    ticks: u64,
    at: std::time::Instant,
}

impl CpuWindow {
    pub fn start(p: &Process) -> Self {
        Self {
            ticks: p.cpu_ticks(),
            at: std::time::Instant::now(),
        }
    }

    pub fn percent(&self, p: &Process) -> f64 {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        (p.cpu_ticks().saturating_sub(self.ticks)) as f64 / 100.0 / secs * 100.0
    }
}

/// Starts the broker. `TC_LOADGEN_BROKER_PREFIX` (e.g. `perf record -g -o
/// /tmp/perf.data --`) runs it under a profiler.
pub fn broker(bin: &Path, env: &[(&str, String)]) -> anyhow::Result<BrokerProcess> {
    let mut prefix = server_prefix();
    prefix.extend(
        std::env::var("TC_LOADGEN_BROKER_PREFIX")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from),
    );
    let mut options = BrokerOptions::new(SECRET);
    options.clean_env = false;
    options.log_stderr = false;
    options.prefix = prefix;
    options.stop = Stop::Term(GRACE);
    options.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    BrokerProcess::start(bin, options)
}

/// The Node.js Socket.IO peer; returns it and its `127.0.0.1:port`.
pub fn node_peer(dir: &Path) -> anyhow::Result<(Process, String)> {
    let mut process = Process::spawn(
        server_command("node")
            .arg("server.js")
            .current_dir(dir)
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
        Stop::Term(GRACE),
    )
    .context("cannot start node (the Socket.IO peer)")?;
    let stdout = process
        .child_mut()
        .and_then(|c| c.stdout.take())
        .context("peer stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("peer did not start")?;
    let port = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("unexpected peer output: {line:?}"))?
        .to_string();
    Ok((process, format!("127.0.0.1:{port}")))
}

/// Where the JetStream of the nats-server on `port` keeps its store (the
/// benchmark's streams are in memory; the directory holds their metadata).
pub fn jetstream_store(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tc-loadgen-jetstream-{port}"))
}

/// nats-server on a free port; with `jetstream`, JetStream enabled, its
/// store at [`jetstream_store`].
pub fn nats_server(jetstream: bool) -> anyhow::Result<(Process, u16)> {
    let port = free_port();
    let mut command = server_command("nats-server");
    command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    if jetstream {
        command.arg("-js").arg("-sd").arg(jetstream_store(port));
    }
    let process = Process::spawn(
        command.stdout(Stdio::null()).stderr(Stdio::null()),
        Stop::Term(GRACE),
    )
    .context("cannot start nats-server")?;
    wait_tcp(port, "nats-server", Duration::from_secs(10))?;
    Ok((process, port))
}

pub fn redis_server() -> anyhow::Result<RedisServer> {
    RedisServer::try_start(RedisOptions {
        prefix: server_prefix(),
        ..Default::default()
    })
}

/// `redis-benchmark` pipelined XADD with the broker's entry shape (fields
/// `o`, an instance id, and `e`, a `value_bytes` event): requests/s.
pub fn redis_benchmark_xadd(
    port: u16,
    requests: u64,
    clients: u32,
    pipeline: u32,
    value_bytes: usize,
) -> anyhow::Result<f64> {
    let value = "x".repeat(value_bytes);
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-n",
            &requests.to_string(),
            "-c",
            &clients.to_string(),
            "-P",
            &pipeline.to_string(),
            "-q",
        ])
        .args([
            "XADD",
            "tc:bench",
            "MAXLEN",
            "~",
            "100000",
            "*",
            "o",
            "0123456789ab",
            "e",
            &value,
        ])
        .output()
        .context("cannot run redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(['\r', '\n'])
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|l| l.contains("requests per second"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .next_back()
        .with_context(|| format!("unexpected redis-benchmark output: {text}"))
}
