use std::process::ExitCode;

/// jemalloc: the publish path and the Redis client allocate a lot of small
/// short-lived buffers; measured with tc-loadgen, streaming publish went
/// from about 260,000 to 450,000 events/s and the Redis writer from 122,000
/// to 167,000 events/s over glibc's allocator (docs/benchmarks.md).
/// The `system-allocator` feature leaves it out, for heap profilers that
/// see only the system's allocator (valgrind's massif and dhat).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use tensorcost_events::cli::{parse, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
