//! Logging. `RUST_LOG` selects what is logged (default `info`); logs go to
//! standard error so that `tail` and `publish` keep standard output for
//! data. `TC_LOG_FORMAT=json` writes one JSON object per line (`timestamp`,
//! `level`, `target`, `message` and the line's fields, `tenant` and
//! `trace_id` among them for a line about an event) for log pipelines.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The logging settings of `serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogSettings {
    /// Log lines as text, or as one JSON object per line (timestamp, level,
    /// target, message and fields); RUST_LOG selects what is logged.
    #[arg(long, env = "TC_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

pub fn init(settings: &LogSettings) {
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,hyper=warn,rmcp=warn"))
    };
    // A second init (tests start several servers) is harmless: ignore it.
    let _ = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .try_init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .try_init(),
    };
}
