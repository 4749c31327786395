//! `veil revisions`, `veil traffic` and `veil rollback`: a function's revisions and where its
//! requests go.

use crate::client::AdminClient;
use anyhow::{bail, Context, Result};
use veil_gateway::{FunctionStatus, TrafficTarget};

/// `<rev>=<percent>` or `@latest=<percent>` → a target.
pub fn parse_split(s: &str) -> Result<TrafficTarget> {
    let (rev, pct) = s
        .split_once('=')
        .with_context(|| format!("{s:?}: expected <revision>=<percent> or @latest=<percent>"))?;
    let percent: u32 = pct
        .parse()
        .with_context(|| format!("{s:?}: {pct:?} is not a percent"))?;
    Ok(TrafficTarget {
        revision: parse_revision(rev).with_context(|| format!("{s:?}"))?,
        percent,
        tag: None,
    })
}

/// `<tag>=<rev>` or `<tag>=@latest` → a zero-percent target that the tag addresses.
pub fn parse_tag(s: &str) -> Result<TrafficTarget> {
    let (tag, rev) = s
        .split_once('=')
        .with_context(|| format!("--tag {s:?}: expected <tag>=<revision> or <tag>=@latest"))?;
    Ok(TrafficTarget {
        revision: parse_revision(rev).with_context(|| format!("--tag {s:?}"))?,
        percent: 0,
        tag: Some(tag.to_string()),
    })
}

fn parse_revision(s: &str) -> Result<Option<u64>> {
    if s == "@latest" {
        return Ok(None);
    }
    let n = s.strip_prefix('r').unwrap_or(s);
    match n.parse::<u64>() {
        Ok(r) => Ok(Some(r)),
        Err(_) => bail!("{s:?} is not a revision number or @latest"),
    }
}

/// The traffic that rolls `f` back: everything to `to`, or to the newest revision older than
/// the one taking most of the traffic now; tags stay where they are.
pub fn rollback_traffic(f: &FunctionStatus, to: Option<u64>) -> Result<(u64, Vec<TrafficTarget>)> {
    let current = f
        .traffic
        .iter()
        .filter(|t| t.percent > 0)
        .max_by_key(|t| (t.percent, t.revision))
        .map(|t| t.revision)
        .context("the function has no traffic")?;
    let target = match to {
        Some(r) => r,
        None => f
            .revisions
            .iter()
            .map(|r| r.revision)
            .filter(|r| *r < current)
            .max()
            .with_context(|| {
                format!(
                    "{} has no revision older than {current} to roll back to",
                    f.record.name
                )
            })?,
    };
    let mut traffic = vec![TrafficTarget {
        revision: Some(target),
        percent: 100,
        tag: None,
    }];
    for t in f.traffic.iter().filter(|t| t.tag.is_some()) {
        traffic.push(TrafficTarget {
            revision: (!t.latest).then_some(t.revision),
            percent: 0,
            tag: t.tag.clone(),
        });
    }
    Ok((target, traffic))
}

/// Print a function's traffic.
pub fn print_traffic(f: &FunctionStatus) {
    for t in &f.traffic {
        let what = if t.latest {
            format!("@latest (revision {})", t.revision)
        } else {
            format!("revision {}", t.revision)
        };
        match &t.tag {
            Some(tag) => println!(
                "  {:>3}%  {what}  tag {tag}: /f/{}@{tag}/",
                t.percent, f.record.name
            ),
            None => println!("  {:>3}%  {what}", t.percent),
        }
    }
}

/// `veil revisions <fn>`.
pub async fn revisions(admin: &AdminClient, name: &str) -> Result<()> {
    let f = admin.function(name).await?;
    println!(
        "{:>4} {:>8} {:<6} {:>9} {:>8}  {:<20} IMAGE",
        "REV", "TRAFFIC", "LIVE", "INSTANCES", "STARTING", "TAGS"
    );
    for r in &f.revisions {
        println!(
            "{:>4} {:>7}% {:<6} {:>9} {:>8}  {:<20} {} ({})",
            r.revision,
            r.percent,
            if r.live { "yes" } else { "no" },
            r.instances,
            r.starting,
            if r.tags.is_empty() {
                "-".to_string()
            } else {
                r.tags.join(",")
            },
            r.image,
            r.digest
        );
    }
    Ok(())
}

/// `veil invocation get`: the state on stderr, the function's body on stdout once it
/// succeeded; `json`: the whole record on stdout. Exit status 0 if it succeeded, 1 if it
/// failed, 2 if it has not finished.
pub fn print_invocation(
    inv: &veil_gateway::InvocationStatus,
    json: bool,
) -> Result<std::process::ExitCode> {
    use std::io::Write;
    use veil_gateway::InvocationState as S;
    if json {
        println!("{}", serde_json::to_string_pretty(inv)?);
    } else {
        let status = inv
            .response
            .as_ref()
            .map(|r| format!(", HTTP {}", r.status))
            .unwrap_or_default();
        eprintln!(
            "invocation {} of {}: {:?} after {} attempt(s){status}",
            inv.id, inv.function, inv.state, inv.attempts
        );
        if let Some(e) = &inv.error {
            eprintln!(
                "  {}: {e}",
                if inv.state == S::Failed {
                    "failed"
                } else {
                    "last error"
                }
            );
        }
        if let (S::Succeeded, Some(r)) = (inv.state, &inv.response) {
            std::io::stdout().write_all(&r.body)?;
        }
    }
    Ok(match inv.state {
        S::Succeeded => std::process::ExitCode::SUCCESS,
        S::Failed => std::process::ExitCode::FAILURE,
        S::Queued | S::Running => std::process::ExitCode::from(2),
    })
}

/// A duration: `250ms`, `1.5s`, `90s`, `5m`, `1h`, `2d`, or plain (fractional) seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 5m, 1h)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        u => return Err(format!("unknown unit {u:?} in {s:?} (ms, s, m, h or d)")),
    };
    std::time::Duration::try_from_secs_f64(n * scale).map_err(|_| format!("{s:?} is out of range"))
}

/// A duration of at least one second, in whole seconds (rounded up).
pub fn parse_whole_seconds(s: &str) -> Result<u64, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than one second"));
    }
    Ok(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "s", "-1s", "5 years", "1e400", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_whole_seconds("1.2s"), Ok(2));
        assert_eq!(parse_whole_seconds("10m"), Ok(600));
        assert!(parse_whole_seconds("500ms").is_err());
    }
}
