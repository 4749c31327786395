//! The gateway: HTTP ingress for functions, the admin API, and the local image registry.
//!
//! * Invocations: `/f/<name>/<path>` or any path with `Host: <name><host_suffix>`. A request
//!   goes to the least-loaded ready instance of the function; if none has room, the gateway
//!   starts one (up to `max_scale`) and holds the request — bounded in time and in queue length,
//!   then a 503 with a clear body and `Retry-After`, never a hang. With `Prefer:
//!   respond-async` the answer is a 202 with the id of a stored, retried invocation
//!   ([`invocations`]).
//! * Admin (JSON): `PUT/GET/DELETE /v1/functions/<name>`, `GET /v1/functions`,
//!   `GET /v1/functions/<name>/logs`, `PUT /v1/functions/<name>/traffic`,
//!   `GET /v1/invocations/<id>`, `GET /v1/sandboxes`, `GET|PUT|DELETE
//!   /v1/tenant-pools[/<tenant>]` (tenant-attested pools, operator only), `GET /v1/tenants` and
//!   `DELETE /v1/tenants/<tenant>` ([`tenants`], operator only), `GET /v1/node` (capacity and
//!   usage), `GET /healthz`. The contract is `openapi.json` ([`OPENAPI`], served at
//!   `GET /v1/openapi.json` without a token), which the tests check the server against.
//! * Local image store: the OCI distribution API under `/v2/` for `local/<repo>` images.
//!
//! `/v1/` and `/v2/` need a token ([`auth`]): the operator's, or a tenant's, which reaches only
//! that tenant's functions and repositories. `/healthz` and `/metrics` are open to loopback
//! peers only; invocations are public.
#![forbid(unsafe_code)]

pub mod auth;
mod functions;
pub mod invocations;
pub mod keepalive;
pub mod metrics;
mod registry;
pub mod state;
pub mod tenants;

pub use functions::traffic::{MAX_REVISIONS, MAX_TARGETS};
pub use functions::{
    validate as validate_deploy, AutoscaleConfig, AutoscalerStatus, DeployRequest, FunctionRecord,
    FunctionStatus, RevisionStatus, TrafficRequest, TrafficStatus, ValidDeploy, MAX_ENV_BYTES,
};
pub use invocations::{InvocationStatus, InvocationsConfig};
pub use state::{InvocationState, StoredResponse, TrafficTarget};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The token store.
    #[error("the token store: {0}")]
    Auth(#[from] auth::AuthError),
    /// The state database.
    #[error("{0}")]
    Store(#[from] state::StoreError),
}

/// The parsers of untrusted admin-API and local-store input, for the `admin_request` fuzz
/// target: each runs without a node or a network.
#[doc(hidden)]
pub mod fuzzing {
    /// Parse and validate a deployment body for function `name`, then a token request.
    pub fn admin_body(name: &str, body: &[u8]) {
        if let Ok(req) = serde_json::from_slice::<crate::DeployRequest>(body) {
            let _ = crate::validate_deploy(name, &req, Some("http://127.0.0.1:1"));
        }
        let _ = serde_json::from_slice::<crate::TokenRequest>(body);
    }

    /// Route a `/v2/<rest>` path the way the local store does.
    pub fn registry_path(rest: &str) -> bool {
        crate::registry::route_is_known(rest)
    }

    /// Authenticate an `Authorization` header value against a token store in `state_dir`.
    pub fn authorization(auth: &crate::auth::Auth, value: &[u8]) {
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            h.insert(http::header::AUTHORIZATION, v);
        }
        let _ = auth.authenticate(&h);
    }
}
pub use registry::LocalStoreConfig;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, put};
use axum::{Json, Router};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use veil_node::Node;

/// Gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Host-header suffix that selects a function (`<name><suffix>`).
    pub host_suffix: String,
    /// Requests a function may hold while waiting for capacity.
    pub max_queue: usize,
    /// How long a request may wait for a cold start.
    pub cold_start_timeout: Duration,
    /// Where deployments are persisted.
    pub state_dir: PathBuf,
    /// Key broker used by functions that name none (the embedded one in `veil up`).
    pub default_kbs_url: Option<String>,
    /// Limits of the local store's uploads (blob size, expiry of abandoned uploads).
    pub local_store: LocalStoreConfig,
    /// How long instances taken out of service (redeploy, delete, scale-down) may take to
    /// finish the requests they have before they are destroyed anyway.
    pub drain_timeout: Duration,
    /// Bin width of the hybrid keep-alive policy's idle-time histogram (the paper's one
    /// minute; tests shorten it). The autoscaler ticks at most a quarter bin apart.
    pub keep_alive_bin: Duration,
    /// Limits of asynchronous invocations.
    pub invocations: InvocationsConfig,
    /// The autoscaler's windows (Knative's 60 s and 6 s; tests shorten them).
    pub autoscale: AutoscaleConfig,
}

/// JSON error body of every gateway error.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ApiError {
    /// Machine-readable code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

pub(crate) fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        Json(ApiError {
            code: code.into(),
            message,
        }),
    )
        .into_response()
}

/// The running gateway.
pub struct Gateway {
    pub(crate) node: Arc<Node>,
    pub(crate) config: GatewayConfig,
    pub(crate) functions: functions::Functions,
    pub(crate) invocations: invocations::Invocations,
    pub(crate) uploads: registry::Uploads,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) auth: auth::Auth,
}

impl Gateway {
    /// Create a gateway over `node`, opening the state database (refusing a corrupt one) and
    /// restoring its deployments, and opening the token store (creating the operator token on
    /// first start).
    pub fn new(node: Arc<Node>, config: GatewayConfig) -> Result<Arc<Self>, GatewayError> {
        let auth = auth::Auth::open(&config.state_dir)?;
        let store = Arc::new(state::sqlite::SqliteStore::open(&config.state_dir)?);
        let functions = functions::Functions::load(
            store,
            config.drain_timeout,
            node.backend_label(),
            keepalive::HybridConfig::with_bin(config.keep_alive_bin),
        )?;
        let gw = Arc::new(Self {
            node,
            invocations: invocations::Invocations::new(config.invocations.clone()),
            config,
            functions,
            uploads: registry::Uploads::default(),
            metrics: metrics::Metrics::default(),
            auth,
        });
        functions::spawn_autoscaler(Arc::downgrade(&gw));
        let resumed = invocations::resume(&gw)?;
        if resumed > 0 {
            tracing::info!("{resumed} unfinished asynchronous invocation(s) queued again");
        }
        invocations::spawn_sweeper(Arc::downgrade(&gw));
        Ok(gw)
    }

    /// Where the operator token is (`<state>/auth/operator.token`).
    pub fn operator_token_path(&self) -> PathBuf {
        self.config.state_dir.join(auth::OPERATOR_TOKEN_FILE)
    }

