//! `redis-server` on free ports: a single server and a three-master Redis
//! Cluster, each killable with SIGKILL and restartable empty.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::{Process, Scratch, Stop, free_port, require};

const WHY: &str = "the Redis tests and benchmarks start their own servers (scripts/test and bench/run install redis-server)";

/// How a server is started.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Port (default: a free one).
    pub port: Option<u16>,
    /// A cluster node (`--cluster-enabled yes`).
    pub cluster: bool,
    /// Words run in front of `redis-server`, e.g. `taskset -c 0`.
    pub prefix: Vec<String>,
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Err(_) => String::new(),
    }
}

pub struct RedisServer {
    process: Option<Process>,
    pub port: u16,
    options: RedisOptions,
    dir: Scratch,
}

impl RedisServer {
    /// A single server on a free port; panics with the reason if it cannot
    /// start (for tests).
    pub fn start() -> Self {
        Self::try_start(RedisOptions::default()).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A server on `port`; panics with the reason if it cannot start.
    pub fn start_on(port: u16, cluster: bool) -> Self {
        Self::try_start(RedisOptions {
            port: Some(port),
            cluster,
            prefix: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_start(options: RedisOptions) -> anyhow::Result<Self> {
        require("redis-server", WHY)?;
        require("redis-cli", WHY)?;
        let port = options.port.unwrap_or_else(free_port);
        let mut server = Self {
            process: None,
            port,
            dir: Scratch::new(&format!("redis-{port}"))?,
            options,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut words = self.options.prefix.iter();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg("redis-server");
                c
            }
            None => Command::new("redis-server"),
        };
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.options.cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "5000"]);
        }
        self.process = Some(Process::spawn(&mut cmd, Stop::Kill)?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cli(self.port, &["ping"]) != "PONG" {
            if Instant::now() > deadline {
                bail!("redis-server did not start on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }

    /// SIGKILL: no chance to save or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// Starts again on the same port, empty (nothing was saved).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn().unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// `redis-cli -p <port> <args>`, its standard output trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

/// A Redis Cluster of three masters, created with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Panics with the reason if the cluster cannot be formed (for tests).
    pub fn start() -> Self {
        Self::try_start().unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_start() -> anyhow::Result<Self> {
        // A cluster node also listens on port + 10000 (the cluster bus).
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let port = free_port();
            if port > 0
                && port < 55_000
                && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
                && !ports.contains(&port)
            {
                ports.push(port);
            }
        }
        let nodes = ports
            .iter()
            .map(|&p| {
                RedisServer::try_start(RedisOptions {
                    port: Some(p),
                    cluster: true,
                    prefix: Vec::new(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                if Instant::now() > deadline {
                    bail!("cluster not ok on port {}", node.port);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(Self { nodes })
    }

    /// The `TC_REDIS_URL` of every node.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
