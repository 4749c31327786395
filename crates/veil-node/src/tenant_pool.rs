//! Tenant-attested pools: sandboxes booted and attested to one tenant's key broker ahead of
//! demand, so that a cold start of that tenant's function has no attestation on its path.
//!
//! A pooled sandbox is taken from the generic pool (or booted), bound to the tenant, and asked
//! to attest with init data of tenant scope (`veil_proto::Preparation`); it keeps the session
//! and the ephemeral key whose hash the evidence carries, and at assignment states its
//! function to the broker with that key (`veil_kbs::statement`). The binding rules:
//! - a sandbox serves one tenant in its whole life: once prepared it is never returned to the
//!   generic pool — unused, expired, failed or removed with its pool, it is destroyed (and the
//!   agent itself refuses an assignment for another tenant);
//! - a prepared sandbox whose token nears expiry is destroyed and replaced (a fresh one attests
//!   again);
//! - removing a tenant's pool destroys its sandboxes;
//! - a broker that is down, slow or refusing makes the pool back off (1 s doubling to 60 s),
//!   shrink instead of spinning, and report why; a start that finds the pool empty takes a
//!   generic sandbox and attests on its path, as without the pool.

use crate::{lock, Node, SandboxEntry};
use bytes::Bytes;
use http_body_util::Full;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use veil_proto::mux;
use veil_proto::{ErrorBody, StreamKind};

/// One tenant's pool, as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantPoolConfig {
    /// The tenant.
    pub tenant: String,
    /// Sandboxes kept attested and ready.
    pub size: usize,
    /// The tenant's key broker (the one its functions name).
    pub kbs_url: String,
    /// Attest with the INSECURE software TEE where no SEV-SNP/TDX exists (development only).
    #[serde(default)]
    pub allow_insecure_software_tee: bool,
}

/// What `GET /v1/node` reports about one tenant's pool.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TenantPoolStatus {
    /// The configuration.
    #[serde(flatten)]
    pub config: TenantPoolConfig,
    /// Sandboxes attested and waiting.
    pub ready: usize,
    /// Sandboxes being attested.
    pub preparing: usize,
    /// Why the last preparation failed, while the pool backs off.
    pub last_error: Option<String>,
    /// Seconds until the next attempt, while backing off.
    pub retry_in_s: Option<u64>,
    /// Idle sandboxes of this pool destroyed to make room for another tenant's start.
    #[serde(default)]
    pub evicted: u64,
    /// Sandboxes the pool is short of its size because the pools' memory is taken.
    #[serde(default)]
    pub short_of_memory: usize,
}

pub(crate) struct Ready {
    pub(crate) sb: Arc<SandboxEntry>,
    /// When it was ready (the oldest idle one is evicted first).
    since: Instant,
    expires: Instant,
    /// Handed out only while its token has at least this much left.
    margin: Duration,
    /// The pool configuration it attested under.
    generation: u64,
}

struct Pool {
    config: TenantPoolConfig,
    /// Changes with every reconfiguration (another broker or software-TEE choice): sandboxes
    /// and preparations of an older generation are destroyed, never pooled.
    generation: u64,
    ready: Vec<Ready>,
    preparing: usize,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    evicted: u64,
    /// Below its size for want of pool memory at the last fill.
    short_of_memory: usize,
}

impl Pool {
    /// Sandboxes it holds: ready, or being prepared.
    fn held(&self) -> usize {
        self.ready.len() + self.preparing
    }

    /// Its oldest idle sandbox that still holds its room (one being destroyed has given it
    /// back already): its place in `ready`, and since when it waits.
    fn oldest_idle(&self) -> Option<(usize, Instant)> {
        self.ready
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.sb.dead.load(Ordering::SeqCst) && lock(&r.sb.reservation).is_some())
            .min_by_key(|(_, r)| r.since)
            .map(|(i, r)| (i, r.since))
    }

    /// Give up the idle sandbox at `at` with its room, counted as evicted (the taker destroys
    /// it before booting in its place).
    fn give_up(&mut self, at: usize) -> Option<(Arc<SandboxEntry>, crate::capacity::Reservation)> {
        let reservation = lock(&self.ready[at].sb.reservation).take()?;
        let r = self.ready.remove(at);
        self.evicted += 1;
        Some((r.sb, reservation))
    }
}

