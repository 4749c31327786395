//! Draining: instances taken out of service (their revision was replaced or deleted, or they
//! were scaled down) take no new requests — the caller has already removed them from the
//! runtime that routing picks from — finish the requests they have, and are destroyed, each as
//! soon as it has none. After the drain timeout the rest are destroyed anyway, so a request
//! that never ends cannot keep a sandbox (and its share of the node's capacity) forever.

use super::{lock, Slot};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

struct Draining {
    function: String,
    slot: Arc<Slot>,
}

/// The instances draining, by sandbox id, and how long they may take.
pub(super) struct Drains {
    timeout: Duration,
    set: Arc<Mutex<BTreeMap<String, Draining>>>,
}

impl Drains {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            set: Arc::default(),
        }
    }

    /// Sandbox ids of `function`'s instances still draining.
    pub(super) fn of(&self, function: &str) -> Vec<String> {
        lock(&self.set)
            .iter()
            .filter(|(_, d)| d.function == function)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Instances draining, of all functions.
    pub(super) fn len(&self) -> usize {
        lock(&self.set).len()
    }

    /// Drain `slots` of `function`, which the caller has taken out of routing. `changes` is
    /// the watch their requests' guards bump when a request ends. The task ends once every
    /// slot is destroyed.
    pub(super) fn start(
        &self,
        function: &str,
        revision: u64,
        slots: Vec<Arc<Slot>>,
        changes: &watch::Sender<u64>,
        why: &'static str,
    ) -> tokio::task::JoinHandle<()> {
        // Subscribed before any count is read, so a request ending later always wakes us.
        let rx = changes.subscribe();
        {
            let mut set = lock(&self.set);
            for s in &slots {
                set.insert(
                    s.inst.id().to_string(),
                    Draining {
                        function: function.to_string(),
                        slot: s.clone(),
                    },
                );
            }
        }
        if !slots.is_empty() {
            let inflight: u32 = slots
                .iter()
                .map(|s| s.inflight.load(Ordering::SeqCst))
                .sum();
            tracing::info!(
                function,
                revision,
                why,
                instances = slots.len(),
                inflight,
                "draining instances"
            );
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let set = self.set.clone();
        let function = function.to_string();
        tokio::spawn(drain(set, function, revision, slots, rx, deadline))
    }

    /// Destroy every draining instance now (the gateway is shutting down); their drain tasks
    /// then end on their own.
    pub(super) async fn destroy_all(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.set).values().map(|d| d.slot.clone()).collect();
        futures::future::join_all(slots.iter().map(|s| s.inst.destroy())).await;
    }
}

async fn drain(
    set: Arc<Mutex<BTreeMap<String, Draining>>>,
    function: String,
    revision: u64,
    mut left: Vec<Arc<Slot>>,
    mut rx: watch::Receiver<u64>,
    deadline: tokio::time::Instant,
) {
    let finish = |slots: Vec<Arc<Slot>>| {
        let set = set.clone();
        async move {
            futures::future::join_all(slots.iter().map(|s| s.inst.destroy())).await;
            let mut set = lock(&set);
            for s in &slots {
                set.remove(s.inst.id());
            }
        }
    };
    loop {
        let (done, busy): (Vec<_>, Vec<_>) = left
            .into_iter()
            .partition(|s| s.inflight.load(Ordering::SeqCst) == 0 || !s.inst.is_alive());
        left = busy;
        if !done.is_empty() {
            finish(done).await;
        }
        if left.is_empty() {
            return;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            // Every request guard is gone, so no request is in flight: destroy the rest.
            Ok(Err(_)) => {
                finish(left).await;
                return;
            }
            Err(_) => {
                let inflight: u32 = left.iter().map(|s| s.inflight.load(Ordering::SeqCst)).sum();
                tracing::warn!(
                    %function,
                    revision,
                    instances = left.len(),
                    inflight,
                    "drain timeout: destroying instances with requests still in flight"
                );
                finish(left).await;
                return;
            }
        }
    }
}
