//! `PUT /v1/functions/<name>`: validation, capacity check, and the switch to a new revision.

use super::{lock, traffic, FunctionRecord};
use crate::state::TrafficTarget;
use crate::{api_error, Gateway};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use veil_node::NodeError;

/// Body of `PUT /v1/functions/<name>`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// Image reference (`local/<repo>:<tag>` for the node's store, or any registry).
    pub image: String,
    /// Owning tenant (default `default`).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Concurrent requests per instance (default 100).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Concurrent requests per instance the autoscaler aims for (default: `concurrency`; at
    /// most `concurrency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    /// Instances kept even when idle (default 0: scale to zero).
    #[serde(default)]
    pub min_scale: Option<u32>,
    /// Most instances (default 10).
    #[serde(default)]
    pub max_scale: Option<u32>,
    /// Port the function listens on (default 8080).
    #[serde(default)]
    pub port: Option<u16>,
    /// Seconds the function may take to listen (default 30).
    #[serde(default)]
    pub ready_timeout_s: Option<u64>,
    /// Seconds an instance may stay idle before it is removed (default 60).
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Keep-alive policy: `fixed` (the idle timeout, the default) or `hybrid` (a histogram of
    /// the function's idle times decides when to unload and pre-warm; the idle timeout is its
    /// fallback).
    #[serde(default)]
    pub keep_alive: Option<crate::keepalive::KeepAlive>,
    /// Secrets released by the tenant's key broker to the sandbox after attestation, as
    /// environment variable → resource (`kbs:///<tenant>/<type>/<tag>`). The host never sees
    /// their values.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Private keys (PEM) that decrypt the image's encrypted layers, as key-broker resources
    /// (`kbs:///<tenant>/<type>/<tag>`), released to the sandbox after attestation.
    #[serde(default)]
    pub decryption_keys: Vec<String>,
    /// The tenant's image signature policy (containers-policy.json) as a key-broker resource
    /// (`kbs:///<tenant>/<type>/<tag>`): fetched and enforced inside the sandbox.
    #[serde(default)]
    pub signature_policy: Option<String>,
    /// The tenant's key broker (default: the one embedded in `veil up`).
    #[serde(default)]
    pub kbs_url: Option<String>,
    /// Let sandboxes without SEV-SNP/TDX attest with the INSECURE software TEE (development
    /// only; the broker's policy must allow it too).
    #[serde(default)]
    pub allow_insecure_software_tee: bool,
}

impl DeployRequest {
    /// A request for `image` with every setting at its default.
    pub fn new(image: &str) -> Self {
        Self {
            image: image.to_string(),
            tenant: None,
            env: BTreeMap::new(),
            concurrency: None,
            target: None,
            min_scale: None,
            max_scale: None,
            port: None,
            ready_timeout_s: None,
            idle_timeout_s: None,
            keep_alive: None,
            secrets: BTreeMap::new(),
            decryption_keys: Vec::new(),
            signature_policy: None,
            kbs_url: None,
            allow_insecure_software_tee: false,
        }
    }
}

/// `kbs:///<repo>/<type>/<tag>` or `<repo>/<type>/<tag>` → (repo, "repo/type/tag").
fn parse_resource(uri: &str) -> Option<(String, String)> {
    let path = uri.strip_prefix("kbs:///").unwrap_or(uri);
    let parts: Vec<&str> = path.split('/').collect();
    let ok = parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        });
    ok.then(|| (parts[0].to_string(), path.to_string()))
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A deployment request that passed [`validate`]: every default applied, every resource
/// parsed and checked to belong to the tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidDeploy {
    /// Owning tenant.
    pub tenant: String,
    /// Concurrent requests per instance.
    pub concurrency: u32,
    /// The autoscaler's target per instance, if not `concurrency`.
    pub target: Option<f64>,
    /// Minimum instances.
    pub min_scale: u32,
    /// Maximum instances.
    pub max_scale: u32,
    /// Function port.
    pub port: u16,
    /// Readiness timeout in seconds.
    pub ready_timeout_s: u64,
    /// Idle timeout in seconds.
    pub idle_timeout_s: u64,
    /// Keep-alive policy.
    pub keep_alive: crate::keepalive::KeepAlive,
    /// Environment variable → key-broker resource path.
    pub secrets: BTreeMap<String, String>,
    /// Key-broker resource paths of image decryption keys.
    pub image_keys: Vec<String>,
    /// Key-broker resource path of the signature policy.
    pub signature_policy: Option<String>,
    /// The key broker.
    pub kbs_url: Option<String>,
}