    /// The node behind this gateway.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The HTTP router. Serve it with connect info
    /// (`into_make_service_with_connect_info::<SocketAddr>()`), or `/healthz` and `/metrics`
    /// need a token too, since the peer cannot be known to be on loopback.
    pub fn router(self: &Arc<Self>) -> Router {
        let protected = Router::new()
            .route("/v1/functions", get(list_functions))
            .route(
                "/v1/functions/{name}",
                get(get_function).put(deploy).delete(delete_function),
            )
            .route("/v1/functions/{name}/logs", get(logs))
            .route("/v1/functions/{name}/traffic", put(set_traffic))
            .route("/v1/invocations/{id}", get(get_invocation))
            .route("/v1/sandboxes", get(sandboxes))
            .route("/v1/node", get(node_status))
            .route("/v1/tenant-pools", get(list_tenant_pools))
            .route(
                "/v1/tenant-pools/{tenant}",
                put(set_tenant_pool).delete(remove_tenant_pool),
            )
            .route("/v1/tenants", get(tenants::list))
            .route("/v1/tenants/{tenant}", delete(tenants::delete))
            .route("/v1/tokens", get(list_tokens).post(create_token))
            .route("/v1/tokens/{id}", delete(revoke_token))
            .route("/v2/", get(registry::base))
            .route("/v2/{*rest}", any(registry::dispatch))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                require_token,
            ));
        let local = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(render_metrics))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                loopback_or_token,
            ));
        Router::new()
            .merge(protected)
            .merge(local)
            .route("/v1/openapi.json", get(openapi))
            .route("/f/{name}", any(invoke_root))
            .route("/f/{name}/", any(invoke_root))
            .route("/f/{name}/{*rest}", any(invoke_path))
            .fallback(not_routed)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                host_first,
            ))
            .with_state(self.clone())
    }

    /// Destroy all instances and sandboxes.
    pub async fn shutdown(&self) {
        self.functions.clear().await;
        self.node.shutdown().await;
    }
}

/// Serve the gateway on `listener` until `shutdown` resolves.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_app(gw.router(), listener, shutdown).await
}

