//! The real binary: `serve` with no configuration, `publish`, `tail`,
//! `token`, `check-token`, `version`, and clear refusals of bad settings.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tensorcost-events");
const SECRET: &str = "cli-test-secret-0123456789abcdef0123";

/// A command with a clean environment: nothing from the developer's shell.
/// Each `serve` keeps its embedded store in its own directory.
fn cmd(args: &[&str]) -> Command {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut c = Command::new(BIN);
    c.args(args)
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("TC_DATA_DIR", tmp_path(&format!("data-{n}")));
    c
}

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct Serve {
    child: Child,
    grpc: String,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tmp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tc-cli-{}-{name}", std::process::id()))
}

/// Starts `serve` on ephemeral ports and waits for its ready file.
fn serve(extra_env: &[(&str, &str)], name: &str) -> Serve {
    let ready = tmp_path(&format!("{name}-ready.json"));
    let _ = std::fs::remove_file(&ready);
    let mut c = cmd(&[
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    c.env("TC_READY_FILE", &ready)
        .envs(extra_env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    let addrs: serde_json::Value = loop {
        if let Ok(body) = std::fs::read_to_string(&ready) {
            break serde_json::from_str(&body).expect("ready file is JSON");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited early: {status}");
        }
        assert!(Instant::now() < deadline, "serve did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    Serve {
        grpc: format!("http://{}", addrs["grpc"].as_str().expect("grpc addr")),
        child,
        stdout,
    }
}

#[test]
fn serve_with_no_configuration_prints_a_token_that_publish_and_tail_use() {
    let secret_file = tmp_path("dev-secret");
    let _ = std::fs::remove_file(&secret_file);
    let secret_file_env = secret_file.to_str().expect("utf-8 path").to_string();
    let mut server = serve(&[("TC_DEV_SECRET_FILE", &secret_file_env)], "dev");
    // The banner carries a ready-to-use token and copy-paste examples.
    let mut banner = String::new();
    let token = loop {
        let mut line = String::new();
        assert!(
            server.stdout.read_line(&mut line).expect("read") > 0,
            "banner ended: {banner}"
        );
        banner.push_str(&line);
        if let Some(t) = line.trim().strip_prefix("export TC_TOKEN=") {
            break t.to_string();
        }
    };
    for _ in 0..9 {
        let mut line = String::new();
        server.stdout.read_line(&mut line).expect("read");
        banner.push_str(&line);
    }
    assert!(banner.contains("development mode"), "{banner}");
    assert!(banner.contains("tensorcost-events tail"), "{banner}");
    assert!(banner.contains("tensorcost-events publish"), "{banner}");
    assert!(
        banner.contains(&secret_file_env),
        "the banner names the secret file: {banner}"
    );

    // The development secret is in a file only its owner may read, and the
    // client commands find it by themselves.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .expect("secret file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "secret file mode {mode:o}");
    }
    let out = run(cmd(&["check-token"])
        .env("TC_TOKEN", &token)
        .env("TC_DEV_SECRET_FILE", &secret_file));
    assert!(
        out.status.success(),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).starts_with(
            "accepted: tenant=tenant-dev subject=dev scopes=events:publish events:subscribe"
        ),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("using the development secret of `serve`"),
        "{}",
        text(&out.stderr)
    );
    let forged = tensorcost_testkit::token::mint(
        "not-the-development-secret-0123456789",
        Some("tenant-dev"),
        "events:publish",
        "dev",
        Duration::from_secs(60),
    );
    let out = run(cmd(&["check-token", &forged]).env("TC_DEV_SECRET_FILE", &secret_file));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("development mode makes a new secret each time serve starts"),
        "{}",
        text(&out.stdout)
    );

    let env = [
        ("TC_TOKEN", token.as_str()),
        ("TC_SERVER", server.grpc.as_str()),
    ];
    let tail = cmd(&["tail", "--types", "cost.*", "--count", "2"])
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tail");
    // Give tail time to subscribe; what it misses it would get by --since,
    // but this test wants the live path.
    std::thread::sleep(Duration::from_millis(500));
    let published: Vec<String> = [
        ("cost.updated", r#"{"amount":42,"f":1.50}"#),
        ("alert.created", "{}"),
        ("cost.threshold_exceeded", "[1,2.0]"),
    ]
    .iter()
    .map(|(t, d)| {
        let out = run(cmd(&["publish", "--type", t, "--data", d]).envs(env));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json reply");
        assert_eq!(reply["duplicate"], false);
        reply["id"].as_str().expect("id").to_string()
    })
    .collect();
    let out = tail.wait_with_output().expect("tail exits after --count");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON envelope per line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], published[0].as_str());
    assert_eq!(lines[1]["id"], published[2].as_str());
    // Exact data: the raw line keeps 1.50 and 2.0.
    let raw = text(&out.stdout);
    assert!(raw.contains(r#""data":{"amount":42,"f":1.50}"#), "{raw}");
    assert!(raw.contains(r#""data":[1,2.0]"#), "{raw}");
    assert_eq!(lines[0]["tenant_id"], "tenant-dev");

    // tail --since replays what came after.
    let out = run(cmd(&["tail", "--since", &published[0], "--count", "2"]).envs(env));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("recovered=true"),
        "{}",
        text(&out.stderr)
    );
    let ids: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["id"]
                .as_str()
                .expect("id")
                .to_string()
        })
        .collect();
    assert_eq!(ids, published[1..]);

    // A refused publish says why and exits non-zero.
    let out = run(cmd(&["publish", "--type", "Cost", "--data", "{}"]).envs(env));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("events[0].type:"),
        "{}",
        text(&out.stderr)
    );

    // SIGTERM shuts down cleanly and promptly.
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(
        &mut server.child.stderr.take().expect("stderr"),
        &mut stderr,
    )
    .expect("stderr");
    assert!(stderr.contains("DEVELOPMENT MODE"), "{stderr}");
    assert!(
        !secret_file.exists(),
        "serve removes its secret file when it stops"
    );
    let out = run(cmd(&["check-token", &token]).env("TC_DEV_SECRET_FILE", &secret_file));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no broker in development mode is running here"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn token_and_check_token() {
    let out = run(cmd(&[
        "token",
        "--tenant",
        "tenant-x",
        "--scope",
        "events:publish",
        "--ttl",
        "5m",
        "--sub",
        "svc",
    ])
    .env("TC_JWT_SECRET", SECRET));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert_eq!(token.split('.').count(), 3);

    let out = run(cmd(&["check-token", &token]).env("TC_JWT_SECRET", SECRET));
    assert!(out.status.success());
    let said = text(&out.stdout);
    assert!(
        said.starts_with("accepted: tenant=tenant-x subject=svc scopes=events:publish"),
        "{said}"
    );

    let out =
        run(cmd(&["check-token", &token])
            .env("TC_JWT_SECRET", "another-secret-another-secret-another"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout).trim(),
        "refused: invalid signature: the token was not signed with this broker's secret"
    );

    let out = run(cmd(&["check-token"])
        .env("TC_TOKEN", "x.y")
        .env("TC_JWT_SECRET", SECRET));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with("refused: malformed token"),
        "{}",
        text(&out.stdout)
    );

    let out = run(&mut cmd(&["token", "--tenant", "t"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no secret: set TC_JWT_SECRET"),
        "{}",
        text(&out.stderr)
    );

    let out = run(cmd(&["token"]).env("TC_JWT_SECRET", SECRET));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--tenant is required"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&mut cmd(&["version"]));
    assert!(out.status.success());
    assert!(
        text(&out.stdout).starts_with("tensorcost-events "),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn bad_settings_and_unreachable_brokers_get_clear_errors() {
    let cases: [(&str, &str, &str); 5] = [
        ("TC_MAX_EVENT_BYTES", "0", "must be at least 1"),
        ("TC_DATA_CACHE_BYTES", "0", "must be at least 1"),
        ("TC_MAX_BATCH", "lots", "\"lots\" is not a whole number"),
        (
            "TC_HISTORY_MAX_AGE",
            "forever",
            "is not a duration like 30s, 10m or 1h",
        ),
        ("TC_GRPC_ADDR", "not-an-address", "invalid socket address"),
    ];
    for (key, value, expected) in cases {
        let out = run(cmd(&["serve"]).env(key, value));
        assert_eq!(out.status.code(), Some(2), "{key}");
        let err = text(&out.stderr);
        assert!(err.contains(expected), "{key}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    // Settings that only make sense together, and files that do not parse.
    let bad_memberships = tmp_path("memberships.json");
    std::fs::write(&bad_memberships, r#"{"sub-1": ["tenant a"]}"#).expect("write");
    let env_cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (
            vec![("TC_COGNITO_ISSUER", "https://cognito-idp.test/pool")],
            "TC_COGNITO_CLIENT_ID is required with Cognito".into(),
        ),
        (
            vec![("TC_COGNITO_REGION", "eu-west-1")],
            "TC_COGNITO_REGION is set but TC_COGNITO_USER_POOL_ID is not".into(),
        ),
        (
            vec![
                ("TC_COGNITO_ISSUER", "https://cognito-idp.test/pool"),
                ("TC_COGNITO_CLIENT_ID", "client"),
                (
                    "TC_MEMBERSHIPS_FILE",
                    bad_memberships.to_str().expect("utf-8"),
                ),
            ],
            format!(
                "memberships file {} is not a JSON object of cognito_sub to tenant id lists: tenant \"tenant a\" of \"sub-1\"",
                bad_memberships.display()
            ),
        ),
        (
            vec![("TC_RATE_LIMIT_OVERRIDES", "tenant-a=fast")],
            "\"tenant-a=fast\": \"fast\" is not a whole number".into(),
        ),
    ];
    for (vars, expected) in env_cases {
        let out = run(cmd(&[
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("TC_JWT_SECRET", SECRET)
        .envs(vars.iter().copied()));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{vars:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(err.contains(&expected), "{vars:?}: {err}");
    }

    // A port in use is named.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = run(
        cmd(&["serve", "--grpc-addr", &addr, "--http-addr", "127.0.0.1:0"])
            .env("TC_JWT_SECRET", SECRET),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("cannot listen for gRPC on {addr}")),
        "{}",
        text(&out.stderr)
    );

    let out = run(&mut cmd(&["publish", "--type", "a.b"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no token: pass --token or set TC_TOKEN"),
        "{}",
        text(&out.stderr)
    );

    // Nothing listens on the port just released.
    drop(taken);
    let out = run(cmd(&[
        "publish",
        "--type",
        "a.b",
        "--server",
        &format!("http://{addr}"),
    ])
    .env("TC_TOKEN", "t"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot connect to"),
        "{}",
        text(&out.stderr)
    );
}

/// Waits for `path` to be written; its JSON.
fn wait_file(path: &std::path::Path, child: &mut Child) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(body) = std::fs::read_to_string(path)
            && let Ok(json) = serde_json::from_str(&body)
        {
            return json;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited early: {status}");
        }
        assert!(Instant::now() < deadline, "{} not written", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_configuration_file_is_overridden_by_the_environment_and_flags() {
    let dir = tmp_path("config");
    std::fs::create_dir_all(&dir).unwrap();
    let (from_file, from_env, from_flag) = (
        dir.join("file-ready.json"),
        dir.join("env-ready.json"),
        dir.join("flag-ready.json"),
    );
    let config = dir.join("tensorcost.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\nready_file = {:?}\n\n[auth]\njwt_secret = {SECRET:?}\n",
            from_file.display().to_string()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let start = |c: &mut Command| {
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve")
    };
    // The file alone: its ready file, its addresses, its secret (no
    // development mode).
    let mut child = start(&mut cmd(&["serve", "--config", &config]));
    let addrs = wait_file(&from_file, &mut child);
    let grpc = format!("http://{}", addrs["grpc"].as_str().unwrap());
    assert!(grpc.starts_with("http://127.0.0.1:"));
    let token = run(cmd(&["token", "--tenant", "t1"]).env("TC_JWT_SECRET", SECRET));
    assert!(token.status.success());
    let token = text(&token.stdout);
    // A token of the file's secret is accepted.
    let out = run(
        cmd(&["publish", "--type", "instance.created", "--data", "{}"])
            .env("TC_SERVER", &grpc)
            .env("TC_TOKEN", token.trim()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _ = child.kill();
    let _ = child.wait();
    // The environment over the file.
    let mut child = start(
        cmd(&["serve"])
            .env("TC_CONFIG", &config)
            .env("TC_READY_FILE", &from_env),
    );
    wait_file(&from_env, &mut child);
    let _ = child.kill();
    let _ = child.wait();
    // A flag over both.
    let mut child = start(
        cmd(&["serve", "--config", &config, "--ready-file"])
            .arg(&from_flag)
            .env("TC_READY_FILE", &from_env),
    );
    let _ = std::fs::remove_file(&from_env);
    wait_file(&from_flag, &mut child);
    assert!(!from_env.exists(), "the environment won over a flag");
    let _ = child.kill();
    let _ = child.wait();

    // `config check`: the effective settings, where each came from, the
    // secret masked.
    let out = run(cmd(&["config", "check", &config]).env("TC_HISTORY_MAX_AGE", "2h"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("grpc_addr = \"127.0.0.1:0\"  # file"),
        "{shown}"
    );
    assert!(
        shown.contains("history_max_age = \"2h\"  # environment TC_HISTORY_MAX_AGE"),
        "{shown}"
    );
    assert!(
        shown.contains("history_max_events = 10000  # default"),
        "{shown}"
    );
    assert!(!shown.contains(SECRET), "the secret was printed: {shown}");

    // A bad value: refused before anything starts, naming file, line, key.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[listen]\ngrpc_addr = \"127.0.0.1:0\"\n\n[webhooks]\ntimeout = \"soon\"\n",
    )
    .unwrap();
    let bad = bad.display().to_string();
    for args in [
        vec!["serve", "--config", bad.as_str()],
        vec!["config", "check", bad.as_str()],
    ] {
        let out = run(&mut cmd(&args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("{bad}:5: [webhooks] timeout = \"soon\"")),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_example_configuration_in_deploy_is_current_and_checks() {
    let example = run(&mut cmd(&["config", "example"]));
    assert!(example.status.success());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/tensorcost.toml");
    let checked_in = std::fs::read_to_string(path).expect("deploy/tensorcost.toml");
    assert!(
        text(&example.stdout) == checked_in,
        "deploy/tensorcost.toml differs from `config example`: regenerate it with `cargo run -- config example > deploy/tensorcost.toml`"
    );
    let out = run(&mut cmd(&["config", "check", path]));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn json_logs_are_one_object_per_line_and_name_the_event_tenant_and_trace() {
    let dir = tmp_path("json-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let (ready, log) = (dir.join("ready.json"), dir.join("stderr.log"));
    let mut child = cmd(&[
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ])
    .env("TC_JWT_SECRET", SECRET)
    .env("TC_READY_FILE", &ready)
    .env("TC_LOG_FORMAT", "json")
    .env("RUST_LOG", "tensorcost_events=debug")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .expect("spawn serve");
    let addrs = wait_file(&ready, &mut child);
    let grpc = format!("http://{}", addrs["grpc"].as_str().unwrap());
    let token = run(cmd(&["token", "--tenant", "t-json"]).env("TC_JWT_SECRET", SECRET));
    let token = text(&token.stdout);
    // A cost.updated without its fields: the projections log why they
    // left it out, at debug level.
    let out = run(cmd(&["publish", "--type", "cost.updated", "--data", "{}"])
        .env("TC_SERVER", &grpc)
        .env("TC_TOKEN", token.trim()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    let about_the_event = loop {
        let lines = std::fs::read_to_string(&log).unwrap();
        let found = lines
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
            })
            .inspect(|v| {
                for key in ["timestamp", "level", "target", "message"] {
                    assert!(v.get(key).is_some(), "no {key}: {v}");
                }
            })
            .find(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("not in the projections"))
            });
        if let Some(line) = found {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line about the event: {lines}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(about_the_event["tenant"], "t-json", "{about_the_event}");
    let trace = about_the_event["trace_id"].as_str().unwrap_or_default();
    assert!(
        trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()),
        "{about_the_event}"
    );
    assert!(
        about_the_event["event_id"].as_str().is_some(),
        "{about_the_event}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