/// Longest an idle instance may be kept (seconds): a week. Without a bound one tenant could
/// hold sandboxes forever.
pub const MAX_IDLE_TIMEOUT_S: u64 = 7 * 24 * 3600;

/// Largest environment a deployment may carry (names and values together): the kernel refuses
/// to exec a process whose environment exceeds its argument limits, so a bigger one could
/// never start.
pub const MAX_ENV_BYTES: usize = 64 << 10;

/// Check a deployment of `name` without touching any state: the whole of what the admin API
/// parses from a request (also the entry point of the `admin_request` fuzz target). Errors
/// are (code, message) with every problem found, for a 400.
pub fn validate(
    name: &str,
    req: &DeployRequest,
    default_kbs_url: Option<&str>,
) -> Result<ValidDeploy, (&'static str, String)> {
    if !valid_name(name) {
        return Err((
            "BAD_NAME",
            format!("function name {name:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"),
        ));
    }
    let concurrency = req.concurrency.unwrap_or(100);
    let min_scale = req.min_scale.unwrap_or(0);
    let max_scale = req.max_scale.unwrap_or(10);
    let port = req.port.unwrap_or(8080);
    let ready_timeout_s = req.ready_timeout_s.unwrap_or(30);
    let idle_timeout_s = req.idle_timeout_s.unwrap_or(60);
    let tenant = req.tenant.clone().unwrap_or_else(|| "default".into());
    let problems: Vec<String> = [
        (concurrency == 0 || concurrency > 10_000)
            .then(|| "concurrency must be 1..=10000".to_string()),
        req.target
            .filter(|t| !(t.is_finite() && *t >= 0.01 && *t <= f64::from(concurrency)))
            .map(|t| {
                format!("target {t} must be 0.01..={concurrency} (at most the concurrency limit)")
            }),
        (max_scale == 0 || max_scale > 1000).then(|| "max_scale must be 1..=1000".to_string()),
        (min_scale > max_scale)
            .then(|| format!("min_scale {min_scale} exceeds max_scale {max_scale}")),
        (port == 0).then(|| "port must be 1..=65535".to_string()),
        (ready_timeout_s == 0 || ready_timeout_s > 600)
            .then(|| "ready_timeout_s must be 1..=600".to_string()),
        (idle_timeout_s == 0 || idle_timeout_s > MAX_IDLE_TIMEOUT_S)
            .then(|| format!("idle_timeout_s must be 1..={MAX_IDLE_TIMEOUT_S} (a week)")),
        (!valid_name(&tenant))
            .then(|| format!("tenant {tenant:?} must be lowercase letters, digits or '-'")),
        req.env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0') || k.as_str() == "PORT")
            .map(|k| format!("environment variable name {k:?} is not allowed")),
        req.env
            .iter()
            .find(|(_, v)| v.contains('\0'))
            .map(|(k, _)| format!("environment variable {k:?} has a NUL byte in its value")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut problems = problems;
    let mut secrets = BTreeMap::new();
    for (env, uri) in &req.secrets {
        if env.is_empty() || env.contains('=') || env.contains('\0') || env == "PORT" {
            problems.push(format!("secret variable name {env:?} is not allowed"));
            continue;
        }
        if req.env.contains_key(env) {
            problems.push(format!("{env} is both a plain variable and a secret"));
        }
        match parse_resource(uri) {
            Some((repo, path)) if repo == tenant => {
                secrets.insert(env.clone(), path);
            }
            Some((repo, _)) => problems.push(format!(
                "secret {env} refers to {uri}, a resource of tenant {repo:?}, not of {tenant:?}"
            )),
            None => problems.push(format!(
                "secret {env}: {uri:?} is not a key-broker resource (kbs:///<tenant>/<type>/<tag>)"
            )),
        }
    }
    let mut image_keys = Vec::new();
    for uri in &req.decryption_keys {
        match parse_resource(uri) {
            Some((repo, path)) if repo == tenant => image_keys.push(path),
            Some((repo, _)) => problems.push(format!(
                "decryption key {uri} is a resource of tenant {repo:?}, not of {tenant:?}"
            )),
            None => problems.push(format!(
                "decryption key {uri:?} is not a key-broker resource (kbs:///<tenant>/<type>/<tag>)"
            )),
        }
    }
    let mut signature_policy = None;
    if let Some(uri) = &req.signature_policy {
        match parse_resource(uri) {
            Some((repo, path)) if repo == tenant => signature_policy = Some(path),
            Some((repo, _)) => problems.push(format!(
                "signature policy {uri} is a resource of tenant {repo:?}, not of {tenant:?}"
            )),
            None => problems.push(format!(
                "signature policy {uri:?} is not a key-broker resource (kbs:///<tenant>/<type>/<tag>)"
            )),
        }
    }
    let kbs_url = req
        .kbs_url
        .clone()
        .or_else(|| default_kbs_url.map(str::to_string));
    if (!secrets.is_empty() || !image_keys.is_empty() || signature_policy.is_some())
        && kbs_url.is_none()
    {
        problems.push(
            "the function has secrets, decryption keys or a signature policy but no key broker \
             is configured (kbs_url)"
                .into(),
        );
    }
    if let Some(u) = &kbs_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            problems.push(format!("kbs_url {u:?} must be an http(s) URL"));
        }
    }
    let env_bytes: usize = req.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if env_bytes > MAX_ENV_BYTES {
        problems.push(format!(
            "the environment is {env_bytes} bytes; at most {MAX_ENV_BYTES} bytes are allowed"
        ));
    }
    if req.image.len() > 1024 {
        problems.push("the image reference is longer than 1024 characters".into());
    }
    if !problems.is_empty() {
        return Err(("BAD_REQUEST", problems.join("; ")));
    }
    Ok(ValidDeploy {
        tenant,
        concurrency,
        target: req.target,
        min_scale,
        max_scale,
        port,
        ready_timeout_s,
        idle_timeout_s,
        keep_alive: req.keep_alive.unwrap_or_default(),
        secrets,
        image_keys,
        signature_policy,
        kbs_url,
    })
}

