//! Deployments, instances, request routing with cold-start holding, and autoscaling.

use crate::{api_error, not_deployed, Gateway};
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use veil_node::cache::ResolvedImage;
use veil_node::{CancellationToken, Instance, InstanceSpec, NodeError};

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
            min_scale: None,
            max_scale: None,
            port: None,
            ready_timeout_s: None,
            idle_timeout_s: None,
            secrets: BTreeMap::new(),
            decryption_keys: Vec::new(),
            signature_policy: None,
            kbs_url: None,
            allow_insecure_software_tee: false,
        }
    }
}

/// A deployed function.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FunctionRecord {
    /// Name.
    pub name: String,
    /// Owning tenant.
    pub tenant: String,
    /// The image, pinned to a manifest digest at deploy time.
    pub image: ResolvedImage,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Concurrent requests per instance.
    pub concurrency: u32,
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
    /// Increases with every deploy of this name.
    pub revision: u64,
    /// Environment variable → key-broker resource path (`<tenant>/<type>/<tag>`).
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Key-broker resource paths of the image decryption keys.
    #[serde(default)]
    pub image_keys: Vec<String>,
    /// Key-broker resource path of the image signature policy.
    #[serde(default)]
    pub signature_policy: Option<String>,
    /// The tenant's key broker, when the function has secrets.
    #[serde(default)]
    pub kbs_url: Option<String>,
    /// Whether the INSECURE software TEE may be used where no hardware TEE exists.
    #[serde(default)]
    pub allow_insecure_software_tee: bool,
}

/// What `GET /v1/functions[/<name>]` reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FunctionStatus {
    /// The deployment.
    #[serde(flatten)]
    pub record: FunctionRecord,
    /// Ready instances (sandbox ids).
    pub instances: Vec<String>,
    /// Instances starting.
    pub starting: usize,
    /// Requests waiting for capacity.
    pub waiting: usize,
    /// The last cold-start failure, if any.
    pub last_error: Option<String>,
}

struct Slot {
    inst: Instance,
    inflight: AtomicU32,
    last_used: Mutex<Instant>,
    first_served: AtomicBool,
}

struct Runtime {
    record: FunctionRecord,
    instances: Vec<Arc<Slot>>,
    starting: usize,
    /// Requests waiting for capacity; decremented by a guard even if the client goes away.
    waiting: Arc<AtomicUsize>,
    failures: u64,
    last_error: Option<String>,
    /// When the last cold start failed (min_scale restarts back off from it).
    last_failure: Option<Instant>,
    changes: Arc<watch::Sender<u64>>,
    /// Fires when this revision is deleted or replaced; in-flight cold starts stop.
    cancel: CancellationToken,
}

impl Runtime {
    fn new(record: FunctionRecord) -> Self {
        Self {
            record,
            instances: Vec::new(),
            starting: 0,
            waiting: Arc::new(AtomicUsize::new(0)),
            failures: 0,
            last_error: None,
            last_failure: None,
            changes: Arc::new(watch::channel(0).0),
            cancel: CancellationToken::new(),
        }
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
}

/// All deployments of this gateway.
pub struct Functions {
    map: Mutex<HashMap<String, Runtime>>,
    file: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Functions {
    /// Load persisted deployments from `state_dir/functions.json`.
    pub fn load(state_dir: &Path) -> Self {
        let file = state_dir.join("functions.json");
        let mut map = HashMap::new();
        match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Vec<FunctionRecord>>(&bytes) {
                Ok(records) => {
                    for r in records {
                        map.insert(r.name.clone(), Runtime::new(r));
                    }
                }
                Err(e) => {
                    tracing::error!(file = %file.display(), error = %e, "ignoring unreadable deployments file")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "cannot read deployments")
            }
        }
        Self {
            map: Mutex::new(map),
            file,
        }
    }

    fn persist(&self, map: &HashMap<String, Runtime>) {
        let mut records: Vec<&FunctionRecord> = map.values().map(|r| &r.record).collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        let tmp = self.file.with_extension("json.tmp");
        let res = serde_json::to_vec_pretty(&records)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(e) = res {
            tracing::error!(file = %self.file.display(), error = %e, "cannot persist deployments");
        }
    }

    fn status_of(rt: &Runtime) -> FunctionStatus {
        FunctionStatus {
            record: rt.record.clone(),
            instances: rt
                .instances
                .iter()
                .filter(|s| s.inst.is_alive())
                .map(|s| s.inst.id().to_string())
                .collect(),
            starting: rt.starting,
            waiting: rt.waiting.load(Ordering::SeqCst),
            last_error: rt.last_error.clone(),
        }
    }

