//! What `veil bench` found: the JSON it writes (`bench.json`), the markdown table in the
//! study's layout (`bench.md`), the ratios it prints, and the progress display.

use super::{BenchOptions, Images};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// min / median / max of a sample.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Stats {
    /// The stats of `v` (NaN values are left out; all zero for no value).
    pub fn of(v: &[f64]) -> Self {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        if n == 0 {
            return Self {
                n,
                min: 0.0,
                median: 0.0,
                max: 0.0,
            };
        }
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Self {
            n,
            min: s[0],
            median,
            max: s[n - 1],
        }
    }
}

/// N concurrent cold starts of distinct functions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Throughput {
    /// Concurrent starts.
    pub n: usize,
    /// From the first request sent to the last answer.
    pub took_s: f64,
    /// Cold starts completed per second.
    pub per_s: f64,
}

/// One configuration's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Cold start seen by the client: the first request to a function with no instance, the
    /// generic pool full.
    pub cold_ms: Stats,
    /// The same start as the node timed it (`x-veil-cold-start` total).
    pub cold_node_ms: Stats,
    /// Each phase of the cold starts (`x-veil-cold-start`), in milliseconds.
    pub phases_ms: BTreeMap<String, Stats>,
    /// A request to the warm instance.
    pub warm_ms: Stats,
    /// Instantiation throughput, per N.
    pub throughput: Vec<Throughput>,
}

/// A row of the ladder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rung {
    /// Short name.
    pub name: String,
    /// What the configuration adds.
    pub what: String,
    /// Its figures, if it ran here.
    pub measured: Option<Measured>,
    /// Why it did not run here.
    pub not_measured: Option<String>,
}

impl Rung {
    pub(super) fn measured(name: &str, what: &str, m: Measured) -> Self {
        Self {
            name: name.into(),
            what: what.into(),
            measured: Some(m),
            not_measured: None,
        }
    }

    pub(super) fn not_measured(name: &str, what: &str, why: &str) -> Self {
        Self {
            name: name.into(),
            what: what.into(),
            measured: None,
            not_measured: Some(why.into()),
        }
    }
}

/// One run of the external pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineRun {
    /// `plain` or `encrypted`.
    pub image: String,
    /// `skopeo copy` from the registry (decrypting, for the encrypted image).
    pub pull_ms: f64,
    /// `umoci unpack`.
    pub unpack_ms: f64,
    /// `runc run` until the function answered.
    pub run_ms: f64,
    /// All three.
    pub total_ms: f64,
}

/// The external pipeline's runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pipeline {
    /// Every run, in order.
    pub runs: Vec<PipelineRun>,
    /// Why it did not run, if it did not.
    pub not_measured: Option<String>,
}

impl Pipeline {
    /// Stats of `f` over the runs of `image`.
    pub fn stats(&self, image: &str, f: fn(&PipelineRun) -> f64) -> Option<Stats> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.image == image)
            .map(f)
            .collect();
        (!v.is_empty()).then(|| Stats::of(&v))
    }
}

/// Everything `veil bench` measured in one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The format of this document.
    pub schema: u32,
    /// When it ran (seconds since the epoch).
    pub started_unix_s: u64,
    /// How long it took.
    pub took_s: f64,
    /// A smoke run.
    pub quick: bool,
    /// Cold starts per configuration.
    pub rounds: usize,
    /// The machine's CPUs.
    pub cpus: usize,
    /// The sandbox backend of the measured rows.
    pub backend: String,
    /// The attestation the measured rows used.
    pub tee: String,
    /// The function and its image.
    pub function: String,
    /// Layer bytes of the plain image.
    pub image_bytes: u64,
    /// Layer bytes of the encrypted image.
    pub encrypted_image_bytes: u64,
    /// The ladder, from the runc-like baseline up.
    pub rungs: Vec<Rung>,
    /// The pipeline a user would script instead.
    pub pipeline: Pipeline,
}

/// The study's figures (cold start s / warm start s / instantiation per s), measured
/// elsewhere, on other hardware: quoted beside veil's, never compared as if measured here.
pub const STUDY: [(&str, &str, &str, &str); 3] = [
    ("Knative on runc", "6", "1", "1"),
    ("Knative on Kata", "7", "2", "0.5"),
    (
        "Knative on Confidential Containers",
        "17.5",
        "17.5",
        "about 0.1",
    ),
];

