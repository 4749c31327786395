//! Deployments, instances, request routing with cold-start holding, autoscaling and draining.
//!
//! * [`deploy`]: validation of `PUT /v1/functions/<name>` and the switch to a new revision.
//! * [`route`]: picking an instance (or holding the request while one starts) and proxying.
//! * [`autoscale`]: starting instances within the node's capacity, scaling down idle ones.
//! * [`drain`]: instances that stop taking requests finish theirs before they are destroyed.
//! * [`traffic`]: which revisions take a function's requests.
//!
//! Every deploy creates an immutable revision; a function's traffic names the revisions that
//! take its requests (by percent, or by tag), and only those are *live* (have a [`Runtime`]).
//! A revision that loses its traffic drains. Changes are written to the [`Store`] first and
//! applied in memory only once it has them.
//!
//! Lock order: the deployments map, then the drain registry, then the node's pool and budget.

mod autoscale;
mod deploy;
mod drain;
mod route;
pub mod traffic;

pub use autoscale::{spawn_autoscaler, AutoscaleConfig, AutoscalerStatus};
pub(crate) use deploy::valid_name;
pub use deploy::{
    deploy, set_traffic, validate, DeployRequest, TrafficRequest, ValidDeploy, MAX_ENV_BYTES,
};
pub(crate) use route::dispatch;
pub use route::invoke;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use veil_node::cache::ResolvedImage;
use veil_node::{CancellationToken, Instance};

use crate::state::{Store, StoreError, TrafficTarget};

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
    /// Concurrent requests per instance (a hard limit).
    pub concurrency: u32,
    /// The autoscaler's target of concurrent requests per instance (absent: `concurrency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    /// Minimum instances.
    pub min_scale: u32,
    /// Maximum instances.
    pub max_scale: u32,
    /// Function port.
    pub port: u16,
    /// Readiness timeout in seconds.
    pub ready_timeout_s: u64,
    /// Idle timeout in seconds: an idle instance is removed after it (scale to zero).
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
    /// When this revision was created (milliseconds since the Unix epoch; 0 if unknown).
    #[serde(default)]
    pub created_ms: u64,
}

impl FunctionRecord {
    /// The concurrency per instance the autoscaler aims for.
    pub fn target_concurrency(&self) -> f64 {
        self.target.unwrap_or(f64::from(self.concurrency))
    }
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
    /// The phase breakdowns of its latest cold starts (live revisions), oldest first.
    #[serde(default)]
    pub recent_starts: Vec<veil_node::StartTimings>,
    /// Where its requests go, each target with the revision it resolves to.
    #[serde(default)]
    pub traffic: Vec<TrafficStatus>,
    /// Its kept revisions, oldest first (`record` is the latest).
    #[serde(default)]
    pub revisions: Vec<RevisionStatus>,
}

/// One traffic target as `GET /v1/functions/<name>` reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrafficStatus {
    /// The revision it resolves to.
    pub revision: u64,
    /// Whether it follows the latest revision.
    pub latest: bool,
    /// Percent of the untagged requests.
    pub percent: u32,
    /// Its tag, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// One kept revision as `GET /v1/functions/<name>` reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RevisionStatus {
    /// Its number.
    pub revision: u64,
    /// The image reference and the manifest digest it is pinned to.
    pub image: String,
    /// Pinned manifest digest.
    pub digest: String,
    /// When it was created (ms since the Unix epoch).
    pub created_ms: u64,
    /// Percent of the untagged requests it takes.
    pub percent: u32,
    /// Tags that address it.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Whether it is live (has traffic or a tag).
    pub live: bool,
    /// Ready instances.
    pub instances: usize,
    /// Instances starting.
    pub starting: usize,
    /// The autoscaler's last decision (live revisions, once it has ticked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<autoscale::AutoscalerStatus>,
}