/// Serve `app` (the gateway's router, perhaps with more merged in) on `listener` until
/// `shutdown` resolves, with the peer address as connect info and `TCP_NODELAY` on every
/// connection.
pub async fn serve_app(
    app: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Requests and answers are small and interactive: a response head and its body written
    // apart must not wait for the client's delayed ACK (Nagle).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

type GwState = State<Arc<Gateway>>;

/// The API's contract (OpenAPI 3.1), which `crates/veil-cli/tests/openapi.rs` checks the
/// server against.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> Response {
    ([(http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn render_metrics(State(gw): GwState) -> Response {
    let fns = gw.functions.list();
    let node = &gw.node;
    let sandboxes = node.sandboxes();
    let mut gauges = vec![
        (
            "veil_instances",
            "Ready instances per function.",
            fns.iter()
                .map(|f| (metrics::fn_label(&f.record.name), f.instances.len() as f64))
                .collect::<Vec<_>>(),
        ),
        (
            "veil_requests_waiting",
            "Requests waiting for capacity per function.",
            fns.iter()
                .map(|f| (metrics::fn_label(&f.record.name), f.waiting as f64))
                .collect(),
        ),
        (
            "veil_sandboxes",
            "Sandboxes on the node (assigned and pooled), by backend and accelerator.",
            vec![(
                format!("{{backend=\"{}\"}}", metrics::esc(&node.backend_label())),
                sandboxes.len() as f64,
            )],
        ),
        (
            "veil_blob_upstream_fetches",
            "Blobs fetched from upstream registries since start.",
            vec![(String::new(), node.cache().upstream_fetches() as f64)],
        ),
        (
            "veil_async_invocations_unfinished",
            "Asynchronous invocations accepted and not finished (queued or running).",
            vec![(String::new(), gw.invocations.unfinished() as f64)],
        ),
        (
            "veil_async_invocations_running",
            "Asynchronous invocation attempts running now.",
            vec![(String::new(), gw.invocations.running() as f64)],
        ),
        (
            "veil_instances_draining",
            "Instances finishing their requests before they are destroyed.",
            vec![(String::new(), gw.functions.draining() as f64)],
        ),
    ];
    let autoscaled: Vec<(String, &AutoscalerStatus)> = fns
        .iter()
        .flat_map(|f| {
            f.revisions.iter().filter_map(|r| {
                let label = format!(
                    "{{function=\"{}\",revision=\"{}\"}}",
                    metrics::esc(&f.record.name),
                    r.revision
                );
                r.autoscaler.as_ref().map(|a| (label, a))
            })
        })
        .collect();
    let per_revision = |f: fn(&AutoscalerStatus) -> f64| {
        autoscaled
            .iter()
            .map(|(l, a)| (l.clone(), f(a)))
            .collect::<Vec<_>>()
    };
    gauges.extend([
        (
            "veil_autoscaler_desired_instances",
            "Instances the autoscaler wants per live revision.",
            per_revision(|a| a.desired as f64),
        ),
        (
            "veil_autoscaler_panic",
            "1 while a live revision's autoscaler is in panic mode.",
            per_revision(|a| f64::from(u8::from(a.panic))),
        ),
        (
            "veil_autoscaler_stable_concurrency",
            "Average concurrency over the stable window per live revision.",
            per_revision(|a| a.stable_concurrency),
        ),
        (
            "veil_autoscaler_panic_concurrency",
            "Average concurrency over the panic window per live revision.",
            per_revision(|a| a.panic_concurrency),
        ),
    ]);
    gauges.extend(metrics::capacity_gauges(&node.capacity()));
    gauges.extend(metrics::tenant_pool_gauges(&node.tenant_pools()));
    let mut r = gw.metrics.render(&gauges).into_response();
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

type CallerExt = axum::Extension<auth::Caller>;

async fn list_functions(State(gw): GwState, caller: CallerExt) -> Response {
    let mut all = gw.functions.list();
    all.retain(|f| caller.may_act_for(&f.record.tenant));
    Json(all).into_response()
}

/// The function's status if `caller` may see it. Another tenant's function is reported as not
/// deployed, so tenants cannot probe each other's names through reads.
fn visible(gw: &Gateway, caller: &auth::Caller, name: &str) -> Option<FunctionStatus> {
    gw.functions
        .status(name)
        .filter(|s| caller.may_act_for(&s.record.tenant))
}

async fn get_invocation(State(gw): GwState, caller: CallerExt, Path(id): Path<String>) -> Response {
    invocations::get(&gw, &caller, id).await
}

async fn get_function(State(gw): GwState, caller: CallerExt, Path(name): Path<String>) -> Response {
    match visible(&gw, &caller, &name) {
        Some(s) => Json(s).into_response(),
        None => not_deployed(&name),
    }
}

pub(crate) fn not_deployed(name: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "FUNCTION_NOT_FOUND",
        format!("function {name:?} is not deployed"),
    )
}

async fn deploy(
    State(gw): GwState,
    caller: CallerExt,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let mut req: DeployRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("malformed deployment: {e}"),
            )
        }
    };
    match authorize_deploy(&gw, &caller, &name, &mut req) {
        Ok(v) => functions::deploy(&gw, &caller, &name, req, v).await,
        Err(r) => *r,
    }
}

/// A tenant deploys only as itself, never over another tenant's function, and only images of
/// its own local-store repositories. The validated deployment when allowed (validated once,
/// here, so that bad input is a 400 before anything about ownership).
fn authorize_deploy(
    gw: &Gateway,
    caller: &auth::Caller,
    name: &str,
    req: &mut DeployRequest,
) -> Result<ValidDeploy, Box<Response>> {
    let forbidden = |m: String| Err(Box::new(api_error(StatusCode::FORBIDDEN, "FORBIDDEN", m)));
    if let Some(t) = caller.tenant() {
        match &req.tenant {
            Some(asked) if asked != t => {
                return forbidden(format!(
                    "a token of tenant {t:?} cannot deploy for tenant {asked:?}"
                ))
            }
            _ => req.tenant = Some(t.to_string()),
        }
    }
    let v = validate_deploy(name, req, gw.config.default_kbs_url.as_deref())
        .map_err(|(code, message)| Box::new(api_error(StatusCode::BAD_REQUEST, code, message)))?;
    if let Some(existing) = gw.functions.status(name) {
        if !caller.may_act_for(&existing.record.tenant) {
            return forbidden(format!("function name {name:?} is taken by another tenant"));
        }
    }
    // A local image runs only for the tenant that owns its repository — also when the
    // operator deploys, so a tenant's repository can never feed another tenant's function
    // (and its secrets).
    if let Ok(r) = req.image.parse::<veil_image::Reference>() {
        if r.is_local() {
            let tenant = v.tenant.as_str();
            match gw.auth.repository_owner(&r.repository) {
                Some(owner) if owner == tenant => {}
                Some(_) => {
                    return forbidden(format!(
                        "image {}: repository {:?} belongs to another tenant than {tenant:?}",
                        req.image, r.repository
                    ))
                }
                // To this tenant, a repository nobody owns does not exist.
                None => {
                    return Err(Box::new(api_error(
                        StatusCode::NOT_FOUND,
                        "IMAGE_NOT_FOUND",
                        format!(
                            "image {}: tenant {tenant:?} has no repository {:?} in the local \
                             store (push it with that tenant's token)",
                            req.image, r.repository
                        ),
                    )))
                }
            }
        }
    }
    Ok(v)
}

async fn delete_function(
    State(gw): GwState,
    caller: CallerExt,
    Path(name): Path<String>,
) -> Response {
    let Some(status) = visible(&gw, &caller, &name) else {
        return not_deployed(&name);
    };
    match gw.functions.delete(&status.record.tenant, &name).await {
        Ok(true) => {
            // Only this tenant's logs: another tenant may already have deployed the name again.
            gw.node.logs().forget(&status.record.tenant, &name);
            Json(serde_json::json!({ "deleted": name })).into_response()
        }
        Ok(false) => not_deployed(&name),
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "STATE_ERROR",
            format!("the delete could not be stored, so nothing changed: {e}"),
        ),
    }
}