/// Sandboxes all the tenants' pools hold.
fn held_by_all(map: &HashMap<String, Pool>) -> usize {
    map.values().map(Pool::held).sum()
}

#[derive(Default)]
pub(crate) struct TenantPools {
    map: std::sync::Mutex<HashMap<String, Pool>>,
    next_generation: std::sync::atomic::AtomicU64,
}

/// A prepared sandbox is replaced this long before its token expires (or a quarter of the
/// token's lifetime, if shorter).
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// A token must leave a prepared sandbox at least this long to be worth keeping.
const MIN_LIFETIME: Duration = Duration::from_secs(4);
/// The most a pool backs off between failed preparations.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Node {
    /// Create, resize or reconfigure a tenant's pool (size 0 removes it). Sandboxes prepared
    /// under another configuration are destroyed.
    pub async fn set_tenant_pool(self: &Arc<Self>, config: TenantPoolConfig) {
        let doomed: Vec<Arc<SandboxEntry>> = {
            let mut map = lock(&self.tenant_pools.map);
            let old = map.remove(&config.tenant);
            let keep_old = old.as_ref().is_some_and(|p| {
                p.config.kbs_url == config.kbs_url
                    && p.config.allow_insecure_software_tee == config.allow_insecure_software_tee
            });
            let mut doomed = Vec::new();
            let generation = self
                .tenant_pools
                .next_generation
                .fetch_add(1, Ordering::SeqCst);
            let mut pool = Pool {
                config: config.clone(),
                generation,
                ready: Vec::new(),
                preparing: 0,
                failures: 0,
                retry_at: None,
                last_error: None,
                evicted: 0,
                short_of_memory: 0,
            };
            if let Some(mut old) = old {
                pool.evicted = old.evicted;
                if keep_old {
                    pool.generation = old.generation;
                    pool.preparing = old.preparing;
                    let keep = config.size.min(old.ready.len());
                    doomed.extend(old.ready.drain(keep..).map(|r| r.sb));
                    pool.ready = old.ready;
                } else {
                    doomed.extend(old.ready.into_iter().map(|r| r.sb));
                }
            }
            if config.size > 0 {
                map.insert(config.tenant.clone(), pool);
            }
            doomed
        };
        for sb in doomed {
            self.destroy_entry(&sb).await;
        }
        tracing::info!(tenant = %config.tenant, size = config.size, "tenant pool configured");
        self.fill_tenant_pools();
    }

    /// Remove a tenant's pool, destroying its sandboxes (a deleted tenant leaves nothing).
    pub async fn remove_tenant_pool(self: &Arc<Self>, tenant: &str) {
        let doomed = lock(&self.tenant_pools.map)
            .remove(tenant)
            .map(|p| p.ready)
            .unwrap_or_default();
        for r in doomed {
            self.destroy_entry(&r.sb).await;
        }
    }

    /// At shutdown: forget the prepared sandboxes (the node destroys every sandbox).
    pub(crate) fn clear_tenant_pools(&self) {
        for p in lock(&self.tenant_pools.map).values_mut() {
            p.ready.clear();
        }
    }

    /// The tenants' pools.
    pub fn tenant_pools(&self) -> Vec<TenantPoolStatus> {
        let now = Instant::now();
        let mut v: Vec<TenantPoolStatus> = lock(&self.tenant_pools.map)
            .values()
            .map(|p| TenantPoolStatus {
                config: p.config.clone(),
                ready: p
                    .ready
                    .iter()
                    .filter(|r| !r.sb.dead.load(Ordering::SeqCst))
                    .count(),
                preparing: p.preparing,
                last_error: p.last_error.clone(),
                retry_in_s: p
                    .retry_at
                    .filter(|t| *t > now)
                    .map(|t| (t - now).as_secs() + 1),
                evicted: p.evicted,
                short_of_memory: p.short_of_memory,
            })
            .collect();
        v.sort_by(|a, b| a.config.tenant.cmp(&b.config.tenant));
        v
    }

    /// A prepared sandbox of `tenant`'s pool, if one is ready and its broker is `kbs_url` (or
    /// the function talks to no broker).
    pub(crate) fn take_tenant_sandbox(
        self: &Arc<Self>,
        tenant: &str,
        kbs_url: Option<&str>,
        allow_software_tee: bool,
    ) -> Option<Ready> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut map = lock(&self.tenant_pools.map);
            let pool = map.get_mut(tenant)?;
            if kbs_url.is_some_and(|u| u != pool.config.kbs_url) {
                return None;
            }
            // A deployment that does not allow the software TEE never takes a sandbox of a pool
            // that may have attested with it.
            if pool.config.allow_insecure_software_tee && !allow_software_tee {
                return None;
            }
            loop {
                match pool.ready.pop() {
                    // Enough token left for the start to release its secrets.
                    Some(r) if !r.sb.dead.load(Ordering::SeqCst) && r.expires > now + r.margin => {
                        break Some(r)
                    }
                    // Expired or dead: never handed out, destroyed.
                    Some(r) => stale.push(r.sb),
                    None => break None,
                }
            }
        };
        if !stale.is_empty() {
            let node = self.clone();
            tokio::spawn(async move {
                for sb in stale {
                    node.destroy_entry(&sb).await;
                }
            });
        }
        // Replaced when the start that took it is over (`Node::start_instance`), off its path.
        found
    }

    /// A prepared sandbox that was claimed but not used goes back to its tenant's pool, or is
    /// destroyed — never to the generic pool.
    pub(crate) fn return_tenant_sandbox(self: &Arc<Self>, tenant: &str, r: Ready) {
        {
            let mut map = lock(&self.tenant_pools.map);
            if let Some(pool) = map.get_mut(tenant) {
                if pool.generation == r.generation
                    && pool.ready.len() < pool.config.size
                    && !self.shutting_down.load(Ordering::SeqCst)
                {
                    pool.ready.push(r);
                    self.budget.bump();
                    return;
                }
            }
        }
        let node = self.clone();
        tokio::spawn(async move { node.destroy_entry(&r.sb).await });
    }

    /// Sandboxes the tenants' pools hold: ready, or being prepared.
    pub(crate) fn tenant_pooled(&self) -> usize {
        held_by_all(&lock(&self.tenant_pools.map))
    }

    /// Take the oldest idle sandbox out of the tenants' pools, with its share of the budget, to
    /// make room for a start that found none (the caller destroys it before booting).
    pub(crate) fn evict_prepared(
        &self,
    ) -> Option<(Arc<SandboxEntry>, crate::capacity::Reservation)> {
        let mut map = lock(&self.tenant_pools.map);
        let (tenant, at) = map
            .iter()
            .filter_map(|(t, p)| p.oldest_idle().map(|(i, since)| (since, t, i)))
            .min()
            .map(|(_, t, i)| (t.clone(), i))?;
        let (sb, reservation) = map.get_mut(&tenant)?.give_up(at)?;
        tracing::info!(tenant = %tenant, sandbox = %sb.id, "evicted an idle tenant-attested sandbox to make room for a start");
        Some((sb, reservation))
    }

    /// For the generic pool's filler, with `have` generic sandboxes pooled: if the pools'
    /// memory has room for one more, reserve it in the budget and count it as booting — under
    /// the tenant pools' lock, as their filler counts, so the two never take the same slot.
    /// `Ok(None)`: the pools' memory is taken.
    pub(crate) fn reserve_generic_slot(
        &self,
        have: usize,
    ) -> Result<Option<crate::capacity::Reservation>, crate::capacity::CapacityError> {
        let map = lock(&self.tenant_pools.map);
        let held = have + self.pool_booting.load(Ordering::SeqCst) + held_by_all(&map);
        if held >= self.pool_slots() {
            return Ok(None);
        }
        let r = self.budget.reserve()?;
        self.pool_booting.fetch_add(1, Ordering::SeqCst);
        Ok(Some(r))
    }

    /// Start preparing sandboxes for every pool below its size (off the request path), within
    /// the pools' memory: one per pool in turn, so that no tenant's pool takes it all.
    pub(crate) fn fill_tenant_pools(self: &Arc<Self>) {
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let mut jobs = Vec::new();
        let mut handovers = Vec::new();
        // Preparations take pooled generic sandboxes first: those are held by the pools
        // already (ones still booting are held too, but cannot be taken yet).
        let slots = self.pool_slots();
        {
            // Counted under the map lock, which the generic pool's filler also holds while it
            // counts and reserves (`reserve_generic_slot`).
            let mut map = lock(&self.tenant_pools.map);
            let pooled = self.pooled_now();
            let mut held = pooled + self.pool_booting.load(Ordering::SeqCst) + held_by_all(&map);
            let mut convertible = pooled;
            let mut tenants: Vec<String> = map
                .iter_mut()
                .filter(|(_, p)| p.retry_at.is_none_or(|t| t <= now))
                .map(|(t, p)| {
                    p.ready.retain(|r| !r.sb.dead.load(Ordering::SeqCst));
                    t.clone()
                })
                .collect();
            // Fair shares of a full budget: a pool that holds two more than a pool short of
            // its size gives up its oldest idle sandbox, whose room goes straight to the
            // poorer pool's preparation (one per fill, so it converges gently).
            if held >= slots && convertible == 0 {
                let needy = tenants
                    .iter()
                    .filter_map(|t| map.get(t).map(|p| (t, p)))
                    .filter(|(_, p)| p.held() < p.config.size)
                    .min_by_key(|(t, p)| (p.held(), (*t).clone()))
                    .map(|(t, p)| (t.clone(), p.held()));
                let rich = map
                    .iter()
                    .filter(|(_, p)| !p.ready.is_empty())
                    .max_by_key(|(t, p)| (p.held(), (*t).clone()))
                    .map(|(t, p)| (t.clone(), p.held()));
                if let (Some((n_t, n)), Some((r_t, c))) = (needy, rich) {
                    if c > n + 1 {
                        let taken = map.get_mut(&r_t).and_then(|pool| {
                            let (at, _) = pool.oldest_idle()?;
                            pool.give_up(at)
                        });
                        if let Some((sb, reservation)) = taken {
                            if let Some(pool) = map.get_mut(&n_t) {
                                tracing::info!(from = %r_t, to = %n_t, sandbox = %sb.id, "a tenant pool gives up a sandbox to a pool short of its fair share of the pools' memory");
                                pool.preparing += 1;
                                handovers.push((
                                    pool.config.clone(),
                                    pool.generation,
                                    Handover(sb, reservation),
                                ));
                            }
                        }
                    }
                }
            }
            tenants.sort_by_key(|t| (map.get(t).map_or(0, Pool::held), t.clone()));
            loop {
                let mut added = false;
                for t in &tenants {
                    let Some(pool) = map.get_mut(t) else { continue };
                    if pool.held() >= pool.config.size {
                        continue;
                    }
                    if convertible > 0 {
                        convertible -= 1;
                    } else if held < slots {
                        held += 1;
                    } else {
                        continue;
                    }
                    pool.preparing += 1;
                    jobs.push((pool.config.clone(), pool.generation));
                    added = true;
                }
                if !added {
                    break;
                }
            }
            for t in &tenants {
                if let Some(pool) = map.get_mut(t) {
                    pool.short_of_memory = pool.config.size.saturating_sub(pool.held());
                }
            }
        }
        for (cfg, generation, handed) in handovers {
            let node = self.clone();
            tokio::spawn(async move { node.prepare_one(cfg, generation, Some(handed)).await });
        }
        for (cfg, generation) in jobs {
            let node = self.clone();
            tokio::spawn(async move { node.prepare_one(cfg, generation, None).await });
        }
    }

    /// Destroy prepared sandboxes that died or whose tokens near expiry, then refill. Runs
    /// every second while the node lives.
    pub(crate) fn spawn_tenant_pool_sweeper(self: &Arc<Self>) {
        let weak: Weak<Node> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(node) = weak.upgrade() else { return };
                if node.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                let now = Instant::now();
                let doomed: Vec<Arc<SandboxEntry>> = {
                    let mut map = lock(&node.tenant_pools.map);
                    let mut d = Vec::new();
                    for pool in map.values_mut() {
                        let (keep, go): (Vec<Ready>, Vec<Ready>) = std::mem::take(&mut pool.ready)
                            .into_iter()
                            .partition(|r| !r.sb.dead.load(Ordering::SeqCst) && r.expires > now);
                        pool.ready = keep;
                        d.extend(go.into_iter().map(|r| r.sb));
                    }
                    d
                };
                for sb in doomed {
                    tracing::info!(sandbox = %sb.id, "tenant-attested sandbox expired or ended; replacing it");
                    node.destroy_entry(&sb).await;
                }
                node.fill_tenant_pools();
            }
        });
    }

    async fn prepare_one(
        self: &Arc<Self>,
        cfg: TenantPoolConfig,
        generation: u64,
        handed: Option<Handover>,
    ) {
        let result = self.prepare_sandbox(&cfg, generation, handed).await;
        let mut map = lock(&self.tenant_pools.map);
        let shutting_down = self.shutting_down.load(Ordering::SeqCst);
        let current = map
            .get_mut(&cfg.tenant)
            .filter(|p| p.generation == generation && !shutting_down);
        let Some(pool) = current else {
            drop(map);
            if let Ok(r) = result {
                // The pool went away or changed meanwhile (or the node is stopping): the
                // sandbox is the tenant's, attested under the old configuration, so it goes.
                let node = self.clone();
                tokio::spawn(async move { node.destroy_entry(&r.sb).await });
            }
            return;
        };
        pool.preparing = pool.preparing.saturating_sub(1);
        match result {
            Ok(r) if pool.ready.len() < pool.config.size => {
                pool.failures = 0;
                pool.retry_at = None;
                pool.last_error = None;
                pool.ready.push(r);
                drop(map);
                self.budget.bump();
            }
            Ok(r) => {
                drop(map);
                let node = self.clone();
                tokio::spawn(async move { node.destroy_entry(&r.sb).await });
            }
            // Counted as short of memory at the next fill (the sweeper's, within a second).
            Err(PrepareError::PoolFull) => {}
            Err(PrepareError::NoRoom(e)) => {
                // Not the broker's fault: try again when the sweeper next looks (every second),
                // without backing off further.
                pool.retry_at = Some(Instant::now() + Duration::from_secs(1));
                pool.last_error = Some(e);
            }
            Err(PrepareError::Failed(e)) => {
                pool.failures = pool.failures.saturating_add(1);
                // 1 s, 2 s, 4 s, ... at most a minute.
                let backoff =
                    Duration::from_secs(1u64 << (pool.failures - 1).min(6)).min(MAX_BACKOFF);
                pool.retry_at = Some(Instant::now() + backoff);
                tracing::warn!(tenant = %cfg.tenant, error = %e, retry_in_s = backoff.as_secs(), "could not prepare a tenant-attested sandbox");
                pool.last_error = Some(e);
            }
        }
    }

    /// Take a generic sandbox (or boot one), bind it to the tenant and have it attest.
    async fn prepare_sandbox(
        self: &Arc<Self>,
        cfg: &TenantPoolConfig,
        generation: u64,
        handed: Option<Handover>,
    ) -> Result<Ready, PrepareError> {
        let sb = if let Some(Handover(victim, reservation)) = handed {
            // Another pool's sandbox gave up its room for this one: gone first, then booted
            // in its place, so neither the node's capacity nor the pools' memory is exceeded.
            self.destroy_entry(&victim).await;
            self.boot(reservation)
                .await
                .map_err(|e| PrepareError::Failed(e.to_string()))?
        } else if let Some(sb) = self.pop_pooled() {
            let node = self.clone();
            tokio::spawn(async move { node.fill_pool().await });
            sb
        } else {
            // Another preparation took the generic sandbox this one was counted on: boot one
            // only if the pools' memory still has room (this preparation counts already).
            if self.generic_pooled() + self.tenant_pooled() > self.pool_slots() {
                return Err(PrepareError::PoolFull);
            }
            let reservation = self
                .budget
                .reserve()
                .map_err(|e| PrepareError::NoRoom(format!("no room on the node: {e}")))?;
            self.boot(reservation)
                .await
                .map_err(|e| PrepareError::Failed(e.to_string()))?
        };
        // Bound to the tenant from here on: whatever happens, it is never generic again.
        *lock(&sb.owner) = Some(crate::logs::Owner::new(&cfg.tenant, "(pool)"));
        *lock(&sb.kbs_url) = Some(cfg.kbs_url.clone());
        let p = veil_proto::Preparation {
            tenant: cfg.tenant.clone(),
            allow_software_tee: cfg.allow_insecure_software_tee,
            software_tee: cfg
                .allow_insecure_software_tee
                .then(|| self.endorse_for(&sb.id, &cfg.tenant, ANY_FUNCTION)),
        };
        match self.send_prepare(&sb, &p).await {
            Ok(reply) => {
                let now = now_secs();
                let lifetime = reply
                    .token_expires_at
                    .map(|exp| Duration::from_secs(exp.saturating_sub(now)))
                    .unwrap_or(Duration::from_secs(300));
                if lifetime < MIN_LIFETIME {
                    self.destroy_entry(&sb).await;
                    return Err(PrepareError::Failed(format!(
                        "the broker's token lasts {}s, too short to keep a sandbox attested",
                        lifetime.as_secs()
                    )));
                }
                let margin = EXPIRY_MARGIN.min(lifetime / 4);
                tracing::info!(tenant = %cfg.tenant, sandbox = %sb.id, attest_ms = reply.attest_ms, "tenant-attested sandbox ready");
                Ok(Ready {
                    sb,
                    since: Instant::now(),
                    expires: Instant::now() + lifetime - margin,
                    margin,
                    generation,
                })
            }
            Err(e) => {
                self.destroy_entry(&sb).await;
                Err(PrepareError::Failed(e))
            }
        }
    }

    async fn send_prepare(
        &self,
        sb: &SandboxEntry,
        p: &veil_proto::Preparation,
    ) -> Result<veil_proto::PrepareReply, String> {
        let body = serde_json::to_vec(p).map_err(|e| e.to_string())?;
        let req = hyper::Request::post(veil_proto::PREPARE_PATH)
            .header(http::header::HOST, "agent")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(
            Duration::from_secs(60),
            sb.mux.request(StreamKind::Control, req),
        )
        .await
        .map_err(|_| "the sandbox did not finish attesting within 60 s".to_string())?
        .map_err(|e| format!("preparation not delivered: {e}"))?;
        let status = resp.status();
        let body = mux::read_body_limited(resp.into_body(), 64 << 10)
            .await
            .map_err(|e| e.to_string())?;
        if status.is_success() {
            serde_json::from_slice(&body).map_err(|e| format!("bad preparation reply: {e}"))
        } else {
            let err: ErrorBody = serde_json::from_slice(&body).unwrap_or(ErrorBody {
                code: status.to_string(),
                message: String::from_utf8_lossy(&body).into_owned(),
            });
            Err(format!("{}: {}", err.code, err.message))
        }
    }
}

/// The room of a sandbox another pool gave up (fair shares): it is destroyed, then the
/// preparation boots with its reservation.
struct Handover(Arc<SandboxEntry>, crate::capacity::Reservation);

/// Why a preparation did not happen.
enum PrepareError {
    /// The node has no room for another sandbox now.
    NoRoom(String),
    /// The pools' memory budget has no room for another sandbox now.
    PoolFull,
    /// Booting, or attesting to the broker, failed.
    Failed(String),
}

/// The function of a software-TEE endorsement for any function of a tenant (what the broker
/// accepts with init data of tenant scope only).
const ANY_FUNCTION: &str = "*";
