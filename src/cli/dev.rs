//! Development mode: `serve` with no `TC_JWT_SECRET` generates a secret for
//! the run, prints a ready-to-use token, and keeps the secret in a file of
//! the user's (`TC_DEV_SECRET_FILE`, by default
//! `$XDG_STATE_HOME/tensorcost-events/dev-secret` or
//! `~/.local/state/tensorcost-events/dev-secret`) so that `token` and
//! `check-token` work against it with nothing to configure. The file is
//! readable by its owner only and removed when `serve` stops.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::auth;
use crate::clock;

/// Tenant of the token development mode prints.
pub const DEV_TENANT: &str = "tenant-dev";
/// Lifetime of that token.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where development mode keeps its secret: `TC_DEV_SECRET_FILE` when set,
/// else under the user's state directory; `None` when there is no home.
pub fn default_secret_file() -> Option<PathBuf> {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty());
    let state = env("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".local").join("state")))?;
    Some(state.join("tensorcost-events").join("dev-secret"))
}

/// What the file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevSecret {
    pub secret: String,
    pub pid: u32,
    pub started_at: String,
    pub grpc: String,
    pub http: String,
}

/// The secret file of a running development broker; removed when dropped
/// (if it still holds this run's secret).
pub struct SecretFile {
    path: PathBuf,
    secret: String,
}

impl SecretFile {
    /// Writes the file, owner-only, atomically (a reader never sees half).
    pub fn write(
        path: &Path,
        secret: &str,
        grpc: SocketAddr,
        http: SocketAddr,
    ) -> anyhow::Result<Self> {
        let body = serde_json::to_string(&DevSecret {
            secret: secret.to_string(),
            pid: std::process::id(),
            started_at: clock::format_timestamp(SystemTime::now()),
            grpc: loopback(grpc),
            http: loopback(http),
        })?;
        if let Some(dir) = path.parent() {
            create_private_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        write_private(&tmp, body.as_bytes())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            secret: secret.to_string(),
        })
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if read(&self.path).is_ok_and(|d| d.secret == self.secret) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(body)
}

/// Reads a development secret file.
pub fn read(path: &Path) -> anyhow::Result<DevSecret> {
    let text = std::fs::read_to_string(path)?;
    Ok(serde_json::from_str(&text)?)
}

/// `127.0.0.1:<port>` for an address bound to every interface.
fn loopback(a: SocketAddr) -> String {
    if a.ip().is_unspecified() {
        format!("127.0.0.1:{}", a.port())
    } else {
        a.to_string()
    }
}

/// The secret a client command (`token`, `check-token`) uses: the one it
/// was given, else that of the development broker; an error says how to
/// get one.
pub fn client_secret(
    given: Option<String>,
    file: Option<&Path>,
) -> anyhow::Result<(String, Option<String>)> {
    if let Some(s) = given.filter(|s| !s.is_empty()) {
        return Ok((s, None));
    }
    let not_found = |why: String| {
        anyhow::anyhow!("no secret: set TC_JWT_SECRET (or --secret) to the broker's secret; {why}")
    };
    let Some(path) = file else {
        return Err(not_found(
            "a broker in development mode keeps its secret in TC_DEV_SECRET_FILE, and neither it nor HOME is set".into(),
        ));
    };
    match read(path) {
        Ok(dev) => {
            let note = format!(
                "using the development secret of `serve` (pid {}, started {}) from {}",
                dev.pid,
                dev.started_at,
                path.display()
            );
            Ok((dev.secret, Some(note)))
        }
        Err(_) => Err(not_found(format!(
            "no broker in development mode is running here (its secret would be in {})",
            path.display()
        ))),
    }
}

/// The development token: tenant `tenant-dev`, the default scopes, 24 h.
pub fn token(secret: &str) -> anyhow::Result<String> {
    Ok(auth::mint_hs256(
        secret.as_bytes(),
        Some(DEV_TENANT),
        Some("dev"),
        Some(&auth::rbac::default_scope_set()),
        DEV_TOKEN_TTL,
    )?)
}

/// Logs the development-mode warning and prints the token and copy-paste
/// commands.
pub fn print_banner(
    token: &str,
    grpc: SocketAddr,
    http: SocketAddr,
    secret_file: Option<&Path>,
) -> anyhow::Result<()> {
    tracing::warn!(
        "DEVELOPMENT MODE: no TC_JWT_SECRET set, so a random secret was generated for this run. \
         Tokens stop working when the broker restarts. Set TC_JWT_SECRET in production."
    );
    let server = if loopback(grpc) == "127.0.0.1:50051" {
        String::new()
    } else {
        format!(" --server http://{}", loopback(grpc))
    };
    let check = match secret_file {
        Some(path) => format!(
            "  # check a token (token and check-token read this run's secret from {}):\n  tensorcost-events check-token\n",
            path.display()
        ),
        None => "  # check a token: TC_JWT_SECRET=<the secret> tensorcost-events check-token\n  # (set HOME or TC_DEV_SECRET_FILE and client commands find this run's secret by themselves)\n".into(),
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n  tensorcost-events is running in development mode ({DEV_TENANT}, token valid 24h).\n\n  \
         export TC_TOKEN={token}\n\n  \
         # in one terminal:\n  tensorcost-events tail{server} --types 'cost.*'\n  \
         # in another (with TC_TOKEN exported there too):\n  \
         tensorcost-events publish{server} --type cost.updated --data '{{\"amount\":42}}'\n\n\
         {check}\n  \
         REST: curl -H \"authorization: Bearer $TC_TOKEN\" -d '{{\"type\":\"cost.updated\",\"data\":{{\"amount\":42}}}}' http://{}/v1/events\n",
        loopback(http)
    )?;
    out.flush()?;
    Ok(())
}