/// Handle `PUT /v1/functions/<name>`.
pub async fn deploy(
    gw: &Arc<Gateway>,
    caller: &crate::auth::Caller,
    name: &str,
    req: DeployRequest,
    v: ValidDeploy,
) -> Response {
    let ValidDeploy {
        tenant,
        concurrency,
        target,
        min_scale,
        max_scale,
        port,
        ready_timeout_s,
        idle_timeout_s,
        keep_alive,
        secrets,
        image_keys,
        signature_policy,
        kbs_url,
    } = v;
    let image = match gw.node.resolve(&req.image).await {
        Ok(i) => i,
        Err(e) => {
            let (status, code) = deploy_error_status(&e);
            tracing::warn!(function = name, image = %req.image, error = %e, "deploy failed");
            return api_error(status, code, e.to_string());
        }
    };
    let (status, created) = {
        let mut map = lock(&gw.functions.map);
        // The image was resolved meanwhile (seconds, from a registry): a tenant whose tokens
        // were all revoked since — deleted — deploys nothing. Checked under the lock that a
        // tenant's deletion sweeps its functions under, after it revoked them.
        if let crate::auth::Caller::Tenant(t) = caller {
            if !gw.auth.tenant_has_tokens(t) {
                return api_error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    format!(
                        "tenant {t:?} has no token any more (it was revoked or the tenant deleted)"
                    ),
                );
            }
        }
        // A function keeps its tenant for life: checked under the lock, so two tenants racing
        // to create one name cannot replace each other's function.
        if let Some(existing) = map.get(name) {
            if existing.tenant != tenant {
                return api_error(
                    StatusCode::FORBIDDEN,
                    "FORBIDDEN",
                    format!(
                        "function name {name:?} is taken by another tenant (a function keeps \
                         its tenant; delete it first to reuse the name)"
                    ),
                );
            }
        }
        let mut record = FunctionRecord {
            name: name.to_string(),
            tenant: tenant.clone(),
            image,
            env: req.env,
            concurrency,
            target,
            min_scale,
            max_scale,
            port,
            ready_timeout_s,
            idle_timeout_s,
            keep_alive,
            revision: 0,
            secrets,
            image_keys,
            signature_policy,
            kbs_url,
            allow_insecure_software_tee: req.allow_insecure_software_tee,
            created_ms: super::now_ms(),
        };
        // What the function would be with the new revision (numbered above all others, so
        // that `@latest` resolves to it), for the capacity check and the pruning.
        let (mut revisions, traffic) = match map.get(name) {
            Some(f) => (f.revisions.clone(), f.traffic.clone()),
            None => (BTreeMap::new(), TrafficTarget::latest()),
        };
        revisions.insert(u64::MAX, record.clone());
        if let Some(refusal) = capacity_refusal(gw, &map, name, &revisions, &traffic) {
            return refusal;
        }
        let wanted = traffic::wanted(&revisions, &traffic);
        let prune: Vec<u64> = revisions
            .keys()
            .filter(|r| !wanted.contains(r) && **r != u64::MAX)
            .copied()
            .take(revisions.len().saturating_sub(traffic::MAX_REVISIONS))
            .collect();
        // Durable first: only a deploy the store has is acknowledged (and applied).
        if let Err(e) = gw
            .functions
            .store()
            .add_revision(&mut record, &traffic, &prune)
        {
            tracing::error!(function = name, error = %e, "deploy not stored");
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "STATE_ERROR",
                format!("the deploy could not be stored, so nothing changed: {e}"),
            );
        }
        let created = !map.contains_key(name);
        let f = map
            .entry(name.to_string())
            .or_insert_with(|| super::Function {
                tenant,
                revisions: BTreeMap::new(),
                traffic: traffic.clone(),
                live: BTreeMap::new(),
            });
        for p in &prune {
            f.revisions.remove(p);
        }
        f.revisions.insert(record.revision, record);
        // New requests go to the new revision (where `@latest` has traffic) from now on; the
        // revisions that lost their traffic finish their requests and go, in the background.
        gw.functions.reconcile(f, "redeployed");
        (gw.functions.status_of(f), created)
    };
    tracing::info!(function = name, "deployed");
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (code, Json(status)).into_response()
}

