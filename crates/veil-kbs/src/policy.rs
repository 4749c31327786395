//! Rego policies (evaluated with regorus).
//!
//! A policy is one Rego module in `package policy`. The broker reads two rules:
//! `allow` (must be `true` to allow; undefined counts as deny) and, optionally, `deny`: a set of
//! strings whose members are the reasons given to the client when access is denied.

use crate::error::{KbsError, Result};

/// The reference value listing the tenants that opted in to the INSECURE software TEE.
pub const SOFTWARE_TEE_TENANTS: &str = "software_tee_tenants";

/// The default attestation policy. Input: `{"claims", "init_data" (veil's assignment when it is
/// bound to the evidence, `{"tenant", "scope": "tenant"}` for a tenant-scoped attestation, else
/// `{}`), "init_data_claims" (the init-data document's `data` when bound, or null),
/// "init_data_binding" (`runtime`, `launch`, `endorsed`, `none`, `statement` or null), "phase"
/// (`tenant` when a sandbox attests to its tenant only; `assignment` when its assignment is
/// known — at attestation, or when a tenant-attested sandbox states it), "reference_values",
/// "config": {"allow_insecure", "allow_unendorsed_sample"}}`.
pub const DEFAULT_ATTESTATION_POLICY: &str = r#"package policy

import rego.v1

default allow := false

allow if count(deny) == 0

deny contains "software TEE is insecure and not allowed by this broker's policy" if {
	input.claims.insecure
	not input.config.allow_insecure
}

# Even where the broker allows it, a tenant must opt in to the software TEE.
deny contains sprintf("tenant %v has not opted in to the INSECURE software TEE (reference value software_tee_tenants)", [object.get(input.init_data, "tenant", null)]) if {
	input.claims.insecure
	endorsed
	not object.get(input.init_data, "tenant", null) in object.get(input.reference_values, "software_tee_tenants", [])
}

# Sample evidence without a host endorsement proves nothing and comes from anyone.
deny contains "unendorsed sample evidence (anyone can make it up) is accepted only by a broker started with --insecure-allow-unendorsed-sample" if {
	input.claims.insecure
	not endorsed
	not input.config.allow_unendorsed_sample
}

endorsed if {
	object.get(object.get(input.claims, "details", {}), "endorsement", null) != null
}

deny contains "the guest was launched with debugging allowed: the host can read its memory" if {
	input.claims.debug
}

# Hardware TEEs must match a registered measurement.
deny contains "no reference measurement is registered for this hardware TEE" if {
	not input.claims.insecure
	count(object.get(input.reference_values, "measurement", [])) == 0
}

# ... and run an image the tenant pinned: the host chooses what runs, so the broker must. Either
# by digest, or by image reference together with a signature policy (the sandbox then checks
# that the digest it runs is signed for that reference). Pins are per tenant where the tenant
# registered its own (`image_digest.<tenant>`, `image.<tenant>`, `signature_policy.<tenant>`),
# else the broker-wide ones: on a broker shared by tenants, a tenant's function must not be
# able to run another tenant's pinned image with its secrets.
tenant := object.get(input.init_data, "tenant", "")

# A sandbox attesting to its tenant before it has a function (a tenant-attested pool): its
# image is checked when it states its assignment, with this same policy.
tenant_phase if input.phase == "tenant"

pins(name) := v if {
	v := input.reference_values[sprintf("%s.%s", [name, tenant])]
} else := object.get(input.reference_values, name, [])

deny contains "no reference image digest (nor an image reference with a signature policy) is registered for this hardware TEE" if {
	not input.claims.insecure
	not tenant_phase
	count(pins("image_digest")) == 0
	not signature_pinned
}

signature_pinned if {
	count(pins("image")) > 0
	count(pins("signature_policy")) > 0
}

deny contains sprintf("image %v is not among the reference values", [object.get(input.init_data, "image", null)]) if {
	not tenant_phase
	count(pins("image")) > 0
	not object.get(input.init_data, "image", null) in pins("image")
}

deny contains sprintf("signature policy %v is not among the reference values", [object.get(input.init_data, "signature_policy", null)]) if {
	not tenant_phase
	count(pins("signature_policy")) > 0
	not object.get(input.init_data, "signature_policy", null) in pins("signature_policy")
}

deny contains sprintf("measurement %s is not among the reference values", [input.claims.measurement]) if {
	count(object.get(input.reference_values, "measurement", [])) > 0
	not input.claims.measurement in input.reference_values.measurement
}

deny contains sprintf("init data %s is not among the reference values", [input.claims.init_data]) if {
	count(object.get(input.reference_values, "init_data", [])) > 0
	not input.claims.init_data in input.reference_values.init_data
}

deny contains sprintf("image digest %v is not among the reference values", [object.get(input.init_data, "image_digest", null)]) if {
	not tenant_phase
	count(pins("image_digest")) > 0
	not object.get(input.init_data, "image_digest", null) in pins("image_digest")
}
"#;