    /// Status of one function.
    pub fn status(&self, name: &str) -> Option<FunctionStatus> {
        lock(&self.map).get(name).map(Self::status_of)
    }

    /// Status of all functions.
    pub fn list(&self) -> Vec<FunctionStatus> {
        let map = lock(&self.map);
        let mut v: Vec<FunctionStatus> = map.values().map(Self::status_of).collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        v
    }

    /// Remove a function; returns its instances for destruction.
    fn remove(&self, name: &str) -> Option<Vec<Arc<Slot>>> {
        let mut map = lock(&self.map);
        let rt = map.remove(name)?;
        rt.cancel.cancel();
        rt.bump();
        self.persist(&map);
        Some(rt.instances)
    }

    /// Delete a function and destroy its instances. False if it was not deployed.
    pub async fn delete(&self, name: &str) -> bool {
        match self.remove(name) {
            Some(slots) => {
                for s in slots {
                    destroy_slot(&s).await;
                }
                true
            }
            None => false,
        }
    }

    /// Destroy every instance (deployments stay persisted).
    pub async fn clear(&self) {
        let slots: Vec<Arc<Slot>> = {
            let mut map = lock(&self.map);
            map.values_mut()
                .flat_map(|rt| {
                    rt.cancel.cancel();
                    rt.cancel = CancellationToken::new();
                    rt.bump();
                    std::mem::take(&mut rt.instances)
                })
                .collect()
        };
        for s in slots {
            destroy_slot(&s).await;
        }
    }
}

async fn destroy_slot(s: &Slot) {
    // The node handle lives in the instance; destruction goes through it.
    s.inst.destroy().await;
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

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Handle `PUT /v1/functions/<name>`.
pub async fn deploy(gw: &Arc<Gateway>, name: &str, req: DeployRequest) -> Response {
    if !valid_name(name) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "BAD_NAME",
            format!("function name {name:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"),
        );
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
        (max_scale == 0 || max_scale > 1000).then(|| "max_scale must be 1..=1000".to_string()),
        (min_scale > max_scale)
            .then(|| format!("min_scale {min_scale} exceeds max_scale {max_scale}")),
        (port == 0).then(|| "port must be 1..=65535".to_string()),
        (ready_timeout_s == 0 || ready_timeout_s > 600)
            .then(|| "ready_timeout_s must be 1..=600".to_string()),
        (idle_timeout_s == 0).then(|| "idle_timeout_s must be at least 1".to_string()),
        (!valid_name(&tenant))
            .then(|| format!("tenant {tenant:?} must be lowercase letters, digits or '-'")),
        req.env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0') || k.as_str() == "PORT")
            .map(|k| format!("environment variable name {k:?} is not allowed")),
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
        .or_else(|| gw.config.default_kbs_url.clone());
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
    if !problems.is_empty() {
        return api_error(StatusCode::BAD_REQUEST, "BAD_REQUEST", problems.join("; "));
    }
    let image = match gw.node.resolve(&req.image).await {
        Ok(i) => i,
        Err(e) => {
            let (status, code) = deploy_error_status(&e);
            tracing::warn!(function = name, image = %req.image, error = %e, "deploy failed");
            return api_error(status, code, e.to_string());
        }
    };
    let (old, status, created) = {
        let mut map = lock(&gw.functions.map);
        let revision = map.get(name).map(|r| r.record.revision + 1).unwrap_or(1);
        let record = FunctionRecord {
            name: name.to_string(),
            tenant,
            image,
            env: req.env,
            concurrency,
            min_scale,
            max_scale,
            port,
            ready_timeout_s,
            idle_timeout_s,
            revision,
            secrets,
            image_keys,
            signature_policy,
            kbs_url,
            allow_insecure_software_tee: req.allow_insecure_software_tee,
        };
        let created = !map.contains_key(name);
        let old = map.insert(name.to_string(), Runtime::new(record));
        let old = old.map(|o| {
            o.cancel.cancel();
            o.bump();
            o.instances
        });
        let status = map.get(name).map(Functions::status_of);
        gw.functions.persist(&map);
        (old, status, created)
    };
    for s in old.unwrap_or_default() {
        destroy_slot(&s).await;
    }
    tracing::info!(function = name, "deployed");
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (code, Json(status)).into_response()
}

fn start_instance(gw: &Arc<Gateway>, rt: &mut Runtime) {
    rt.starting += 1;
    let rec = rt.record.clone();
    let gw = gw.clone();
    let cancel = rt.cancel.clone();
    tokio::spawn(async move {
        let spec = InstanceSpec {
            tenant: rec.tenant.clone(),
            function: rec.name.clone(),
            image: rec.image.clone(),
            env: rec.env.clone(),
            port: rec.port,
            concurrency: rec.concurrency,
            ready_timeout: Duration::from_secs(rec.ready_timeout_s),
            attestation: (!rec.secrets.is_empty()
                || !rec.image_keys.is_empty()
                || rec.signature_policy.is_some())
            .then(|| veil_proto::AttestationPlan {
                secrets: rec.secrets.clone(),
                allow_software_tee: rec.allow_insecure_software_tee,
                image_keys: rec.image_keys.clone(),
                signature_policy: rec.signature_policy.clone(),
            }),
            kbs_url: rec.kbs_url.clone(),
        };
        let t = Instant::now();
        let res = gw.node.start_instance(&spec, &cancel).await;
        gw.metrics
            .cold_start(&rec.name, res.is_ok(), t.elapsed().as_secs_f64() * 1000.0);
        let mut stale = None;
        {
            let mut map = lock(&gw.functions.map);
            match map.get_mut(&rec.name) {
                Some(rt) if rt.record.revision == rec.revision => {
                    rt.starting = rt.starting.saturating_sub(1);
                    match res {
                        Ok(inst) => rt.instances.push(Arc::new(Slot {
                            inst,
                            inflight: AtomicU32::new(0),
                            last_used: Mutex::new(Instant::now()),
                            first_served: AtomicBool::new(false),
                        })),
                        Err(e) => {
                            rt.failures += 1;
                            rt.last_error = Some(e.to_string());
                            rt.last_failure = Some(Instant::now());
                        }
                    }
                    rt.bump();
                }
                // Deleted or redeployed meanwhile: the instance belongs to nobody.
                _ => stale = res.ok(),
            }
        }
        if let Some(inst) = stale {
            inst.destroy().await;
        }
    });
}

enum Pick {
    Slot(Busy),
    Wait(watch::Receiver<u64>, Counted),
    Respond(Response),
}

/// Route one invocation of `name` with the function-relative `path_and_query`.
pub async fn invoke(
    gw: &Arc<Gateway>,
    name: &str,
    path_and_query: String,
    req: Request<Body>,
) -> Response {
    let resp = route(gw, name, path_and_query, req).await;
    if resp.status() != StatusCode::NOT_FOUND || lock(&gw.functions.map).contains_key(name) {
        gw.metrics.request(name, resp.status().as_u16());
    }
    resp
}

async fn route(
    gw: &Arc<Gateway>,
    name: &str,
    path_and_query: String,
    req: Request<Body>,
) -> Response {
    let deadline = tokio::time::Instant::now() + gw.config.cold_start_timeout;
    let mut seen_failures: Option<u64> = None;
    let mut waited = false;
    let slot = loop {
        let pick = {
            let mut map = lock(&gw.functions.map);
            let Some(rt) = map.get_mut(name) else {
                return not_deployed(name);
            };
            let before = rt.instances.len();
            rt.instances.retain(|s| s.inst.is_alive());
            if rt.instances.len() != before {
                tracing::info!(
                    function = name,
                    "dropped {} ended instance(s)",
                    before - rt.instances.len()
                );
            }
            let seen = *seen_failures.get_or_insert(rt.failures);
            let limit = rt.record.concurrency;
            let best = rt
                .instances
                .iter()
                .filter(|s| s.inflight.load(Ordering::SeqCst) < limit)
                .min_by_key(|s| s.inflight.load(Ordering::SeqCst))
                .cloned();
            if let Some(s) = best {
                s.inflight.fetch_add(1, Ordering::SeqCst);
                Pick::Slot(Busy {
                    slot: s,
                    changes: rt.changes.clone(),
                })
            } else if rt.failures > seen && rt.instances.is_empty() && rt.starting == 0 {
                Pick::Respond(api_error(
                    StatusCode::BAD_GATEWAY,
                    "COLD_START_FAILED",
                    format!(
                        "function {name:?} could not be started: {}",
                        rt.last_error.clone().unwrap_or_default()
                    ),
                ))
            } else if rt.waiting.load(Ordering::SeqCst) >= gw.config.max_queue {
                let mut r = api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "QUEUE_FULL",
                    format!(
                        "function {name:?} has {} requests waiting for capacity; try again",
                        rt.waiting.load(Ordering::SeqCst)
                    ),
                );
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                Pick::Respond(r)
            } else {
                if rt.instances.len() + rt.starting < rt.record.max_scale as usize
                    && (rt.starting == 0
                        || rt.waiting.load(Ordering::SeqCst)
                            >= rt.starting * rt.record.concurrency as usize)
                {
                    start_instance(gw, rt);
                }
                rt.waiting.fetch_add(1, Ordering::SeqCst);
                Pick::Wait(rt.changes.subscribe(), Counted(rt.waiting.clone()))
            }
        };
        match pick {
            Pick::Slot(s) => break s,
            Pick::Respond(r) => return r,
            Pick::Wait(mut rx, counted) => {
                waited = true;
                let res = tokio::time::timeout_at(deadline, rx.changed()).await;
                drop(counted);
                if res.is_err() {
                    let mut r = api_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "COLD_START_TIMEOUT",
                        format!(
                            "function {name:?} had no ready instance within {:?}; try again",
                            gw.config.cold_start_timeout
                        ),
                    );
                    r.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return r;
                }
            }
        }
    };
    proxy(slot, name, path_and_query, req, waited).await
}

