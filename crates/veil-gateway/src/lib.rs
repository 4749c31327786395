//! The gateway: HTTP ingress for functions, the admin API, and the local image registry.
//!
//! * Invocations: `/f/<name>/<path>` or any path with `Host: <name><host_suffix>`. A request
//!   goes to the least-loaded ready instance of the function; if none has room, the gateway
//!   starts one (up to `max_scale`) and holds the request — bounded in time and in queue length,
//!   then a 503 with a clear body and `Retry-After`, never a hang.
//! * Admin (JSON): `PUT/GET/DELETE /v1/functions/<name>`, `GET /v1/functions`,
//!   `GET /v1/functions/<name>/logs`, `GET /v1/sandboxes`, `GET /healthz`.
//! * Local image store: the OCI distribution API under `/v2/` for `local/<repo>` images.
#![forbid(unsafe_code)]

mod functions;
pub mod metrics;
mod registry;

pub use functions::{DeployRequest, FunctionRecord, FunctionStatus};
pub use registry::LocalStoreConfig;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
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
    pub(crate) uploads: registry::Uploads,
    pub(crate) metrics: metrics::Metrics,
}

impl Gateway {
    /// Create a gateway over `node`, restoring persisted deployments.
    pub fn new(node: Arc<Node>, config: GatewayConfig) -> Arc<Self> {
        let functions = functions::Functions::load(&config.state_dir);
        let gw = Arc::new(Self {
            node,
            config,
            functions,
            uploads: registry::Uploads::default(),
            metrics: metrics::Metrics::default(),
        });
        functions::spawn_autoscaler(Arc::downgrade(&gw));
        gw
    }

    /// The node behind this gateway.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The HTTP router.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(render_metrics))
            .route("/v1/functions", get(list_functions))
            .route(
                "/v1/functions/{name}",
                get(get_function).put(deploy).delete(delete_function),
            )
            .route("/v1/functions/{name}/logs", get(logs))
            .route("/v1/sandboxes", get(sandboxes))
            .route("/v2/", get(registry::base))
            .route("/v2/{*rest}", any(registry::dispatch))
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

/// Bind and serve until `shutdown` resolves; returns the bound address through `bound`.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = gw.router();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

type GwState = State<Arc<Gateway>>;

async fn render_metrics(State(gw): GwState) -> Response {
    let fns = gw.functions.list();
    let node = &gw.node;
    let sandboxes = node.sandboxes();
    let gauges = [
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
            "Sandboxes on the node (assigned and pooled).",
            vec![(String::new(), sandboxes.len() as f64)],
        ),
        (
            "veil_blob_upstream_fetches",
            "Blobs fetched from upstream registries since start.",
            vec![(String::new(), node.cache().upstream_fetches() as f64)],
        ),
    ];
    let mut r = gw.metrics.render(&gauges).into_response();
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn list_functions(State(gw): GwState) -> Response {
    Json(gw.functions.list()).into_response()
}

async fn get_function(State(gw): GwState, Path(name): Path<String>) -> Response {
    match gw.functions.status(&name) {
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

async fn deploy(State(gw): GwState, Path(name): Path<String>, body: axum::body::Bytes) -> Response {
    let req: DeployRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("malformed deployment: {e}"),
            )
        }
    };
    functions::deploy(&gw, &name, req).await
}

async fn delete_function(State(gw): GwState, Path(name): Path<String>) -> Response {
    if gw.functions.delete(&name).await {
        gw.node.logs().forget(&name);
        Json(serde_json::json!({ "deleted": name })).into_response()
    } else {
        not_deployed(&name)
    }
}

#[derive(serde::Deserialize)]
struct LogQuery {
    tail: Option<usize>,
}

async fn logs(State(gw): GwState, Path(name): Path<String>, Query(q): Query<LogQuery>) -> Response {
    if gw.functions.status(&name).is_none() {
        return not_deployed(&name);
    }
    Json(gw.node.logs().tail(&name, q.tail.unwrap_or(200))).into_response()
}

async fn sandboxes(State(gw): GwState) -> Response {
    Json(gw.node.sandboxes()).into_response()
}

async fn invoke_root(State(gw): GwState, Path(name): Path<String>, req: Request<Body>) -> Response {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    functions::invoke(&gw, &name, format!("/{query}"), req).await
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
    functions::invoke(&gw, &name, raw, req).await
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
            functions::invoke(&gw, &name, pq, req).await
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
