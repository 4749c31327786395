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
            _ => {}
        }
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
        lock(&self.pool)
            .iter()
            .filter(|sb| !sb.dead.load(Ordering::SeqCst))
            .count()
    }

    /// Room for one instance of `tenant`'s function whose broker is `kbs_url` (and which allows
    /// the software TEE or not): a sandbox of the tenant's pool (attested to it already) if one
    /// is ready and fits, else as [`Node::claim`].
    pub fn claim_for(
        self: &Arc<Self>,
        tenant: &str,
        kbs_url: Option<&str>,
        allow_software_tee: bool,
    ) -> Result<Claim, CapacityError> {
        if let Some(r) = self.take_tenant_sandbox(tenant, kbs_url, allow_software_tee) {
            return Ok(Claim {
                room: Some(Room::TenantAttested(tenant.to_string(), r)),
                node: Arc::downgrade(self),
            });
        }
        self.claim()
    }

    /// Room for one more instance: a pooled sandbox if one is ready, else a reservation of one
    /// sandbox's limits in the node's budget. Fails at once when neither exists; wait on
    /// [`Node::capacity_changes`] to try again.
    pub fn claim(self: &Arc<Self>) -> Result<Claim, CapacityError> {
        let pooled = self.pop_pooled();
        let room = match pooled {
            Some(sb) => Room::Pooled(sb),
            None => Room::Fresh(self.budget.reserve()?),
        };
        Ok(Claim {
            room: Some(room),
            node: Arc::downgrade(self),
        })
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
        let pooled = lock(&self.pool)
            .iter()
            .filter(|sb| !sb.dead.load(Ordering::SeqCst))
            .count();
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
            let reservation = match self.budget.reserve() {
                Ok(r) => r,
                Err(e) => {
                    // Assigned sandboxes use the capacity; the pool fills again when they go.
                    tracing::debug!(pooled = have, error = %e, "pool not refilled");
                    return;
                }
            };
            match self.boot(reservation).await {
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