/// One unit of a counter, given back on drop — also when the client disconnects and axum drops
/// the request's future half-way.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request in flight on an instance: the instance's slot is released (and waiters woken) when
/// the response body is finished or dropped, whichever way the request ends.
struct Busy {
    slot: Arc<Slot>,
    changes: Arc<watch::Sender<u64>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slot.inflight.fetch_sub(1, Ordering::SeqCst);
        *lock(&self.slot.last_used) = Instant::now();
        self.changes.send_modify(|v| *v += 1);
    }
}

async fn proxy(
    busy: Busy,
    name: &str,
    path_and_query: String,
    req: Request<Body>,
    waited: bool,
) -> Response {
    let (mut parts, body) = req.into_parts();
    parts.uri = match path_and_query.parse() {
        Ok(u) => u,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("bad path: {e}"),
            )
        }
    };
    for h in veil_proto::HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    let slot = busy.slot.clone();
    let resp = match slot.inst.invoke(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_GATEWAY,
                "INSTANCE_FAILED",
                format!("function {name:?}, instance {}: {e}", slot.inst.id()),
            )
        }
    };
    let (mut parts, body) = resp.into_parts();
    for h in veil_proto::HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    if let Ok(v) = HeaderValue::from_str(slot.inst.id()) {
        parts.headers.insert("x-veil-instance", v);
    }
    if waited && !slot.first_served.swap(true, Ordering::SeqCst) {
        let t = &slot.inst.timings;
        let v = format!(
            "total={:.1};boot={:.1};pooled={};cache={:.1};attest={:.1};manifest={:.1};signature={:.1};layers={:.1};spawn={:.1};ready={:.1}",
            t.total_ms, t.boot_ms, t.pooled, t.cache_ms, t.agent.attest_ms, t.agent.manifest_ms, t.agent.signature_ms, t.agent.layers_ms, t.agent.spawn_ms, t.agent.ready_ms
        );
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.insert("x-veil-cold-start", v);
        }
    }
    // The instance counts as busy until the response body is done (or the client is gone).
    let body = http_body_util::BodyExt::map_err(body, move |e| {
        let _held = &busy;
        e
    });
    Response::from_parts(parts, Body::new(body))
}