/// The default resource policy: an attested sandbox bound to a tenant (whose repository the
/// broker already matched) may read; a token naming no tenant gets nothing. Input: `{"token": <token claims>, "resource":
/// {"repository", "type", "tag"}}`.
pub const DEFAULT_RESOURCE_POLICY: &str = r#"package policy

import rego.v1

default allow := false

allow if count(deny) == 0

deny contains "this token names no tenant (its init-data holds no veil assignment bound to the evidence): the default resource policy releases resources only to a tenant's attested sandboxes" if {
	object.get(input.token, "tenant", null) == null
}

deny contains sprintf("resource %v/%v/%v is not in the attested tenant's repository", [input.resource.repository, input.resource.type, input.resource.tag]) if {
	object.get(input.token, "tenant", null) != null
	input.token.tenant != input.resource.repository
}
"#;

/// A policy decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed?
    pub allow: bool,
    /// Reasons the policy gave (its `deny` set), sorted.
    pub reasons: Vec<String>,
}

/// A compiled policy.
#[derive(Clone)]
pub(crate) struct Policy {
    engine: regorus::Engine,
    pub(crate) source: String,
}

impl Policy {
    /// Parse `rego`, require `package policy` with an `allow` rule, and check that it evaluates.
    pub(crate) fn compile(rego: &str, sample_input: serde_json::Value) -> Result<Self> {
        let mut engine = regorus::Engine::new();
        let package = engine
            .add_policy("policy.rego".into(), rego.to_string())
            .map_err(|e| KbsError::Policy(format!("{e}").trim().to_string()))?;
        if package != "data.policy" {
            return Err(KbsError::Policy(format!(
                "the policy must be in `package policy`, not {package:?}"
            )));
        }
        let p = Self {
            engine,
            source: rego.to_string(),
        };
        p.evaluate(sample_input).map_err(KbsError::Policy)?;
        Ok(p)
    }

