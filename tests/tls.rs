//! TLS on both listeners, against the real binary: certificates made here
//! (a CA and a broker certificate for 127.0.0.1), the CLI's `publish` over
//! `https://` with `TC_CA_FILE`, a plain-text client refused cleanly on the
//! TLS port, reloads on SIGHUP and on a file change where the old
//! connection keeps working and a new one sees the new certificate, and
//! certificate files that do not load refused at start, naming the file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tensorcost_testkit::broker::{BrokerOptions, BrokerProcess, metric_value};
use tensorcost_testkit::process::Scratch;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_tensorcost-events");
const SECRET: &str = "tls-test-secret-0123456789abcdef0123456";
const PATIENCE: Duration = Duration::from_secs(15);

/// A CA and a certificate for `127.0.0.1` and `localhost` it issued, as PEM
/// files in `dir` named after `name`.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_der: CertificateDer<'static>,
}

fn make_certs(dir: &Path, name: &str) -> Certs {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("test CA {name}"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let write = |file: &str, text: String| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, text).unwrap();
        path
    };
    Certs {
        ca: write("ca.pem", ca_cert.pem()),
        cert: write("cert.pem", cert.pem()),
        key: write("key.pem", key.serialize_pem()),
        ca_der: ca_cert.der().clone(),
    }
}

/// Replaces the broker's certificate files with `new`'s, each in one
/// rename (what a certificate manager does).
fn install(new: &Certs, cert: &Path, key: &Path) {
    for (from, to) in [(&new.cert, cert), (&new.key, key)] {
        let staged = to.with_extension("new");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    }
}

fn start(scratch: &Scratch, certs: &Certs, extra: &[(&str, &str)]) -> BrokerProcess {
    // The broker reads these paths; tests replace what they hold.
    let (cert, key) = (
        scratch.join("served-cert.pem"),
        scratch.join("served-key.pem"),
    );
    if !cert.exists() {
        std::fs::copy(&certs.cert, &cert).unwrap();
        std::fs::copy(&certs.key, &key).unwrap();
    }
    let mut options = BrokerOptions::new(SECRET)
        .env("TC_TLS_CERT", cert.display().to_string())
        .env("TC_TLS_KEY", key.display().to_string());
    for (k, v) in extra {
        options = options.env(k, *v);
    }
    BrokerProcess::start(Path::new(BIN), options).expect("broker starts with TLS")
}