/// Body of `PUT /v1/functions/<name>/traffic`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficRequest {
    /// The targets: their percents sum to 100.
    pub traffic: Vec<TrafficTarget>,
}

/// Handle `PUT /v1/functions/<name>/traffic` for a caller allowed to act for the function's
/// tenant (checked by the caller, and again here under the lock).
pub async fn set_traffic(
    gw: &Arc<Gateway>,
    caller: &crate::auth::Caller,
    name: &str,
    req: TrafficRequest,
) -> Response {
    let mut map = lock(&gw.functions.map);
    let Some(f) = map.get(name).filter(|f| caller.may_act_for(&f.tenant)) else {
        return crate::not_deployed(name);
    };
    if let Err(m) = traffic::validate(&f.revisions, &req.traffic) {
        return api_error(StatusCode::BAD_REQUEST, "BAD_TRAFFIC", m);
    }
    let revisions = f.revisions.clone();
    if let Some(refusal) = capacity_refusal(gw, &map, name, &revisions, &req.traffic) {
        return refusal;
    }
    if let Err(e) = gw.functions.store().set_traffic(name, &req.traffic) {
        tracing::error!(function = name, error = %e, "traffic change not stored");
        return api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "STATE_ERROR",
            format!("the traffic change could not be stored, so nothing changed: {e}"),
        );
    }
    let Some(f) = map.get_mut(name) else {
        return crate::not_deployed(name);
    };
    f.traffic = req.traffic;
    gw.functions.reconcile(f, "lost its traffic");
    tracing::info!(function = name, traffic = ?f.traffic, "traffic changed");
    Json(gw.functions.status_of(f)).into_response()
}