fn layer_bytes(i: &veil_image::build::BuiltImage) -> u64 {
    i.layers.iter().map(|l| l.data.len() as u64).sum()
}

impl Report {
    pub(super) fn new(opts: &BenchOptions, imgs: &Images) -> Self {
        Self {
            schema: 1,
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            took_s: 0.0,
            quick: opts.quick,
            rounds: opts.rounds,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backend: "namespace (process)".into(),
            tee: "software TEE (INSECURE, development only; no SEV-SNP/TDX here)".into(),
            function: "hello (the example function: a static binary)".into(),
            image_bytes: layer_bytes(&imgs.plain),
            encrypted_image_bytes: layer_bytes(&imgs.encrypted),
            rungs: Vec::new(),
            pipeline: Pipeline {
                runs: Vec::new(),
                not_measured: None,
            },
        }
    }

    fn measured(&self) -> impl Iterator<Item = (&Rung, &Measured)> {
        self.rungs
            .iter()
            .filter_map(|r| r.measured.as_ref().map(|m| (r, m)))
    }

    /// The ratios that matter, one line each: every step of the ladder over the one before,
    /// confidential over plain, veil over the pipeline.
    pub fn ratios(&self) -> Vec<String> {
        let mut out = Vec::new();
        let rows: Vec<_> = self.measured().collect();
        let top = |m: &Measured| m.throughput.last().map(|t| t.per_s).unwrap_or(f64::NAN);
        for w in rows.windows(2) {
            let ((a, ma), (b, mb)) = (w[0], w[1]);
            out.push(format!(
                "{} over {}: cold {:.2}x, warm {:.2}x, throughput {:.2}x",
                b.name,
                a.name,
                mb.cold_ms.median / ma.cold_ms.median,
                mb.warm_ms.median / ma.warm_ms.median,
                top(mb) / top(ma)
            ));
        }
        if let (Some((p, mp)), Some((c, mc))) = (rows.first(), rows.last()) {
            out.push(format!(
                "confidential ({}) over plain ({}): cold {:.2}x, warm {:.2}x, throughput {:.2}x",
                c.name,
                p.name,
                mc.cold_ms.median / mp.cold_ms.median,
                mc.warm_ms.median / mp.warm_ms.median,
                top(mc) / top(mp)
            ));
            for (image, m, label) in [
                ("plain", mp, p.name.as_str()),
                ("encrypted", mc, c.name.as_str()),
            ] {
                if let Some(s) = self.pipeline.stats(image, |r| r.total_ms) {
                    out.push(format!(
                        "veil ({label}) over the pipeline ({image} image): cold {:.3}x ({:.1} ms vs {:.1} ms)",
                        m.cold_ms.median / s.median,
                        m.cold_ms.median,
                        s.median
                    ));
                }
            }
        }
        out
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# veil bench\n");
        let _ = writeln!(
            s,
            "{} run{}, {} CPUs, {} backend, {}. Function: {}, {} layer bytes ({} encrypted). \
             Took {:.0} s.\n",
            self.rounds,
            if self.quick { " (--quick)" } else { "s" },
            self.cpus,
            self.backend,
            self.tee,
            self.function,
            self.image_bytes,
            self.encrypted_image_bytes,
            self.took_s
        );
        let _ = writeln!(s, "## The study's table\n");
        let _ = writeln!(
            s,
            "| platform | cold start | warm start | instantiation throughput | where |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (name, cold, warm, tput) in STUDY {
            let _ = writeln!(
                s,
                "| {name} | {cold} s | {warm} s | {tput} per s | measured elsewhere (the study) |"
            );
        }
        for (r, m) in self.measured() {
            let t = m.throughput.last();
            let _ = writeln!(
                s,
                "| veil, {} | {:.1} ms | {:.2} ms | {} | measured here |",
                r.name,
                m.cold_ms.median,
                m.warm_ms.median,
                t.map(|t| format!("{:.0} per s (N = {})", t.per_s, t.n))
                    .unwrap_or_default()
            );
        }
        if let Some(st) = self.pipeline.stats("plain", |r| r.total_ms) {
            let _ = writeln!(
                s,
                "| skopeo + umoci + runc (plain image) | {:.1} ms | — | — | measured here |",
                st.median
            );
        }
        if let Some(st) = self.pipeline.stats("encrypted", |r| r.total_ms) {
            let _ = writeln!(
                s,
                "| skopeo --decryption-key + umoci + runc (encrypted image) | {:.1} ms | — | — | measured here |",
                st.median
            );
        }
        let _ = writeln!(s, "\n## The ladder (min / median / max)\n");
        let _ = writeln!(
            s,
            "| configuration | cold start, client (ms) | cold start, node (ms) | warm start (ms) | throughput per s by N |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        let mmm = |st: &Stats, p: usize| {
            format!("{:.p$} / {:.p$} / {:.p$}", st.min, st.median, st.max, p = p)
        };
        for r in &self.rungs {
            match (&r.measured, &r.not_measured) {
                (Some(m), _) => {
                    let t: Vec<String> = m
                        .throughput
                        .iter()
                        .map(|t| format!("{}: {:.0}", t.n, t.per_s))
                        .collect();
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} |",
                        r.name,
                        mmm(&m.cold_ms, 1),
                        mmm(&m.cold_node_ms, 1),
                        mmm(&m.warm_ms, 2),
                        t.join(", ")
                    );
                }
                (None, why) => {
                    let _ = writeln!(
                        s,
                        "| {} | not measured: {} | | | |",
                        r.name,
                        why.as_deref().unwrap_or("")
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "\n## Where a cold start's time goes (median ms per phase)\n"
        );
        let names: Vec<String> = {
            let mut v: Vec<String> = self
                .measured()
                .flat_map(|(_, m)| m.phases_ms.keys().cloned())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let _ = writeln!(s, "| configuration | {} |", names.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(names.len()));
        for (r, m) in self.measured() {
            let cells: Vec<String> = names
                .iter()
                .map(|k| {
                    m.phases_ms
                        .get(k)
                        .map(|st| format!("{:.1}", st.median))
                        .unwrap_or_default()
                })
                .collect();
            let _ = writeln!(s, "| {} | {} |", r.name, cells.join(" | "));
        }
        let _ = writeln!(s, "\n## The pipeline a user would script instead\n");
        match &self.pipeline.not_measured {
            Some(why) => {
                let _ = writeln!(s, "Not measured: {why}");
            }
            None => {
                let _ = writeln!(
                    s,
                    "| image | skopeo copy (ms) | umoci unpack (ms) | runc run until it answers (ms) | total (ms) |"
                );
                let _ = writeln!(s, "|---|---|---|---|---|");
                for image in ["plain", "encrypted"] {
                    let st = |f: fn(&PipelineRun) -> f64| {
                        self.pipeline
                            .stats(image, f)
                            .map(|x| mmm(&x, 1))
                            .unwrap_or_default()
                    };
                    let _ = writeln!(
                        s,
                        "| {image} | {} | {} | {} | {} |",
                        st(|r| r.pull_ms),
                        st(|r| r.unpack_ms),
                        st(|r| r.run_ms),
                        st(|r| r.total_ms)
                    );
                }
            }
        }
        let _ = writeln!(s, "\n## Ratios (medians, this run)\n");
        for r in self.ratios() {
            let _ = writeln!(s, "- {r}");
        }
        s
    }

    /// Write `bench.json` and `bench.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = dir.join("bench.json");
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", json.display()))?;
        let md = dir.join("bench.md");
        std::fs::write(&md, self.markdown()).with_context(|| format!("write {}", md.display()))?;
        Ok(())
    }
}

/// The progress display: a bar on a terminal, plain lines otherwise.
#[derive(Clone)]
pub struct Progress(indicatif::ProgressBar);

impl Progress {
    pub(super) fn new(steps: u64) -> Self {
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let b = indicatif::ProgressBar::new(steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed:>4} [{bar:30}] {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        Self(bar)
    }

    pub(super) fn say(&self, what: &str) {
        if self.0.is_hidden() {
            eprintln!("veil bench: {what}");
        }
        self.0.set_message(what.to_string());
    }

    pub(super) fn step(&self) {
        self.0.inc(1);
    }

    pub(super) fn finish(&self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_middle_and_ignore_nan() {
        let s = Stats::of(&[3.0, 1.0, f64::NAN, 2.0, 10.0]);
        assert_eq!((s.n, s.min, s.median, s.max), (4, 1.0, 2.5, 10.0));
        assert_eq!(Stats::of(&[5.0]).median, 5.0);
        assert_eq!(Stats::of(&[]).n, 0);
    }
}
