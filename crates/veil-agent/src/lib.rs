//! veil-agent: the first process in every sandbox.
//!
//! In a namespace sandbox it starts as `veil-agent sandbox …` with its channel on fd 3, forks
//! once to become PID 1 of its new PID namespace ([`nsinit`]), builds a private root on tmpfs
//! and pivots into it. Then it waits on its channel: an assignment makes it pull the function's
//! image over the channel, verify every digest, unpack it ([`pull`]), start the function with
//! `PORT` set and wait until it listens ([`function`]); after that it carries invocations to the
//! function ([`server`]). A sandbox is assigned at most once, and the agent exits (ending the
//! sandbox) when its function exits.

pub mod attest;
mod conn;
pub mod function;
pub mod guest;
pub mod logsink;
pub mod nsinit;
pub mod pull;
pub mod seccomp;
pub mod server;

use std::process::ExitCode;

/// Options of `veil-agent sandbox`.
#[derive(Debug, Clone)]
pub struct SandboxArgs {
    /// Sandbox id (for the hostname and logs).
    pub id: String,
    /// Host directory to mount the private root on (inside the new mount namespace).
    pub root_dir: std::path::PathBuf,
    /// Size of the private root's tmpfs in bytes.
    pub root_size: u64,
}

fn parse_args(args: &[String]) -> Result<SandboxArgs, String> {
    let mut id = None;
    let mut root_dir = None;
    let mut root_size = 512u64 << 20;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--id" => id = Some(val()?),
            "--root-dir" => root_dir = Some(std::path::PathBuf::from(val()?)),
            "--root-size" => {
                let v = val()?;
                root_size = v
                    .parse()
                    .map_err(|_| format!("--root-size: not a number of bytes: {v}"))?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let id = id.ok_or("--id is required")?;
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!("--id must be alphanumeric: {id:?}"));
    }
    Ok(SandboxArgs {
        id,
        root_dir: root_dir.ok_or("--root-dir is required")?,
        root_size,
    })
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv0 = std::env::args().next();
    if guest::is_guest_init(argv0.as_deref(), args.first().map(String::as_str)) {
        // The initrd's /init: mounts, modules, the virtio-serial channel; never returns.
        guest::main();
    }
    match args.first().map(String::as_str) {
        Some("sandbox") => {}
        Some("--version") => {
            println!("veil-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("usage: veil-agent sandbox --id <id> --root-dir <dir> [--root-size <bytes>]");
            eprintln!("veil-agent is started by a veil node inside a sandbox, not by hand.");
            return ExitCode::from(2);
        }
    }
    let sargs = match parse_args(&args[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("veil-agent: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    // Still single-threaded: fork so that the child is PID 1 of the new PID namespace.
    if let Err(e) = nsinit::become_pid1() {
        eprintln!("veil-agent: {e:#}");
        return ExitCode::from(1);
    }
    if let Err(e) = nsinit::setup_root(&sargs) {
        tracing::error!("sandbox setup failed: {e:#}");
        return ExitCode::from(1);
    }
    attest::precompute_software_measurement();
    // One thread: the agent relays invocations and does its heavy work (unpacking,
    // decryption) on the blocking pool, so a second worker only added cross-thread wake-ups
    // to every request (measured: serving_bench in docs/benchmarks.md).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(server::run_on_fd(veil_proto_channel_fd())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("agent stopped: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Where this agent runs: `namespace` (a namespace sandbox) or `guest` (a VM's `/init`).
pub fn platform() -> &'static str {
    if guest::in_guest() {
        "guest"
    } else {
        "namespace"
    }
}

fn veil_proto_channel_fd() -> i32 {
    3
}

fn init_logging() {
    // The log travels over the channel it would otherwise describe: the channel's own
    // machinery (yamux, hyper) logs at most warnings, or every line would beget more.
    let base = std::env::var("VEIL_LOG").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(format!(
        "{base},yamux=warn,hyper=warn,hyper_util=warn"
    ))
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logsink::agent_writer)
        .with_ansi(false)
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args() {
        let a = parse_args(&s(&[
            "--id",
            "ab12",
            "--root-dir",
            "/x",
            "--root-size",
            "1024",
        ]))
        .unwrap();
        assert_eq!(a.id, "ab12");
        assert_eq!(a.root_size, 1024);
        for bad in [
            &["--id"][..],
            &["--root-dir", "/x"],
            &["--id", "a/b", "--root-dir", "/x"],
            &["--id", "a", "--root-dir", "/x", "--root-size", "big"],
            &["--id", "a", "--root-dir", "/x", "--what"],
        ] {
            assert!(parse_args(&s(bad)).is_err(), "{bad:?}");
        }
    }
}
