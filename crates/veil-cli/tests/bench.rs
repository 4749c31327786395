//! `veil bench --quick` from the binary, as a user runs it: the outputs exist and are
//! well-formed — every configuration of the ladder measured or said not to be, with a reason,
//! the external pipeline (real skopeo, umoci, runc and docker-registry) measured — and bad
//! options are refused with a clear error. Never that a time is below a bound.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use veil_cli::bench::Report;

const VEIL: &str = env!("CARGO_BIN_EXE_veil");

#[test]
fn a_quick_run_writes_the_table_the_figures_and_the_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = Command::new(VEIL)
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .env("VEIL_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("INSECURE software TEE"), "{stderr}");

    let r: Report =
        serde_json::from_slice(&std::fs::read(out.join("bench.json")).unwrap()).unwrap();
    assert_eq!(r.schema, 1);
    assert!(r.quick);
    assert!(r.tee.contains("INSECURE"), "{}", r.tee);
    let names: Vec<&str> = r.rungs.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "namespace",
            "+ attestation",
            "+ signed image",
            "+ encrypted image",
            "microVM",
            "microVM + firmware",
            "SEV-SNP",
            "TDX"
        ]
    );
    for rung in &r.rungs[..4] {
        let m = rung.measured.as_ref().unwrap_or_else(|| panic!("{rung:?}"));
        assert_eq!(m.cold_ms.n, 1, "{}", rung.name);
        assert_eq!(m.warm_ms.n, 10, "{}", rung.name);
        assert!(m.cold_ms.median > 0.0 && m.warm_ms.median > 0.0, "{rung:?}");
        let ns: Vec<usize> = m.throughput.iter().map(|t| t.n).collect();
        assert_eq!(ns, [1, 4], "{}", rung.name);
        assert!(m.throughput.iter().all(|t| t.per_s > 0.0), "{rung:?}");
        for phase in ["layers", "manifest", "spawn", "ready"] {
            assert!(m.phases_ms.contains_key(phase), "{}: no {phase}", rung.name);
        }
    }
    // Attestation happened where the configuration asks for it, and only there.
    assert_eq!(
        r.rungs[0].measured.as_ref().unwrap().phases_ms["attest"].median,
        0.0
    );
    assert!(r.rungs[1].measured.as_ref().unwrap().phases_ms["attest"].median > 0.0);
    assert!(r.rungs[2].measured.as_ref().unwrap().phases_ms["signature"].median > 0.0);
    for rung in &r.rungs[4..] {
        assert!(rung.measured.is_none(), "{rung:?}");
        assert!(
            !rung.not_measured.as_deref().unwrap_or("").is_empty(),
            "{rung:?}"
        );
    }
    assert_eq!(r.pipeline.not_measured, None, "{:?}", r.pipeline);
    let images: Vec<&str> = r.pipeline.runs.iter().map(|x| x.image.as_str()).collect();
    assert_eq!(images, ["plain", "encrypted"]);
    for p in &r.pipeline.runs {
        assert!(
            p.pull_ms > 0.0 && p.unpack_ms > 0.0 && p.run_ms > 0.0,
            "{p:?}"
        );
        assert!(
            (p.pull_ms + p.unpack_ms + p.run_ms - p.total_ms).abs() < 0.01,
            "{p:?}"
        );
    }
    assert!(r.encrypted_image_bytes > 0 && r.image_bytes > 0);

    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    for want in [
        "## The study's table",
        "measured elsewhere (the study)",
        "| veil, + encrypted image |",
        "## The ladder",
        "## Where a cold start's time goes",
        "| skopeo + umoci + runc (plain image) |",
        "veil (namespace) over the pipeline (plain image)",
        "confidential (+ encrypted image) over plain (namespace)",
        "| SEV-SNP | not measured: ",
    ] {
        assert!(md.contains(want), "bench.md lacks {want:?}:\n{md}");
    }
    assert!(stdout.contains("## Ratios"), "{stdout}");
    // Nothing is left behind: no container, no sandbox process.
    let runc = Command::new("runc").arg("list").output().unwrap();
    assert!(
        !String::from_utf8_lossy(&runc.stdout).contains("veil-bench-"),
        "{}",
        String::from_utf8_lossy(&runc.stdout)
    );
}

#[test]
fn bad_options_are_refused_clearly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = dir.path().join("out").display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--rounds", "0", "--out", &out], "--rounds must be 1..=50"),
        (
            &["--rounds", "51", "--out", &out],
            "--rounds must be 1..=50",
        ),
        (&["--warm", "0", "--out", &out], "--warm must be"),
        (
            &["--throughput-n", "4,0", "--out", &out],
            "--throughput-n must name counts of 1..=64",
        ),
        (
            &["--throughput-n", "65", "--out", &out],
            "--throughput-n must name counts of 1..=64",
        ),
        (&["--rounds", "x"], "invalid value 'x'"),
    ];
    for (args, want) in cases {
        let run = Command::new(VEIL)
            .arg("bench")
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    assert!(
        !dir.path().join("out").exists(),
        "a refused run wrote its output directory"
    );
    let run = Command::new(VEIL)
        .args(["bench", "--quick", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("create the output directory"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}
