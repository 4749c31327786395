//! `veil simulate keep-alive`: replay an invocation trace in the Azure Functions 2019
//! per-minute format against the keep-alive policies and report, for each, the cold-start
//! fraction and the memory-time spent on idle instances.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;
use veil_gateway::keepalive::{parse_trace, simulate, HybridConfig, Policy, SimResult};

/// Arguments of `veil simulate keep-alive`.
#[derive(clap::Args, Debug)]
pub struct KeepAliveArgs {
    /// The trace (CSV: HashOwner,HashApp,HashFunction,Trigger,1,…,1440). The repository ships
    /// a small sample made here: testdata/keepalive/sample-azure-2019-format.csv.
    #[arg(long)]
    pub trace: PathBuf,
    /// Fixed keep-alive windows to compare, in minutes (repeatable).
    #[arg(long = "fixed-minutes", default_values_t = [10u64, 20, 60])]
    pub fixed_minutes: Vec<u64>,
    /// The hybrid policy's fallback window, in minutes.
    #[arg(long, default_value_t = 10)]
    pub hybrid_fallback_minutes: u64,
    /// Memory of one instance, for the memory-time column (MiB).
    #[arg(long, default_value_t = 128)]
    pub memory_mib: u64,
}

/// One row of the report.
pub struct Row {
    /// Policy name.
    pub policy: String,
    /// Its result.
    pub result: SimResult,
}

/// Run every policy on the trace.
pub fn run(a: &KeepAliveArgs) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(&a.trace)
        .with_context(|| format!("read trace {}", a.trace.display()))?;
    let trace = parse_trace(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.trace.display()))?;
    let mut rows = Vec::new();
    for m in &a.fixed_minutes {
        rows.push(Row {
            policy: format!("fixed {m} min"),
            result: simulate(&trace, &Policy::Fixed(Duration::from_secs(60 * m))),
        });
    }
    rows.push(Row {
        policy: format!(
            "hybrid histogram (fallback {} min)",
            a.hybrid_fallback_minutes
        ),
        result: simulate(
            &trace,
            &Policy::Hybrid(
                HybridConfig::default(),
                Duration::from_secs(60 * a.hybrid_fallback_minutes),
            ),
        ),
    });
    Ok(rows)
}

/// Print the report.
pub fn print(a: &KeepAliveArgs, rows: &[Row]) {
    let base = rows
        .first()
        .map(|r| r.result.idle_minutes.max(1))
        .unwrap_or(1);
    println!(
        "{:<36} {:>11} {:>11} {:>13} {:>14} {:>12}",
        "policy", "cold starts", "cold frac.", "p75 fn cold%", "idle GiB-min", "idle vs 1st"
    );
    for r in rows {
        let gib_min = r.result.idle_minutes as f64 * a.memory_mib as f64 / 1024.0;
        println!(
            "{:<36} {:>11} {:>10.2}% {:>12.1}% {:>14.1} {:>11.2}x",
            r.policy,
            r.result.cold_starts,
            100.0 * r.result.cold_fraction(),
            r.result.function_percentile(75.0),
            gib_min,
            r.result.idle_minutes as f64 / base as f64
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "{} invocations; memory-time counts instance-minutes loaded without invocations \
             at {} MiB each",
            r.result.invocations, a.memory_mib
        );
    }
}
