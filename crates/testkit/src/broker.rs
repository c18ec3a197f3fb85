//! The broker binary as a real process on ephemeral loopback ports, ready
//! once its ready file (`TC_READY_FILE`) names both addresses.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::{Process, Scratch, Stop};

/// How long a broker gets to write its ready file.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How a broker is started.
#[derive(Debug, Clone)]
pub struct BrokerOptions<'a> {
    /// HS256 secret (`TC_JWT_SECRET`).
    pub secret: &'a str,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Start from an empty environment (nothing from the caller's shell).
    pub clean_env: bool,
    /// Words run in front of the binary, e.g. `taskset -c 0` or a profiler.
    pub prefix: Vec<String>,
    /// Keep standard error in a log file (shown if start-up fails) instead
    /// of passing it through.
    pub log_stderr: bool,
    pub stop: Stop,
    /// Listen addresses (`127.0.0.1:0`: ephemeral ports).
    pub grpc_addr: String,
    pub http_addr: String,
}

impl<'a> BrokerOptions<'a> {
    /// Defaults for tests: clean environment, `RUST_LOG=warn`, standard
    /// error kept, SIGKILL on drop.
    pub fn new(secret: &'a str) -> Self {
        Self {
            secret,
            env: Vec::new(),
            clean_env: true,
            prefix: Vec::new(),
            log_stderr: true,
            stop: Stop::Kill,
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
        }
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }
}

/// A running broker.
pub struct BrokerProcess {
    pub process: Process,
    /// `http://127.0.0.1:<port>` of gRPC.
    pub grpc: String,
    /// `127.0.0.1:<port>` of HTTP (REST, `/metrics`, Socket.IO).
    pub http: String,
    scratch: Scratch,
}

impl BrokerProcess {
    /// Starts `bin serve` on ephemeral loopback ports and waits until it is
    /// listening.
    pub fn start(bin: &Path, options: BrokerOptions<'_>) -> anyhow::Result<Self> {
        let scratch = Scratch::new("broker")?;
        let ready = scratch.join("ready.json");
        let log = scratch.join("stderr.log");
        let mut words = options.prefix.iter();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        command.args([
            "serve",
            "--grpc-addr",
            &options.grpc_addr,
            "--http-addr",
            &options.http_addr,
        ]);
        if options.clean_env {
            command
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default());
        }
        command
            .env("TC_JWT_SECRET", options.secret)
            .env("TC_READY_FILE", &ready)
            // Its own embedded store, unless the test names one (to restart
            // a broker on the same state).
            .env("TC_DATA_DIR", scratch.join("data"))
            .env("RUST_LOG", "warn")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if options.log_stderr {
            command.stderr(std::fs::File::create(&log).context("broker log file")?);
        } else {
            command.stderr(Stdio::inherit());
        }
        let mut process = Process::spawn(&mut command, options.stop)
            .with_context(|| format!("cannot start the broker {}", bin.display()))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let addrs: serde_json::Value = loop {
            if let Ok(body) = std::fs::read_to_string(&ready) {
                break serde_json::from_str(&body).context("ready file is not JSON")?;
            }
            if !process.running() || Instant::now() > deadline {
                bail!(
                    "the broker did not become ready: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let addr = |name: &str| {
            addrs[name]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("ready file has no {name} address"))
        };
        Ok(Self {
            grpc: format!("http://{}", addr("grpc")?),
            http: addr("http")?,
            process,
            scratch,
        })
    }

    /// SIGKILL now.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// What the broker wrote on standard error (when kept in a log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.scratch.join("stderr.log")).unwrap_or_default()
    }

    /// The broker's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        metrics(&self.http).await
    }

    /// The value of one metric line (`name` with its labels), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await.unwrap_or_default();
        metric_value(&text, name)
    }
}

/// `GET http://<http>/metrics`.
pub async fn metrics(http: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{http}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// The value of the line `name value` in a Prometheus text, 0 if absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
