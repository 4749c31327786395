//! The pool of generic sandboxes booted ahead of demand, and claims: room for one instance,
//! taken synchronously (a pooled sandbox, or a reservation in the node's budget for booting
//! one) before a cold start begins, so that no start goes past the node's capacity.

use crate::capacity::{CapacityError, CapacityStatus, Reservation};
use crate::{lock, Node, SandboxEntry};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

/// What `GET /v1/node` reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    /// Capacity and what is committed against it.
    pub capacity: CapacityStatus,
    /// Generic sandboxes the pool aims to hold.
    pub pool_size: usize,
    /// Generic sandboxes booted and waiting in the pool.
    pub pooled: usize,
    /// Sandboxes assigned to a function.
    pub assigned: usize,
    /// Tenants' pools of sandboxes attested ahead of demand.
    #[serde(default)]
    pub tenant_pools: Vec<crate::tenant_pool::TenantPoolStatus>,
}

/// Room for one instance on the node, taken by [`Node::claim`] and consumed by
/// [`Node::start_instance`]. Dropped unused, it gives its room back (a pooled sandbox returns
/// to the pool).
pub struct Claim {
    pub(crate) room: Option<Room>,
    node: Weak<Node>,
}

pub(crate) enum Room {
    /// A booted, unassigned sandbox taken from the pool.
    Pooled(Arc<SandboxEntry>),
    /// A sandbox of a tenant's pool, attested to that tenant already.
    TenantAttested(String, crate::tenant_pool::Ready),
    /// The budget for booting a fresh sandbox.
    Fresh(Reservation),
    /// The budget of an idle tenant-attested sandbox evicted to make room: it is destroyed
    /// before a fresh sandbox is booted in its place.
    Evicted(Arc<SandboxEntry>, Reservation),
}

impl Claim {
    pub(crate) fn take(mut self) -> Option<Room> {
        self.room.take()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        match (self.room.take(), self.node.upgrade()) {
            (Some(Room::Pooled(sb)), Some(node)) if !node.shutting_down.load(Ordering::SeqCst) => {
                lock(&node.pool).push(sb);
                node.budget.bump();
            }
            (Some(Room::TenantAttested(tenant, r)), Some(node)) => {
                node.return_tenant_sandbox(&tenant, r)
            }
            // Out of its pool already: destroyed, and only then is its room given back.
            (Some(Room::Evicted(sb, reservation)), Some(node))
                if tokio::runtime::Handle::try_current().is_ok() =>
            {
                tokio::spawn(async move {
                    node.destroy_entry(&sb).await;
                    drop(reservation);
                });
            }
            // No runtime to destroy it on: it keeps its room until the node destroys it.
            (Some(Room::Evicted(sb, reservation)), _) => {
                *lock(&sb.reservation) = Some(reservation);
            }
            _ => {}
        }
    }
}

/// Takes one off a counter when dropped.
struct Uncount<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Fill the pool of `node` after `delay` (a named, boxed future: the pool's own tasks spawn it,
/// and a recursive `async fn` type could not be shown to be `Send`).
pub(crate) fn refill_later(
    node: Weak<Node>,
    delay: std::time::Duration,
) -> futures::future::BoxFuture<'static, ()> {
    use futures::FutureExt;
    async move {
        tokio::time::sleep(delay).await;
        if let Some(node) = node.upgrade() {
            node.fill_pool().await;
        }
    }
    .boxed()
}

impl Node {
    /// Generic sandboxes booted, prepared and waiting in the pool.
    pub async fn pooled(&self) -> usize {
        self.pooled_now()
    }

    /// Room for one instance of `tenant`'s function whose broker is `kbs_url` (and which allows
    /// the software TEE or not): a sandbox of the tenant's pool (attested to it already) if one
    /// is ready and fits, else as [`Node::claim`].
    ///
    /// Only a start for a request waiting on it (`evict`) may evict another tenant's prepared
    /// sandbox; a pre-warm or a min-scale start waits for room like any refill.
    pub fn claim_for(
        self: &Arc<Self>,
        tenant: &str,
        kbs_url: Option<&str>,
        allow_software_tee: bool,
        evict: bool,
    ) -> Result<Claim, CapacityError> {
        if let Some(r) = self.take_tenant_sandbox(tenant, kbs_url, allow_software_tee) {
            return Ok(Claim {
                room: Some(Room::TenantAttested(tenant.to_string(), r)),
                node: Arc::downgrade(self),
            });
        }
        self.claim_room(evict)
    }

    /// Room for one more instance: a pooled sandbox if one is ready, else a reservation of one
    /// sandbox's limits in the node's budget, else the room of the oldest idle sandbox of a
    /// tenant's pool, evicted (demand comes before sandboxes prepared ahead of it; a claim that
    /// could use a tenant's sandbox took it in [`Node::claim_for`]). Fails at once when none
    /// exists; wait on [`Node::capacity_changes`] to try again.
    pub fn claim(self: &Arc<Self>) -> Result<Claim, CapacityError> {
        self.claim_room(true)
    }

