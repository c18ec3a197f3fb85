//! The systems under test, as real processes on free ports: the broker,
//! the Node.js Socket.IO peer, nats-server and redis-server; and their CPU
//! and memory as the kernel reports them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub const SECRET: &str = "loadgen-secret-0123456789abcdef0123456789";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tc-loadgen-{}-{name}-{}",
        std::process::id(),
        free_port()
    ));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A command for a system under test. With `TC_LOADGEN_SERVER_CPUS` (e.g.
/// `0`) it runs under `taskset -c <cpus>`, so servers and the load
/// generator (pinned elsewhere by its caller) do not share cores.
fn server_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    match std::env::var("TC_LOADGEN_SERVER_CPUS") {
        Ok(cpus) if !cpus.trim().is_empty() => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus.trim()]).arg(program);
            c
        }
        _ => Command::new(program),
    }
}

/// A child process, killed when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time in clock ticks (100 per second).
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let get = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        get(11) + get(12)
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    /// SIGTERM first (a profiler wrapping the process writes its data),
    /// SIGKILL after 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU use of a process over a window, in percent of one core.
pub struct CpuWindow {
    ticks: u64,
    at: Instant,
}

impl CpuWindow {
    pub fn start(p: &Proc) -> Self {
        Self {
            ticks: p.cpu_ticks(),
            at: Instant::now(),
        }
    }

    pub fn percent(&self, p: &Proc) -> f64 {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        (p.cpu_ticks().saturating_sub(self.ticks)) as f64 / 100.0 / secs * 100.0
    }
}

pub struct Broker {
    pub proc: Proc,
    /// `http://127.0.0.1:port` of gRPC.
    pub grpc: String,
    /// `127.0.0.1:port` of HTTP (and Socket.IO).
    pub http: String,
}

/// Starts the broker. `TC_LOADGEN_BROKER_PREFIX` (e.g. `perf record -g -o
/// /tmp/perf.data --`) runs it under a profiler.
pub fn broker(bin: &Path, env: &[(&str, String)]) -> anyhow::Result<Broker> {
    let dir = scratch("broker");
    let ready = dir.join("ready.json");
    let prefix = std::env::var("TC_LOADGEN_BROKER_PREFIX").unwrap_or_default();
    let mut words = prefix.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = server_command(program);
            c.args(words).arg(bin);
            c
        }
        None => server_command(bin),
    };
    let child = command
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("TC_JWT_SECRET", SECRET)
        .env("TC_READY_FILE", &ready)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start the broker {}", bin.display()))?;
    let proc = Proc { child };
    let deadline = Instant::now() + Duration::from_secs(30);
    let addrs: serde_json::Value = loop {
        if let Ok(body) = std::fs::read_to_string(&ready) {
            break serde_json::from_str(&body)?;
        }
        if Instant::now() > deadline {
            bail!("the broker did not become ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Broker {
        grpc: format!("http://{}", addrs["grpc"].as_str().unwrap_or_default()),
        http: addrs["http"].as_str().unwrap_or_default().to_string(),
        proc,
    })
}

/// The Node.js Socket.IO peer; returns it and its `127.0.0.1:port`.
pub fn node_peer(dir: &Path) -> anyhow::Result<(Proc, String)> {
    let mut child = server_command("node")
        .arg("server.js")
        .current_dir(dir)
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start node (the Socket.IO peer)")?;
    let stdout = child.stdout.take().context("peer stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("peer did not start")?;
    let port = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("unexpected peer output: {line:?}"))?
        .to_string();
    Ok((Proc { child }, format!("127.0.0.1:{port}")))
}

fn wait_tcp(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not start on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn nats_server() -> anyhow::Result<(Proc, u16)> {
    let port = free_port();
    let child = server_command("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start nats-server")?;
    let proc = Proc { child };
    wait_tcp(port, "nats-server")?;
    Ok((proc, port))
}

pub fn redis_server() -> anyhow::Result<(Proc, u16)> {
    let port = free_port();
    let dir = scratch("redis");
    let child = server_command("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start redis-server")?;
    let proc = Proc { child };
    wait_tcp(port, "redis-server")?;
    Ok((proc, port))
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
