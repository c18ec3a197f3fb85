//! Real processes for tests: `redis-server` (single and cluster) on free
//! ports, and broker instances from the real binary, each killable with
//! SIGKILL.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tensorcost-events");

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tc-test-{}-{name}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn require(binary: &str) {
    let found = Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{binary} not found: these tests start their own Redis (scripts/test installs redis-server)"
    );
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_on(free_port(), false)
    }

    pub fn start_on(port: u16, cluster: bool) -> Self {
        require("redis-server");
        require("redis-cli");
        let dir = scratch(&format!("redis-{port}"));
        let mut server = Self {
            child: None,
            port,
            dir,
            cluster,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "5000"]);
        }
        self.child = Some(cmd.spawn().expect("spawn redis-server"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cli(self.port, &["ping"]) != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no chance to save or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port, empty (nothing was saved).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters, created with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        // A cluster node also listens on port + 10000 (the cluster bus).
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let port = free_port();
            if port < 55_000
                && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
                && !ports.contains(&port)
            {
                ports.push(port);
            }
        }
        let nodes: Vec<RedisServer> = ports
            .iter()
            .map(|&p| RedisServer::start_on(p, true))
            .collect();
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster not ok on {}", node.port);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
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

/// A broker instance: the real binary in its own process.
pub struct Instance {
    child: Option<Child>,
    pub grpc: String,
    pub http: String,
    dir: PathBuf,
}

impl Instance {
    pub fn spawn(secret: &str, env: &[(&str, &str)]) -> Self {
        let dir = scratch("broker");
        let ready = dir.join("ready.json");
        let log = std::fs::File::create(dir.join("stderr.log")).expect("log file");
        let child = Command::new(BIN)
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .env_clear()
            .env("TC_JWT_SECRET", secret)
            .env("TC_READY_FILE", &ready)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn broker");
        let deadline = Instant::now() + Duration::from_secs(20);
        let addrs: serde_json::Value = loop {
            if let Ok(body) = std::fs::read_to_string(&ready) {
                break serde_json::from_str(&body).expect("ready file");
            }
            assert!(
                Instant::now() < deadline,
                "broker not ready: {}",
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            grpc: format!("http://{}", addrs["grpc"].as_str().expect("grpc")),
            http: addrs["http"].as_str().expect("http").to_string(),
            child: Some(child),
            dir,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The instance's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// The value of one metric line (`name` with its labels), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