/// A deployment or traffic change whose `min_scale` the node cannot keep up is refused: the
/// `min_scale` of every live revision of all functions together must fit the node's capacity
/// (pooled sandboxes are not counted: an instance takes one from the pool). `max_scale` may
/// exceed it; starts beyond it wait. `revisions` and `traffic` are what `name` would have.
fn capacity_refusal(
    gw: &Gateway,
    map: &HashMap<String, super::Function>,
    name: &str,
    revisions: &BTreeMap<u64, FunctionRecord>,
    traffic: &[TrafficTarget],
) -> Option<Response> {
    let mine: u64 = traffic::wanted(revisions, traffic)
        .iter()
        .filter_map(|r| revisions.get(r))
        .map(|r| u64::from(r.min_scale))
        .sum();
    if mine == 0 {
        return None;
    }
    let cap = gw.node.capacity();
    let others: u64 = map
        .iter()
        .filter(|(n, _)| n.as_str() != name)
        .flat_map(|(_, f)| f.live.values())
        .map(|rt| u64::from(rt.record.min_scale))
        .sum();
    if others + mine <= cap.max_sandboxes {
        return None;
    }
    tracing::warn!(
        function = name,
        min_scale = mine,
        others,
        max_sandboxes = cap.max_sandboxes,
        "refused: min_scale exceeds the node's capacity"
    );
    Some(api_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "CAPACITY_EXCEEDED",
        format!(
            "min_scale {mine} does not fit the node's capacity: {} holds {} sandboxes of \
             {} each, and other functions keep {others} of them up",
            cap.capacity, cap.max_sandboxes, cap.per_sandbox
        ),
    ))
}

/// The status and code of a deploy whose image did not resolve, by the error's kind (an
/// upstream 404 is a 404, refused credentials a 403, a stalling registry a 504).
pub(crate) fn deploy_error_status(e: &NodeError) -> (StatusCode, &'static str) {
    use veil_node::ErrorKind;
    match e.kind() {
        ErrorKind::BadReference => (StatusCode::BAD_REQUEST, "BAD_IMAGE_REFERENCE"),
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND"),
        ErrorKind::BadImage => (StatusCode::UNPROCESSABLE_ENTITY, "BAD_IMAGE"),
        ErrorKind::Unauthorized | ErrorKind::Denied => {
            (StatusCode::FORBIDDEN, "IMAGE_ACCESS_DENIED")
        }
        ErrorKind::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "REGISTRY_TIMEOUT"),
        _ => (StatusCode::BAD_GATEWAY, "REGISTRY_ERROR"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources() {
        assert_eq!(
            parse_resource("kbs:///acme/key/db"),
            Some(("acme".into(), "acme/key/db".into()))
        );
        assert_eq!(
            parse_resource("acme/key/db").map(|r| r.0),
            Some("acme".into())
        );
        for bad in [
            "kbs:///acme/key",
            "acme/../db",
            "a/b/c/d",
            "kbs:///a//c",
            "a/b/c d",
        ] {
            assert_eq!(parse_resource(bad), None, "{bad}");
        }
    }

    #[test]
    fn names() {
        for ok in ["hello", "a", "fn-1", "x9"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Hello", "a_b", "a/b", "..", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
