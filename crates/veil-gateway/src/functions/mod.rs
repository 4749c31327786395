//! Deployments, instances, request routing with cold-start holding, autoscaling and draining.
//!
//! * [`deploy`]: validation of `PUT /v1/functions/<name>` and the switch to a new revision.
//! * [`route`]: picking an instance (or holding the request while one starts) and proxying.
//! * [`autoscale`]: starting instances within the node's capacity, scaling down idle ones.
//! * [`drain`]: instances that stop taking requests finish theirs before they are destroyed.
//!
//! Lock order: the deployments map, then the drain registry, then the node's pool and budget.

mod autoscale;
mod deploy;
mod drain;
mod route;

pub use autoscale::spawn_autoscaler;
pub(crate) use deploy::valid_name;
pub use deploy::{deploy, validate, DeployRequest, ValidDeploy, MAX_ENV_BYTES};
pub use route::invoke;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use veil_node::cache::ResolvedImage;
use veil_node::{CancellationToken, Instance};

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
    /// Keep-alive policy.
    #[serde(default)]
    pub keep_alive: crate::keepalive::KeepAlive,
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
    /// Instances of earlier revisions (or scaled down) that take no new requests and are
    /// destroyed once the requests they have are done, or at the drain deadline.
    #[serde(default)]
    pub draining: Vec<String>,
    /// Requests in flight on the ready instances.
    #[serde(default)]
    pub inflight: u64,
    /// Instances starting.
    pub starting: usize,
    /// Requests waiting for capacity.
    pub waiting: usize,
    /// The last cold-start failure, if any.
    pub last_error: Option<String>,
    /// Where its instances run: the backend and, for VMs, the accelerator (`microvm/tcg`).
    #[serde(default)]
    pub backend: String,
    /// What the keep-alive policy currently decides (pre-warm and keep-alive windows, and
    /// why), for `hybrid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_decision: Option<String>,
    /// The phase breakdowns of its latest cold starts (this revision), oldest first.
    #[serde(default)]
    pub recent_starts: Vec<veil_node::StartTimings>,
}

/// One ready instance and the requests it carries.
struct Slot {
    inst: Instance,
    inflight: AtomicU32,
    last_used: Mutex<Instant>,
    first_served: AtomicBool,
}

/// When a function is busy and when it went idle, and the histogram of its idle times (the
/// hybrid keep-alive policy's input). Shared by the requests (which arrive and depart) and the
/// autoscaler (which reads it).
#[derive(Default)]
pub(crate) struct Activity {
    active: AtomicU32,
    state: Mutex<ActivityState>,
}

#[derive(Default)]
struct ActivityState {
    idle_since: Option<Instant>,
    hist: crate::keepalive::IdleHistogram,
}

impl Activity {
    /// A request arrives; the end of an idle period is recorded.
    fn arrive(self: &Arc<Self>, cfg: &crate::keepalive::HybridConfig) -> ActivityGuard {
        if self.active.fetch_add(1, Ordering::SeqCst) == 0 {
            let mut s = lock(&self.state);
            if let Some(t) = s.idle_since.take() {
                s.hist.record(t.elapsed(), cfg);
            }
        }
        ActivityGuard(self.clone())
    }

    /// How long the function has been idle (no request anywhere), if it is.
    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::SeqCst) != 0 {
            return None;
        }
        lock(&self.state).idle_since.map(|t| t.elapsed())
    }

    fn decide(
        &self,
        cfg: &crate::keepalive::HybridConfig,
        fallback: Duration,
    ) -> crate::keepalive::Decision {
        lock(&self.state).hist.decide(cfg, fallback)
    }
}

/// A request counted as activity until it ends, however it ends.
pub(crate) struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            lock(&self.0.state).idle_since = Some(Instant::now());
        }
    }
}

/// Cold starts kept per function for `veil describe`.
const RECENT_STARTS: usize = 10;

/// The live state of one function's current revision.
struct Runtime {
    record: FunctionRecord,
    /// The breakdowns of its latest cold starts, oldest first.
    recent_starts: std::collections::VecDeque<veil_node::StartTimings>,
    /// Requests and idle periods (the keep-alive policy's input).
    activity: Arc<Activity>,
    instances: Vec<Arc<Slot>>,
    starting: usize,
    /// Requests waiting for capacity; decremented by a guard even if the client goes away.
    waiting: Arc<AtomicUsize>,
    failures: u64,
    last_error: Option<String>,
    /// When the last cold start failed (min_scale restarts back off from it).
    last_failure: Option<Instant>,
    /// Whether the autoscaler last found no room on the node for a min_scale instance (so
    /// that it says so once, not every tick).
    min_scale_blocked: bool,
    changes: Arc<watch::Sender<u64>>,
    /// Fires when this revision is deleted or replaced; in-flight cold starts stop.
    cancel: CancellationToken,
}