    fn claim_room(self: &Arc<Self>, evict: bool) -> Result<Claim, CapacityError> {
        let room = match self.pop_pooled() {
            Some(sb) => Room::Pooled(sb),
            None => match self.budget.reserve() {
                Ok(r) => Room::Fresh(r),
                Err(e) if !evict => return Err(e),
                Err(e) => match self.evict_prepared() {
                    Some((sb, r)) => Room::Evicted(sb, r),
                    None => return Err(e),
                },
            },
        };
        Ok(Claim {
            room: Some(room),
            node: Arc::downgrade(self),
        })
    }

    /// Sandboxes the pools (generic and tenants') may hold together, by their memory budget.
    pub(crate) fn pool_slots(&self) -> usize {
        // Without a pools' memory, the whole capacity: fair shares apply within it too.
        let all = usize::try_from(self.budget.status().max_sandboxes).unwrap_or(usize::MAX);
        match self.config.pool_memory {
            Some(m) => usize::try_from(m / self.config.memory_bytes.max(1))
                .unwrap_or(usize::MAX)
                .min(all),
            None => all,
        }
    }

    /// Generic sandboxes booted and waiting in the pool.
    pub(crate) fn pooled_now(&self) -> usize {
        lock(&self.pool)
            .iter()
            .filter(|sb| !sb.dead.load(Ordering::SeqCst))
            .count()
    }

    /// Generic sandboxes pooled or booting for the pool.
    pub(crate) fn generic_pooled(&self) -> usize {
        self.pooled_now() + self.pool_booting.load(Ordering::SeqCst)
    }

    /// A live sandbox from the generic pool, if one is there.
    pub(crate) fn pop_pooled(&self) -> Option<Arc<SandboxEntry>> {
        let mut pool = lock(&self.pool);
        loop {
            match pool.pop() {
                Some(sb) if sb.dead.load(Ordering::SeqCst) => continue,
                other => return other,
            }
        }
    }

    /// The node's capacity and what is committed against it.
    pub fn capacity(&self) -> CapacityStatus {
        self.budget.status()
    }

    /// Capacity, usage and the pool, for `GET /v1/node`.
    pub fn status(&self) -> NodeStatus {
        let pooled = self.pooled_now();
        let assigned = lock(&self.sandboxes)
            .values()
            .filter(|e| lock(&e.owner).is_some())
            .count();
        NodeStatus {
            capacity: self.budget.status(),
            pool_size: self.config.pool_size,
            pooled,
            assigned,
            tenant_pools: self.tenant_pools(),
        }
    }

    /// Changes whenever room for a claim may have appeared (a sandbox was destroyed, a pooled
    /// one became ready).
    pub fn capacity_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.budget.subscribe()
    }

    /// Boot sandboxes until the generic pool holds `pool_size` of them, as far as the node's
    /// capacity allows.
    pub async fn fill_pool(self: &Arc<Self>) {
        if self.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        self.fill_pool_inner().await;
        self.filling.store(false, Ordering::SeqCst);
    }

    async fn fill_pool_inner(self: &Arc<Self>) {
        loop {
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            let have = {
                let mut pool = lock(&self.pool);
                pool.retain(|sb| !sb.dead.load(Ordering::SeqCst));
                pool.len()
            };
            if have >= self.config.pool_size {
                return;
            }
            // Tenants' pools come first within the pools' memory: they were asked for by name.
            let reservation = match self.reserve_generic_slot(have) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    tracing::debug!(
                        pooled = have,
                        "pool not refilled: the pools' memory is taken"
                    );
                    return;
                }
                Err(e) => {
                    // Assigned sandboxes use the capacity; the pool fills again when they go.
                    tracing::debug!(pooled = have, error = %e, "pool not refilled");
                    return;
                }
            };
            // Counted as booting until pushed to the pool (or dropped), however the boot ends.
            let _booting = Uncount(&self.pool_booting);
            let booted = self.boot(reservation).await;
            match booted {
                Ok(sb) if self.shutting_down.load(Ordering::SeqCst) => {
                    // Booted while the node shut down: it must not outlive the node.
                    self.destroy_entry(&sb).await;
                    return;
                }
                Ok(sb) => {
                    self.pool_failures.store(0, Ordering::SeqCst);
                    lock(&self.pool).push(sb);
                    self.budget.bump();
                }
                // A boot that fails because the node is shutting down under it is expected.
                Err(e) if self.shutting_down.load(Ordering::SeqCst) => {
                    tracing::debug!(error = %e, "pooled sandbox not booted: shutting down");
                    return;
                }
                Err(e) => {
                    // Try again later, backing off, so a pool that lost a sandbox to a failed
                    // boot fills again without waiting for the next cold start.
                    let n = self.pool_failures.fetch_add(1, Ordering::SeqCst).min(5);
                    let backoff = std::time::Duration::from_secs(1 << n);
                    tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "could not boot a pooled sandbox");
                    tokio::spawn(refill_later(Arc::downgrade(self), backoff));
                    return;
                }
            }
        }
    }
}
