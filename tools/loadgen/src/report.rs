//! Results as JSON (for tools and the chart) and Markdown (for people).

use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use super::scenarios::{Row, Scenario};

#[derive(Serialize)]
pub struct Report {
    pub size: String,
    pub started_at: String,
    pub machine: Machine,
    pub scenarios: Vec<Scenario>,
    /// Scenario 3's persistence ceiling, next to Redis's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistence: Option<Row>,
}

#[derive(Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub cpu_model: String,
}

impl Machine {
    pub fn read() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            memory_gib: mem_kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_default(),
        }
    }
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        let s = format!("{v:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{v:.2}")
    }
}

pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let m = &report.machine;
    let _ = writeln!(
        md,
        "Run {} ({} size) on {} CPUs ({}), {:.0} GiB, Linux {}.\n",
        report.started_at, report.size, m.cpus, m.cpu_model, m.memory_gib, m.kernel
    );
    for s in &report.scenarios {
        let _ = writeln!(md, "### Scenario {}: {}\n\n{}\n", s.id, s.name, s.shape);
        if s.id == 5 {
            let _ = writeln!(
                md,
                "| system | KiB per connection | RSS MiB | note |\n|---|---:|---:|---|"
            );
            for r in &s.rows {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    r.system,
                    num(r.kib_per_connection.unwrap_or(0.0)),
                    num(r.rss_mib),
                    r.note.clone().unwrap_or_default()
                );
            }
        } else if s.id == 10 {
            let _ = writeln!(
                md,
                "| system | delivered/s | delivered of expected | p99 ms | server CPU % | CPU ms per 1,000 deliveries | KiB per connection | RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in &s.rows {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1}% | {} | {:.1} | {} | {} | {} |",
                    r.system,
                    num(r.delivered_per_s),
                    100.0 * r.delivered_ratio,
                    num(r.p99_ms),
                    r.cpu_percent,
                    num(r.cpu_ms_per_1000.unwrap_or(0.0)),
                    num(r.kib_per_connection.unwrap_or(0.0)),
                    num(r.rss_mib)
                );
            }
        } else if s.id == 6 {
            let _ = writeln!(
                md,
                "| time | delivered/s | RSS MiB | descriptors, resumes |\n|---|---:|---:|---|"
            );
            for r in &s.rows {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    r.system,
                    num(r.delivered_per_s),
                    num(r.rss_mib),
                    r.note.clone().unwrap_or_default()
                );
            }
        } else {
            let _ = writeln!(
                md,
                "| system | published/s | delivered/s | delivered of expected | p50 ms | p99 ms | p99.9 ms | server CPU % | RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in &s.rows {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.1}% | {} | {} | {} | {:.0} | {} |",
                    r.system,
                    num(r.published_per_s),
                    num(r.delivered_per_s),
                    100.0 * r.delivered_ratio,
                    num(r.p50_ms),
                    num(r.p99_ms),
                    num(r.p999_ms),
                    r.cpu_percent,
                    num(r.rss_mib)
                );
            }
        }
        if s.id == 3
            && let Some(p) = &report.persistence
        {
            let _ = writeln!(
                md,
                "\nPersistence ceiling: {} published {}/s, the writer wrote to Redis {}/s; {}.",
                p.system,
                num(p.published_per_s),
                num(p.delivered_per_s),
                p.note.clone().unwrap_or_default()
            );
        }
        for t in &s.targets {
            let _ = writeln!(
                md,
                "\nTarget: {}: **{}** ({}).",
                t.what,
                if t.met { "met" } else { "missed" },
                t.measured
            );
        }
        md.push('\n');
    }
    md
}

pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("results.md"), markdown(report))?;
    Ok(())
}
