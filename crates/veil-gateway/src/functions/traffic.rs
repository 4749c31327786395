//! Traffic: which revisions a function's requests go to. A target names a revision (or
//! `@latest`, which follows every deploy), a percent of the untagged requests, and optionally
//! a tag that addresses it alone. Validation, resolution and the weighted pick live here.

use super::FunctionRecord;
use crate::state::TrafficTarget;
use std::collections::{BTreeMap, BTreeSet};

/// Most targets a function's traffic may have.
pub const MAX_TARGETS: usize = 32;

/// Most revisions kept per function: beyond it, a deploy drops the oldest revision that no
/// traffic or tag names.
pub const MAX_REVISIONS: usize = 50;

/// The revision `t` resolves to, given the function's revisions.
pub(crate) fn resolve(revisions: &BTreeMap<u64, FunctionRecord>, t: &TrafficTarget) -> u64 {
    t.revision
        .unwrap_or_else(|| revisions.keys().next_back().copied().unwrap_or(0))
}

/// The revisions that must be live: those with a share of the traffic or a tag.
pub(crate) fn wanted(
    revisions: &BTreeMap<u64, FunctionRecord>,
    traffic: &[TrafficTarget],
) -> BTreeSet<u64> {
    traffic
        .iter()
        .filter(|t| t.percent > 0 || t.tag.is_some())
        .map(|t| resolve(revisions, t))
        .collect()
}

/// The revision a request goes to: the tagged target's, or one drawn by percent with `roll`
/// in `0..100`. `None` if the tag is unknown.
pub(crate) fn pick(
    revisions: &BTreeMap<u64, FunctionRecord>,
    traffic: &[TrafficTarget],
    tag: Option<&str>,
    roll: u32,
) -> Option<u64> {
    if let Some(tag) = tag {
        return traffic
            .iter()
            .find(|t| t.tag.as_deref() == Some(tag))
            .map(|t| resolve(revisions, t));
    }
    let mut acc = 0;
    let mut last = None;
    for t in traffic.iter().filter(|t| t.percent > 0) {
        acc += t.percent;
        last = Some(t);
        if roll < acc {
            return Some(resolve(revisions, t));
        }
    }
    last.map(|t| resolve(revisions, t))
}

/// Check `traffic` against the function's revisions: every problem found, for a 400.
pub fn validate(
    revisions: &BTreeMap<u64, FunctionRecord>,
    traffic: &[TrafficTarget],
) -> Result<(), String> {
    let mut problems = Vec::new();
    if traffic.is_empty() {
        problems.push("traffic needs at least one target".to_string());
    }
    if traffic.len() > MAX_TARGETS {
        problems.push(format!("at most {MAX_TARGETS} traffic targets are allowed"));
    }
    let sum: u64 = traffic.iter().map(|t| u64::from(t.percent)).sum();
    if sum != 100 {
        problems.push(format!("the percents sum to {sum}, not 100"));
    }
    let mut tags = BTreeSet::new();
    let mut untagged = BTreeSet::new();
    for t in traffic {
        if let Some(r) = t.revision {
            if !revisions.contains_key(&r) {
                let known: Vec<String> = revisions.keys().map(u64::to_string).collect();
                problems.push(format!(
                    "revision {r} does not exist (revisions: {})",
                    known.join(", ")
                ));
            }
        }
        match &t.tag {
            Some(tag) if !super::valid_name(tag) || tag == "latest" => problems.push(format!(
                "tag {tag:?} must be 1-63 lowercase letters, digits or '-' (and not \"latest\")"
            )),
            Some(tag) if !tags.insert(tag.clone()) => {
                problems.push(format!("tag {tag:?} is given twice"))
            }
            Some(_) => {}
            None => {
                if !untagged.insert(t.revision) {
                    problems.push(match t.revision {
                        Some(r) => format!("revision {r} is listed twice without a tag"),
                        None => "@latest is listed twice without a tag".to_string(),
                    });
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.dedup();
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(revision: Option<u64>, percent: u32, tag: Option<&str>) -> TrafficTarget {
        TrafficTarget {
            revision,
            percent,
            tag: tag.map(str::to_string),
        }
    }

    fn revisions(n: &[u64]) -> BTreeMap<u64, FunctionRecord> {
        let base: FunctionRecord = serde_json::from_value(serde_json::json!({
            "name": "f", "tenant": "t",
            "image": {"reference": "local/f:v1", "registry": "local", "repository": "f",
                "manifest_digest":
                "sha256:0000000000000000000000000000000000000000000000000000000000000000"},
            "env": {}, "concurrency": 1, "min_scale": 0, "max_scale": 1, "port": 8080,
            "ready_timeout_s": 1, "idle_timeout_s": 1, "revision": 0
        }))
        .expect("a record");
        n.iter()
            .map(|r| {
                let mut rec = base.clone();
                rec.revision = *r;
                (*r, rec)
            })
            .collect()
    }

    #[test]
    fn picks_follow_the_percents_and_tags() {
        let revs = revisions(&[1, 2, 3]);
        let t = vec![
            target(Some(1), 90, None),
            target(None, 10, None),
            target(Some(2), 0, Some("canary")),
        ];
        assert_eq!(validate(&revs, &t), Ok(()));
        assert_eq!(pick(&revs, &t, None, 0), Some(1));
        assert_eq!(pick(&revs, &t, None, 89), Some(1));
        assert_eq!(pick(&revs, &t, None, 90), Some(3));
        assert_eq!(pick(&revs, &t, None, 99), Some(3));
        assert_eq!(pick(&revs, &t, Some("canary"), 0), Some(2));
        assert_eq!(pick(&revs, &t, Some("nope"), 0), None);
        assert_eq!(wanted(&revs, &t), BTreeSet::from([1, 2, 3]));
        // A zero-percent untagged target is not live.
        let t = vec![target(Some(1), 100, None), target(Some(2), 0, None)];
        assert_eq!(wanted(&revs, &t), BTreeSet::from([1]));
    }

    #[test]
    fn bad_traffic_is_refused_with_every_reason() {
        let revs = revisions(&[1, 2]);
        let cases: &[(Vec<TrafficTarget>, &str)] = &[
            (vec![], "at least one"),
            (vec![target(Some(1), 90, None)], "sum to 90"),
            (
                vec![target(Some(1), 50, None), target(Some(1), 50, None)],
                "listed twice",
            ),
            (
                vec![target(Some(7), 100, None)],
                "revision 7 does not exist",
            ),
            (
                vec![target(Some(1), 100, Some("Bad_Tag"))],
                "tag \"Bad_Tag\"",
            ),
            (
                vec![
                    target(Some(1), 100, Some("a")),
                    target(Some(2), 0, Some("a")),
                ],
                "given twice",
            ),
            (
                vec![target(None, 60, None), target(None, 60, None)],
                "sum to 120",
            ),
        ];
        for (t, want) in cases {
            let err = validate(&revs, t).expect_err(want);
            assert!(err.contains(want), "{t:?}: {err}");
        }
    }
}