async fn set_traffic(
    State(gw): GwState,
    caller: CallerExt,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: TrafficRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("malformed traffic: {e}"),
            )
        }
    };
    functions::set_traffic(&gw, &caller, &name, req).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    /// The last this many lines (default 200); with `after`, at most this many.
    tail: Option<usize>,
    /// Only lines after this `seq` (a follower's cursor).
    after: Option<u64>,
    /// With `after`: wait up to this many seconds (at most 30) for a line if there is none.
    wait: Option<u64>,
}

/// Longest a log follower's request waits for a line.
const LOG_WAIT_MAX: Duration = Duration::from_secs(30);

async fn logs(
    State(gw): GwState,
    caller: CallerExt,
    Path(name): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!(
                    "bad query (tail, after and wait are numbers): {}",
                    e.body_text()
                ),
            )
        }
    };
    let Some(status) = visible(&gw, &caller, &name) else {
        return not_deployed(&name);
    };
    let tail = q.tail.unwrap_or(200).min(veil_node::logs::KEEP);
    let tenant = status.record.tenant;
    let book = gw.node.logs();
    let Some(after) = q.after else {
        return Json(book.tail(&tenant, &name, tail)).into_response();
    };
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(LOG_WAIT_MAX);
    let deadline = tokio::time::Instant::now() + wait;
    let mut newest = book.subscribe();
    loop {
        newest.borrow_and_update();
        let lines = book.after(&tenant, &name, after, tail);
        // A function deleted meanwhile ends the follow with its 404.
        if !lines.is_empty()
            || visible(&gw, &caller, &name).is_none_or(|s| s.record.tenant != tenant)
        {
            if lines.is_empty() {
                return not_deployed(&name);
            }
            return Json(lines).into_response();
        }
        if tokio::time::Instant::now() >= deadline {
            return Json(Vec::<veil_node::logs::Line>::new()).into_response();
        }
        // Woken by a new line, or each second to see whether the function is still there.
        let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
        if let Ok(Err(_)) = tokio::time::timeout_at(wake, newest.changed()).await {
            return Json(Vec::<veil_node::logs::Line>::new()).into_response();
        }
    }
}

