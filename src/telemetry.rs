//! Logging. `RUST_LOG` selects what is logged (default `info`); logs go to
//! standard error so that `tail` and `publish` keep standard output for data.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,hyper=warn,rmcp=warn"));
    // A second init (tests start several servers) is harmless: ignore it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