/// One ready instance and the requests it carries.
struct Slot {
    inst: Instance,
    inflight: AtomicU32,
    last_used: Mutex<Instant>,
    /// When it became ready.
    ready_at: Instant,
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

/// Distinguishes runtimes of one revision that went live more than once.
static RUNTIME_IDS: AtomicU64 = AtomicU64::new(1);

/// The live state of one revision that takes traffic.
struct Runtime {
    /// Unique to this runtime (a revision that loses its traffic and regains it gets a new one).
    id: u64,
    record: FunctionRecord,
    /// The breakdowns of its latest cold starts, oldest first.
    recent_starts: std::collections::VecDeque<veil_node::StartTimings>,
    /// Its concurrency samples and panic state (the autoscaler's input).
    observed: autoscale::Observed,
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
            id: RUNTIME_IDS.fetch_add(1, Ordering::Relaxed),
            record,
            recent_starts: std::collections::VecDeque::new(),
            observed: autoscale::Observed::default(),
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

/// A function: its revisions, its traffic, and the live state of the revisions that serve.
struct Function {
    tenant: String,
    /// Every kept revision, by number (immutable once created; the last is the latest).
    revisions: BTreeMap<u64, FunctionRecord>,
    traffic: Vec<TrafficTarget>,
    /// The revisions that traffic or a tag names, by number.
    live: BTreeMap<u64, Runtime>,
}

impl Function {
    fn latest(&self) -> Option<&FunctionRecord> {
        self.revisions.values().next_back()
    }
}

/// All deployments of this gateway.
pub struct Functions {
    map: Mutex<HashMap<String, Function>>,
    store: Arc<dyn Store>,
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

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Functions {
    /// Load the deployments from `store`; instances that stop taking requests get
    /// `drain_timeout` to finish the ones they have; `keep_alive` parameterises the hybrid
    /// keep-alive policy.
    pub fn load(
        store: Arc<dyn Store>,
        drain_timeout: Duration,
        backend: String,
        keep_alive: crate::keepalive::HybridConfig,
    ) -> Result<Self, StoreError> {
        let mut map = HashMap::new();
        for (name, stored) in store.load()? {
            let revisions: BTreeMap<u64, FunctionRecord> = stored
                .revisions
                .into_iter()
                .map(|r| (r.revision, r))
                .collect();
            let Some(tenant) = revisions.values().next().map(|r| r.tenant.clone()) else {
                continue;
            };
            let mut f = Function {
                tenant,
                revisions,
                traffic: stored.traffic,
                live: BTreeMap::new(),
            };
            Self::go_live(&mut f);
            map.insert(name, f);
        }
        Ok(Self {
            map: Mutex::new(map),
            store,
            drains: drain::Drains::new(drain_timeout),
            backend,
            keep_alive,
        })
    }

    /// The store the functions are kept in.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Give every revision the traffic names a runtime (those that lack one).
    fn go_live(f: &mut Function) {
        for rev in traffic::wanted(&f.revisions, &f.traffic) {
            if let (false, Some(rec)) = (f.live.contains_key(&rev), f.revisions.get(&rev)) {
                f.live.insert(rev, Runtime::new(rec.clone()));
            }
        }
    }

    /// Bring `f`'s live revisions in line with its traffic: new ones go live, those that lost
    /// their traffic drain (`why`).
    fn reconcile(&self, f: &mut Function, why: &'static str) {
        let wanted = traffic::wanted(&f.revisions, &f.traffic);
        let gone: Vec<u64> = f
            .live
            .keys()
            .filter(|r| !wanted.contains(r))
            .copied()
            .collect();
        for rev in gone {
            if let Some(rt) = f.live.remove(&rev) {
                drop(self.retire(rt, why));
            }
        }
        Self::go_live(f);
    }

    fn status_of(&self, f: &Function) -> Option<FunctionStatus> {
        let record = f.latest()?.clone();
        let live = || f.live.values();
        let mut recent_starts: Vec<veil_node::StartTimings> = live()
            .flat_map(|rt| rt.recent_starts.iter().cloned())
            .collect();
        let skip = recent_starts.len().saturating_sub(RECENT_STARTS);
        recent_starts.drain(..skip);
        let traffic: Vec<TrafficStatus> = f
            .traffic
            .iter()
            .map(|t| TrafficStatus {
                revision: traffic::resolve(&f.revisions, t),
                latest: t.revision.is_none(),
                percent: t.percent,
                tag: t.tag.clone(),
            })
            .collect();
        let revisions = f
            .revisions
            .values()
            .map(|r| {
                let rt = f.live.get(&r.revision);
                let of = |t: &&TrafficStatus| t.revision == r.revision;
                RevisionStatus {
                    revision: r.revision,
                    image: r.image.reference.clone(),
                    digest: r.image.manifest_digest.clone(),
                    created_ms: r.created_ms,
                    percent: traffic.iter().filter(of).map(|t| t.percent).sum(),
                    tags: traffic
                        .iter()
                        .filter(of)
                        .filter_map(|t| t.tag.clone())
                        .collect(),
                    live: rt.is_some(),
                    instances: rt.map_or(0, |rt| {
                        rt.instances.iter().filter(|s| s.inst.is_alive()).count()
                    }),
                    starting: rt.map_or(0, |rt| rt.starting),
                    autoscaler: rt.and_then(|rt| rt.observed.last.clone()),
                }
            })
            .collect();
        // The keep-alive decision of the newest live revision with the hybrid policy.
        let keep_alive_decision = live()
            .rev()
            .find(|rt| rt.record.keep_alive == crate::keepalive::KeepAlive::Hybrid)
            .map(|rt| {
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
            });
        Some(FunctionStatus {
            instances: live()
                .flat_map(|rt| rt.instances.iter())
                .filter(|s| s.inst.is_alive())
                .map(|s| s.inst.id().to_string())
                .collect(),
            draining: self.drains.of(&record.name),
            inflight: live()
                .flat_map(|rt| rt.instances.iter())
                .map(|s| u64::from(s.inflight.load(Ordering::SeqCst)))
                .sum(),
            starting: live().map(|rt| rt.starting).sum(),
            waiting: live().map(|rt| rt.waiting.load(Ordering::SeqCst)).sum(),
            last_error: live().rev().find_map(|rt| rt.last_error.clone()),
            backend: self.backend.clone(),
            recent_starts,
            keep_alive_decision,
            traffic,
            revisions,
            record,
        })
    }

    /// Status of one function.
    pub fn status(&self, name: &str) -> Option<FunctionStatus> {
        lock(&self.map).get(name).and_then(|f| self.status_of(f))
    }

    /// The tenant owning `name`, if it is deployed and has a target tagged `tag` (if given);
    /// otherwise the 404 a request for it gets.
    pub(crate) fn target_tenant(
        &self,
        name: &str,
        tag: Option<&str>,
    ) -> Result<String, Box<axum::response::Response>> {
        let map = lock(&self.map);
        let Some(f) = map.get(name) else {
            return Err(Box::new(crate::not_deployed(name)));
        };
        if let Some(t) = tag {
            if !f.traffic.iter().any(|x| x.tag.as_deref() == Some(t)) {
                return Err(Box::new(route::tag_not_found(name, t)));
            }
        }
        Ok(f.tenant.clone())
    }

    /// Status of all functions.
    pub fn list(&self) -> Vec<FunctionStatus> {
        let map = lock(&self.map);
        let mut v: Vec<FunctionStatus> = map.values().filter_map(|f| self.status_of(f)).collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        v
    }

    /// Instances draining, of all functions (deleted ones included).
    pub fn draining(&self) -> usize {
        self.drains.len()
    }

    /// Take a revision out of service: its cold starts stop, requests waiting for it re-route
    /// (to another revision, or to a 404), and its instances drain. The returned task ends when
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
    /// it was not deployed (for `tenant`); an error if the store could not record it, in
    /// which case nothing changed.
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        let drained = {
            let mut map = lock(&self.map);
            // Checked under the lock: the name may have changed hands since the caller looked.
            if map.get(name).is_none_or(|f| f.tenant != tenant) {
                return Ok(false);
            }
            self.store.delete_function(name)?;
            let Some(f) = map.remove(name) else {
                return Ok(false);
            };
            f.live
                .into_values()
                .map(|rt| self.retire(rt, "deleted"))
                .collect::<Vec<_>>()
        };
        for r in futures::future::join_all(drained).await {
            if let Err(e) = r {
                tracing::error!(function = name, error = %e, "draining the deleted function failed");
            }
        }
        Ok(true)
    }

    /// Destroy every instance now, draining ones included (deployments stay stored).
    pub async fn clear(&self) {
        let slots: Vec<Arc<Slot>> = {
            let mut map = lock(&self.map);
            map.values_mut()
                .flat_map(|f| f.live.values_mut())
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