/// A 400 for a tenant named in a path that is not a tenant name.
fn bad_tenant_name(tenant: &str) -> Option<Response> {
    (!functions::valid_name(tenant)).then(|| {
        api_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("{tenant:?} is not a tenant name"),
        )
    })
}

fn operator_only(caller: &auth::Caller) -> Option<Response> {
    (*caller != auth::Caller::Operator).then(|| {
        api_error(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "only the operator token may do this",
        )
    })
}

async fn sandboxes(State(gw): GwState, caller: CallerExt) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    Json(gw.node.sandboxes()).into_response()
}

async fn node_status(State(gw): GwState, caller: CallerExt) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    Json(gw.node.status()).into_response()
}

/// Body of `PUT /v1/tenant-pools/<tenant>`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPoolRequest {
    /// Sandboxes to keep attested (0 removes the pool).
    pub size: usize,
    /// The tenant's broker (default: the gateway's default broker, the one embedded in
    /// `veil up`).
    #[serde(default)]
    pub kbs_url: Option<String>,
    /// Attest with the INSECURE software TEE where no SEV-SNP/TDX exists.
    #[serde(default)]
    pub allow_insecure_software_tee: bool,
}

/// Largest tenant pool.
pub const MAX_TENANT_POOL: usize = 256;

async fn list_tenant_pools(State(gw): GwState, caller: CallerExt) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    Json(gw.node.tenant_pools()).into_response()
}

async fn set_tenant_pool(
    State(gw): GwState,
    caller: CallerExt,
    Path(tenant): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    let req: TenantPoolRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("malformed tenant pool: {e}"),
            )
        }
    };
    if let Some(r) = bad_tenant_name(&tenant) {
        return r;
    }
    if req.size > MAX_TENANT_POOL {
        return api_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("a tenant pool holds at most {MAX_TENANT_POOL} sandboxes"),
        );
    }
    let Some(kbs_url) = req.kbs_url.or_else(|| gw.config.default_kbs_url.clone()) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "no key broker: give kbs_url (this veil runs without an embedded broker)",
        );
    };
    if !(kbs_url.starts_with("http://") || kbs_url.starts_with("https://")) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("kbs_url {kbs_url:?} must be an http(s) URL"),
        );
    }
    gw.node
        .set_tenant_pool(veil_node::TenantPoolConfig {
            tenant: tenant.clone(),
            size: req.size,
            kbs_url,
            allow_insecure_software_tee: req.allow_insecure_software_tee,
        })
        .await;
    Json(gw.node.tenant_pools()).into_response()
}

async fn remove_tenant_pool(
    State(gw): GwState,
    caller: CallerExt,
    Path(tenant): Path<String>,
) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    gw.node.remove_tenant_pool(&tenant).await;
    StatusCode::NO_CONTENT.into_response()
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The tenant the new token acts for.
    pub tenant: String,
}

async fn create_token(State(gw): GwState, caller: CallerExt, body: axum::body::Bytes) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    let req: TokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("malformed token request: {e}"),
            )
        }
    };
    if !functions::valid_name(&req.tenant) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!(
                "tenant {:?} must be 1-63 lowercase letters, digits or '-'",
                req.tenant
            ),
        );
    }
    match gw.auth.create_token(&req.tenant) {
        Ok(t) => {
            tracing::info!(tenant = %req.tenant, id = %t.info.id, "tenant token created");
            (StatusCode::CREATED, Json(t)).into_response()
        }
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "STORAGE", e.to_string()),
    }
}

async fn list_tokens(State(gw): GwState, caller: CallerExt) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    Json(gw.auth.tokens()).into_response()
}

async fn revoke_token(State(gw): GwState, caller: CallerExt, Path(id): Path<String>) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    match gw.auth.revoke(&id) {
        Ok(true) => Json(serde_json::json!({ "revoked": id })).into_response(),
        Ok(false) => api_error(
            StatusCode::NOT_FOUND,
            "TOKEN_NOT_FOUND",
            format!("no token with id {id:?}"),
        ),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "STORAGE", e.to_string()),
    }
}