impl Runtime {
    fn new(record: FunctionRecord) -> Self {
        Self {
            record,
            recent_starts: std::collections::VecDeque::new(),
            activity: Arc::default(),
            instances: Vec::new(),
            starting: 0,
            waiting: Arc::new(AtomicUsize::new(0)),
            failures: 0,
            last_error: None,
            last_failure: None,
            min_scale_blocked: false,
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
    /// Instances that take no new requests and finish the ones they have.
    drains: drain::Drains,
    /// The node's backend label, for status.
    backend: String,
    /// The hybrid keep-alive policy's parameters.
    pub(crate) keep_alive: crate::keepalive::HybridConfig,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Functions {
    /// Load persisted deployments from `state_dir/functions.json`; instances that stop taking
    /// requests get `drain_timeout` to finish the ones they have; `keep_alive` parameterises
    /// the hybrid keep-alive policy.
    pub fn load(
        state_dir: &Path,
        drain_timeout: Duration,
        backend: String,
        keep_alive: crate::keepalive::HybridConfig,
    ) -> Self {
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
            drains: drain::Drains::new(drain_timeout),
            backend,
            keep_alive,
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

    fn status_of(&self, rt: &Runtime) -> FunctionStatus {
        FunctionStatus {
            record: rt.record.clone(),
            instances: rt
                .instances
                .iter()
                .filter(|s| s.inst.is_alive())
                .map(|s| s.inst.id().to_string())
                .collect(),
            draining: self.drains.of(&rt.record.name),
            inflight: rt
                .instances
                .iter()
                .map(|s| u64::from(s.inflight.load(Ordering::SeqCst)))
                .sum(),
            starting: rt.starting,
            waiting: rt.waiting.load(Ordering::SeqCst),
            last_error: rt.last_error.clone(),
            backend: self.backend.clone(),
            recent_starts: rt.recent_starts.iter().cloned().collect(),
            keep_alive_decision: (rt.record.keep_alive == crate::keepalive::KeepAlive::Hybrid)
                .then(|| {
                    let d = rt.activity.decide(
                        &self.keep_alive,
                        Duration::from_secs(rt.record.idle_timeout_s),
                    );
                    format!(
                        "pre-warm after {:.1}s idle, keep {:.1}s: {}",
                        d.prewarm.as_secs_f64(),
                        d.keep_alive.as_secs_f64(),
                        d.source
                    )
                }),
        }
    }

    /// Status of one function.
    pub fn status(&self, name: &str) -> Option<FunctionStatus> {
        lock(&self.map).get(name).map(|rt| self.status_of(rt))
    }

    /// Status of all functions.
    pub fn list(&self) -> Vec<FunctionStatus> {
        let map = lock(&self.map);
        let mut v: Vec<FunctionStatus> = map.values().map(|rt| self.status_of(rt)).collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        v
    }

    /// Instances draining, of all functions (deleted ones included).
    pub fn draining(&self) -> usize {
        self.drains.len()
    }

    /// Take a revision out of service: its cold starts stop, requests waiting for it re-route
    /// (to the next revision, or to a 404), and its instances drain. The returned task ends when
    /// they are all destroyed.
    fn retire(&self, rt: Runtime, why: &'static str) -> tokio::task::JoinHandle<()> {
        rt.cancel.cancel();
        rt.bump();
        self.drains.start(
            &rt.record.name,
            rt.record.revision,
            rt.instances,
            &rt.changes,
            why,
        )
    }

    /// Delete a function: it takes no new requests at once, and returns when its instances
    /// have finished the requests they have (or the drain deadline destroyed them). False if
    /// it was not deployed.
    pub async fn delete(&self, tenant: &str, name: &str) -> bool {
        let drained = {
            let mut map = lock(&self.map);
            // Checked under the lock: the name may have changed hands since the caller looked.
            if map.get(name).is_none_or(|rt| rt.record.tenant != tenant) {
                return false;
            }
            let Some(rt) = map.remove(name) else {
                return false;
            };
            self.persist(&map);
            self.retire(rt, "deleted")
        };
        if let Err(e) = drained.await {
            tracing::error!(function = name, error = %e, "draining the deleted function failed");
        }
        true
    }

    /// Destroy every instance now, draining ones included (deployments stay persisted).
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
        futures::future::join_all(slots.iter().map(|s| s.inst.destroy())).await;
        self.drains.destroy_all().await;
    }
}