    /// Evaluate with `input`.
    pub(crate) fn evaluate(&self, input: serde_json::Value) -> Result<Decision, String> {
        let mut engine = self.engine.clone();
        engine.set_input(regorus::Value::from(input));
        // Rules are evaluated directly (no query parsing); reasons only when denied.
        let allow = match engine.eval_rule("data.policy.allow".into()) {
            Ok(regorus::Value::Bool(b)) => b,
            Ok(regorus::Value::Undefined) | Ok(regorus::Value::Null) => false,
            Ok(other) => return Err(format!("`allow` must be a boolean, not {other}")),
            Err(e) => return Err(format!("{e}")),
        };
        let mut reasons = Vec::new();
        if !allow {
            if let Ok(v) = engine.eval_rule("data.policy.deny".into()) {
                if let Ok(set) = v.as_set() {
                    for r in set.iter() {
                        reasons.push(match r {
                            regorus::Value::String(s) => s.to_string(),
                            other => other.to_string(),
                        });
                    }
                } else if let regorus::Value::String(s) = v {
                    reasons.push(s.to_string());
                }
            }
        }
        reasons.sort();
        Ok(Decision { allow, reasons })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn att_input(
        insecure: bool,
        allow_insecure: bool,
        m: &str,
        refs: serde_json::Value,
    ) -> serde_json::Value {
        json!({
            "claims": {"tee": "software", "insecure": insecure, "debug": false, "measurement": m, "init_data": "", "report_data": "",
                       "details": if insecure { json!({"endorsement": {"tenant": "t", "function": "f"}}) } else { json!({}) }},
            "init_data": {"tenant": "t", "function": "f", "image_digest": "sha256:00"},
            "reference_values": refs,
            "config": {"allow_insecure": allow_insecure, "allow_unendorsed_sample": false},
        })
    }

    #[test]
    fn default_attestation_policy() {
        let p = Policy::compile(DEFAULT_ATTESTATION_POLICY, json!({})).unwrap();
        let opted_in = json!({"software_tee_tenants": ["t"]});
        let d = p
            .evaluate(att_input(true, false, "aa", opted_in.clone()))
            .unwrap();
        assert!(!d.allow);
        assert_eq!(
            d.reasons,
            vec!["software TEE is insecure and not allowed by this broker's policy"]
        );
        assert!(
            p.evaluate(att_input(true, true, "aa", opted_in.clone()))
                .unwrap()
                .allow
        );
        // The broker allows the software TEE, but the tenant has not opted in.
        for refs in [json!({}), json!({"software_tee_tenants": ["other"]})] {
            let d = p.evaluate(att_input(true, true, "aa", refs)).unwrap();
            assert!(!d.allow);
            assert_eq!(
                d.reasons,
                vec!["tenant t has not opted in to the INSECURE software TEE (reference value software_tee_tenants)"]
            );
        }
        let d = p
            .evaluate(att_input(
                true,
                true,
                "aa",
                json!({"measurement": ["bb"], "software_tee_tenants": ["t"]}),
            ))
            .unwrap();
        assert!(!d.allow);
        assert!(d.reasons[0].contains("measurement aa"), "{d:?}");
        assert!(
            p.evaluate(att_input(
                true,
                true,
                "aa",
                json!({"measurement": ["bb", "aa"], "software_tee_tenants": ["t"]})
            ))
            .unwrap()
            .allow
        );
        // Unendorsed sample evidence: refused unless the broker accepts it from anyone.
        let mut input = att_input(true, true, "", json!({}));
        input["claims"]["details"] = json!({"endorsement": null});
        input["init_data"] = json!({});
        let d = p.evaluate(input.clone()).unwrap();
        assert!(!d.allow);
        assert_eq!(d.reasons.len(), 1, "{d:?}");
        assert!(d.reasons[0].contains("unendorsed sample evidence"), "{d:?}");
        input["config"]["allow_unendorsed_sample"] = json!(true);
        assert!(p.evaluate(input.clone()).unwrap().allow);
        input["config"]["allow_insecure"] = json!(false);
        assert!(!p.evaluate(input).unwrap().allow);
        // Hardware with a pinned image digest but no assignment: denied.
        let mut input = att_input(
            false,
            false,
            "aa",
            json!({"measurement": ["aa"], "image_digest": ["sha256:x"]}),
        );
        input["init_data"] = json!({});
        let d = p.evaluate(input).unwrap();
        assert!(!d.allow);
        assert!(d.reasons[0].contains("image digest null"), "{d:?}");
        // Per-tenant pins win over the broker-wide ones: tenant t may not run the digest
        // another tenant pinned, even though it is in the broker-wide list.
        let mut input = att_input(
            false,
            false,
            "aa",
            json!({"measurement": ["aa"], "image_digest": ["sha256:x", "sha256:y"],
                   "image_digest.t": ["sha256:x"]}),
        );
        input["init_data"] = json!({"tenant": "t", "image_digest": "sha256:y"});
        let d = p.evaluate(input.clone()).unwrap();
        assert!(!d.allow, "{d:?}");
        input["init_data"]["image_digest"] = json!("sha256:x");
        assert!(p.evaluate(input.clone()).unwrap().allow);
        input["init_data"] = json!({"tenant": "u", "image_digest": "sha256:y"});
        assert!(
            p.evaluate(input).unwrap().allow,
            "no pins of its own: the broker-wide ones"
        );
        // Hardware without reference measurement.
        let d = p
            .evaluate(att_input(false, false, "aa", json!({})))
            .unwrap();
        assert!(!d.allow);
        assert!(
            d.reasons
                .iter()
                .any(|r| r.contains("no reference measurement")),
            "{d:?}"
        );
        assert!(
            d.reasons
                .iter()
                .any(|r| r.contains("no reference image digest")),
            "{d:?}"
        );
        // Hardware with both registered and matching is allowed.
        let mut input = att_input(
            false,
            false,
            "aa",
            json!({"measurement": ["aa"], "image_digest": ["sha256:x"]}),
        );
        input["init_data"] = json!({"image_digest": "sha256:x"});
        assert!(p.evaluate(input).unwrap().allow);

        // Or pinned by image reference plus signature policy (no digest).
        let refs = json!({"measurement": ["aa"], "image": ["reg.example/app:v1"],
            "signature_policy": ["t/policy/images"]});
        let mut input = att_input(false, false, "aa", refs.clone());
        input["init_data"] =
            json!({"image": "reg.example/app:v1", "signature_policy": "t/policy/images"});
        assert!(p.evaluate(input.clone()).unwrap().allow);
        // The host swaps the reference, or drops or swaps the policy: denied.
        for (field, value, reason) in [
            (
                "image",
                json!("reg.example/other:v1"),
                "image reg.example/other:v1 ",
            ),
            ("signature_policy", json!(null), "signature policy null"),
            (
                "signature_policy",
                json!("t/policy/lax"),
                "signature policy t/policy/lax ",
            ),
        ] {
            let mut bad = input.clone();
            bad["init_data"][field] = value;
            let d = p.evaluate(bad).unwrap();
            assert!(!d.allow, "{field}");
            assert!(d.reasons.iter().any(|r| r.contains(reason)), "{d:?}");
        }
        // A reference without a policy pins nothing.
        let mut input = att_input(
            false,
            false,
            "aa",
            json!({"measurement": ["aa"], "image": ["reg.example/app:v1"]}),
        );
        input["init_data"] = json!({"image": "reg.example/app:v1"});
        let d = p.evaluate(input).unwrap();
        assert!(
            d.reasons
                .iter()
                .any(|r| r.contains("no reference image digest")),
            "{d:?}"
        );
    }

    #[test]
    fn bad_policies() {
        for bad in [
            "package policy\nallow if {",
            "package other\nallow := true",
            "package policy\nallow := 1",
        ] {
            assert!(Policy::compile(bad, json!({})).is_err(), "{bad}");
        }
        let p = Policy::compile("package policy\nallow := true", json!({})).unwrap();
        assert!(p.evaluate(json!({})).unwrap().allow);
    }
}