fn client_config(ca: &CertificateDer<'static>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// A kept-alive HTTP/1.1 connection over TLS to the broker's HTTP port.
struct HttpsConn {
    stream: BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl HttpsConn {
    /// Connects trusting only `ca`; the handshake's error otherwise.
    async fn open(addr: &str, ca: &CertificateDer<'static>) -> std::io::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = tokio_rustls::TlsConnector::from(client_config(ca, b"http/1.1"))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await?;
        Ok(Self {
            stream: BufReader::new(tls),
        })
    }

    /// `GET path`: the status code and body.
    async fn get(&mut self, path: &str) -> (u16, String) {
        let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
        self.stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut status = String::new();
        self.stream.read_line(&mut status).await.unwrap();
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await.unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }
}

async fn metric(broker: &BrokerProcess, ca: &CertificateDer<'static>, name: &str) -> f64 {
    let mut conn = HttpsConn::open(&broker.http, ca).await.unwrap();
    let (code, body) = conn.get("/metrics").await;
    assert_eq!(code, 200, "{body}");
    metric_value(&body, name)
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI")
}

fn token() -> String {
    tensorcost_testkit::token::mint(
        SECRET,
        Some("tenant-tls"),
        "events:publish events:subscribe",
        "tls-test",
        Duration::from_secs(600),
    )
}

/// `publish` over `https://` (the gRPC port) trusting `ca`.
fn publish(broker: &BrokerProcess, ca: Option<&Path>) -> Output {
    let server = broker.grpc.replace("http://", "https://");
    let token = token();
    let mut env = vec![("TC_SERVER", server.as_str()), ("TC_TOKEN", token.as_str())];
    let ca = ca.map(|p| p.display().to_string());
    if let Some(ca) = &ca {
        env.push(("TC_CA_FILE", ca.as_str()));
    }
    cli(
        &[
            "publish",
            "--type",
            "instance.created",
            "--data",
            r#"{"instance_id":"i-1"}"#,
        ],
        &env,
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn both_listeners_speak_tls_and_refuse_plain_text_cleanly() {
    let scratch = Scratch::new("tls").unwrap();
    let certs = make_certs(scratch.path(), "one");
    let broker = start(&scratch, &certs, &[]);

    // gRPC over TLS: the CLI with the test CA.
    let out = publish(&broker, Some(&certs.ca));
    assert!(
        out.status.success(),
        "publish over TLS: {}",
        text(&out.stderr)
    );

    // Without the CA: refused by the client, saying why.
    let out = publish(&broker, None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.to_lowercase().contains("certificate") && !err.contains("panicked"),
        "{err}"
    );

    // HTTP over TLS.
    let mut conn = HttpsConn::open(&broker.http, &certs.ca_der).await.unwrap();
    assert_eq!(conn.get("/healthz").await.0, 200);
    // A container's HEALTHCHECK: https because TC_TLS_CERT is set; as plain
    // text it fails.
    let cert = certs.cert.to_str().unwrap();
    let out = cli(
        &["healthcheck", "--ready"],
        &[("TC_HTTP_ADDR", &broker.http), ("TC_TLS_CERT", cert)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&["healthcheck"], &[("TC_HTTP_ADDR", &broker.http)]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/healthz: "),
        "{}",
        text(&out.stderr)
    );

    // A plain-text gRPC client on the TLS port: refused, cleanly.
    let token = token();
    let out = cli(
        &["publish", "--type", "instance.created", "--data", "{}"],
        &[
            ("TC_SERVER", broker.grpc.as_str()),
            ("TC_TOKEN", token.as_str()),
        ],
    );
    assert!(!out.status.success());
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    // A plain-text HTTP request on the TLS port: the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(&broker.http).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "plain text served on the TLS port"
    );
    // Counted, and the broker still serves.
    let failures =
        |listener: &str| format!("tc_tls_handshake_failures_total{{listener=\"{listener}\"}}");
    assert!(metric(&broker, &certs.ca_der, &failures("grpc")).await >= 1.0);
    assert!(metric(&broker, &certs.ca_der, &failures("http")).await >= 1.0);
    let out = publish(&broker, Some(&certs.ca));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!broker.stderr().contains("panicked"), "{}", broker.stderr());
}

/// The certificate a new handshake is shown: `Ok` when it chains to `ca`.
async fn handshake_with(broker: &BrokerProcess, ca: &CertificateDer<'static>) -> bool {
    HttpsConn::open(&broker.http, ca).await.is_ok()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A broker serving certificate `one` (its files checked every `watch`), a
/// connection made under it, then certificate `two` installed in its files.
async fn rotated(watch: &str) -> (Scratch, Certs, Certs, BrokerProcess, HttpsConn) {
    let scratch = Scratch::new("tls-rotated").unwrap();
    let (one, two) = (
        make_certs(scratch.path(), "one"),
        make_certs(scratch.path(), "two"),
    );
    let broker = start(&scratch, &one, &[("TC_TLS_WATCH_INTERVAL", watch)]);
    let mut old = HttpsConn::open(&broker.http, &one.ca_der).await.unwrap();
    assert_eq!(old.get("/healthz").await.0, 200);
    install(
        &two,
        &scratch.join("served-cert.pem"),
        &scratch.join("served-key.pem"),
    );
    (scratch, one, two, broker, old)
}

#[tokio::test]
async fn a_reload_on_sighup_keeps_established_connections() {
    // Files are looked at on SIGHUP only.
    let (scratch, one, two, broker, mut old) = rotated("0").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        handshake_with(&broker, &one.ca_der).await,
        "reloaded without SIGHUP"
    );

    let pid = broker.process.pid().to_string();
    let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(status.success());
    eventually("a new handshake shows the new certificate", async || {
        handshake_with(&broker, &two.ca_der).await
    })
    .await;
    assert!(!handshake_with(&broker, &one.ca_der).await);
    // The connection made before the reload still works.
    assert_eq!(old.get("/healthz").await.0, 200);
    let reloads = metric(
        &broker,
        &two.ca_der,
        "tc_tls_reloads_total{outcome=\"loaded\"}",
    )
    .await;
    assert_eq!(reloads, 1.0);
    let out = publish(&broker, Some(&two.ca));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A bad file: the reload fails, the certificate in use stays.
    std::fs::write(scratch.join("served-key.pem"), "not a key").unwrap();
    let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(status.success());
    eventually("the failed reload is counted", async || {
        metric(
            &broker,
            &two.ca_der,
            "tc_tls_reloads_total{outcome=\"failed\"}",
        )
        .await
            == 1.0
    })
    .await;
    assert!(handshake_with(&broker, &two.ca_der).await);
    assert!(
        broker.stderr().contains("TC_TLS_KEY"),
        "the log names the file: {}",
        broker.stderr()
    );
}

#[tokio::test]
async fn a_reload_when_the_files_change() {
    let (_scratch, _one, two, broker, mut old) = rotated("200ms").await;
    eventually("a new handshake shows the new certificate", async || {
        handshake_with(&broker, &two.ca_der).await
    })
    .await;
    assert_eq!(old.get("/healthz").await.0, 200);
}

#[test]
fn certificate_files_that_do_not_load_stop_the_start_naming_them() {
    let scratch = Scratch::new("tls-bad").unwrap();
    let certs = make_certs(scratch.path(), "one");
    let other = make_certs(scratch.path(), "other");
    let data = scratch.join("data");
    let data = data.display().to_string();
    let serve = |env: &[(&str, &str)]| {
        let mut all = vec![
            ("TC_JWT_SECRET", SECRET),
            ("TC_GRPC_ADDR", "127.0.0.1:0"),
            ("TC_HTTP_ADDR", "127.0.0.1:0"),
            ("TC_DATA_DIR", data.as_str()),
        ];
        all.extend_from_slice(env);
        cli(&["serve"], &all)
    };
    let cert = certs.cert.display().to_string();
    let key = certs.key.display().to_string();
    let other_key = other.key.display().to_string();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        // A certificate where the key should be.
        (
            vec![("TC_TLS_CERT", &cert), ("TC_TLS_KEY", &cert)],
            "TC_TLS_KEY",
        ),
        // A key that is not the certificate's.
        (
            vec![("TC_TLS_CERT", &cert), ("TC_TLS_KEY", &other_key)],
            "TC_TLS_CERT",
        ),
        (
            vec![
                ("TC_TLS_CERT", "/nonexistent/cert.pem"),
                ("TC_TLS_KEY", &key),
            ],
            "/nonexistent/cert.pem",
        ),
        (vec![("TC_TLS_CERT", &cert)], "--tls-key"),
        (
            vec![
                ("TC_TLS_CERT", &cert),
                ("TC_TLS_KEY", &key),
                ("TC_TLS_CLIENT_CA", &key),
            ],
            "TC_TLS_CLIENT_CA",
        ),
    ];
    for (env, named) in cases {
        let out = serve(&env);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{env:?} started");
        assert!(err.contains(named), "{env:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !err.contains("PRIVATE KEY-----"),
            "a key's content was printed: {err}"
        );
    }
}