fn unauthenticated(path: &str, why: &str) -> Response {
    let mut r = if path.starts_with("/v2/") {
        registry::unauthorized(why)
    } else {
        api_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            format!(
                "{why}: send Authorization: Bearer <token> (the operator token is in \
                 <state dir>/{}; tenants get theirs from the operator)",
                auth::OPERATOR_TOKEN_FILE
            ),
        )
    };
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Basic realm=\"veil\""),
    );
    r
}

/// Authenticate `/v1/` and `/v2/` requests; the handlers confine a tenant to what it owns
/// (`registry::dispatch` to its repositories).
async fn require_token(
    State(gw): GwState,
    mut req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    let caller = match gw.auth.authenticate(req.headers()) {
        Ok(c) => c,
        Err(d) => return unauthenticated(&path, &d.message()),
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// `/healthz` and `/metrics`: open to loopback peers, a token otherwise.
async fn loopback_or_token(
    State(gw): GwState,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let on_loopback = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().is_loopback());
    if !on_loopback {
        // Metrics name every tenant's functions: from elsewhere, the operator's token only.
        match gw.auth.authenticate(req.headers()) {
            Ok(auth::Caller::Operator) => {}
            Ok(auth::Caller::Tenant(_)) => {
                return api_error(
                    StatusCode::FORBIDDEN,
                    "FORBIDDEN",
                    "only the operator token may read this from outside loopback",
                )
            }
            Err(d) => return unauthenticated(req.uri().path(), &d.message()),
        }
    }
    next.run(req).await
}

async fn invoke_root(State(gw): GwState, Path(name): Path<String>, req: Request<Body>) -> Response {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let (name, tag) = split_tag(&name);
    functions::invoke(&gw, name, tag, format!("/{query}"), req).await
}

/// `<fn>@<tag>` (a tagged target's own address) → (fn, tag).
fn split_tag(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((n, t)) => (n, Some(t)),
        None => (name, None),
    }
}

async fn invoke_path(
    State(gw): GwState,
    Path((name, _rest)): Path<(String, String)>,
    req: Request<Body>,
) -> Response {
    // Forward the path exactly as the client sent it (still percent-encoded), not axum's
    // decoded capture: `%2F`, `%3F` and `%20` must reach the function unchanged.
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let raw = pq
        .strip_prefix("/f/")
        .and_then(|r| r.find('/').map(|i| r[i..].to_string()))
        .unwrap_or_else(|| "/".into());
    let (name, tag) = split_tag(&name);
    functions::invoke(&gw, name, tag, raw, req).await
}

/// Requests whose Host names a function go to that function whatever their path, so a
/// function's own `/metrics` or `/v1/...` is not shadowed by the gateway's.
async fn host_first(
    State(gw): GwState,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    match function_from_host(&gw, req.headers()) {
        Some(name) => {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            // `<tag>.<fn><suffix>` addresses a tagged target (names have no dots).
            let (tag, name) = match name.split_once('.') {
                Some((t, n)) => (Some(t), n),
                None => (None, name.as_str()),
            };
            functions::invoke(&gw, name, tag, pq, req).await
        }
        None => next.run(req).await,
    }
}

fn function_from_host(gw: &Gateway, headers: &HeaderMap) -> Option<String> {
    if gw.config.host_suffix.is_empty() {
        return None;
    }
    let host = headers.get(http::header::HOST)?.to_str().ok()?;
    let host = host.split(':').next().unwrap_or("");
    let name = host.strip_suffix(gw.config.host_suffix.as_str())?;
    (!name.is_empty()).then(|| name.to_string())
}

async fn not_routed(State(gw): GwState, req: Request<Body>) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!(
            "no route for {}: invoke functions at /f/<name>/… or with Host: <name>{}",
            req.uri().path(),
            gw.config.host_suffix
        ),
    )
}