/// Every second: remove ended instances, scale idle functions down (to zero unless
/// `min_scale` says otherwise), and keep `min_scale` instances up.
pub fn spawn_autoscaler(gw: Weak<Gateway>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(gw) = gw.upgrade() else { return };
            let mut doomed = Vec::new();
            {
                let mut map = lock(&gw.functions.map);
                for rt in map.values_mut() {
                    rt.instances.retain(|s| s.inst.is_alive());
                    let idle = Duration::from_secs(rt.record.idle_timeout_s);
                    while rt.instances.len() > rt.record.min_scale as usize {
                        let pos = rt.instances.iter().position(|s| {
                            s.inflight.load(Ordering::SeqCst) == 0
                                && lock(&s.last_used).elapsed() >= idle
                        });
                        match pos {
                            Some(p) => doomed.push(rt.instances.remove(p)),
                            None => break,
                        }
                    }
                    // A function that fails to start is retried for min_scale at most every
                    // 10 s, not every tick.
                    let backing_off = rt
                        .last_failure
                        .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
                    while !backing_off
                        && rt.instances.len() + rt.starting < rt.record.min_scale as usize
                    {
                        start_instance(&gw, rt);
                    }
                }
            }
            for s in doomed {
                tracing::info!(function = %s.inst.function, instance = %s.inst.id(), "scaling down idle instance");
                destroy_slot(&s).await;
            }
        }
    });
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
