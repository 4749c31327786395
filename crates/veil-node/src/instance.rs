//! Instances: starting one in the room a [`Claim`] holds (pooled sandbox or budget to boot
//! one, with the image's blobs fetched into the cache meanwhile), the assignment, and the
//! handle the gateway routes requests through.

use crate::cache::ResolvedImage;
use crate::{pool, Claim, Grant, Node, NodeError, SandboxEntry};
use bytes::Bytes;
use http_body_util::Full;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use veil_image::Digest;
use veil_proto::mux;
use veil_proto::{AssignReply, Assignment, ErrorBody, PhaseTimings, StreamKind};

/// Everything needed to start one instance of a function.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Owner of the function.
    pub tenant: String,
    /// Function name.
    pub function: String,
    /// The deployment's pinned image.
    pub image: ResolvedImage,
    /// Extra environment.
    pub env: std::collections::BTreeMap<String, String>,
    /// Port the function listens on.
    pub port: u16,
    /// Concurrency limit per instance.
    pub concurrency: u32,
    /// How long the function may take to listen.
    pub ready_timeout: Duration,
    /// Attestation and secrets, if the function needs any.
    pub attestation: Option<veil_proto::AttestationPlan>,
    /// Base URL of the tenant's key broker (required with `attestation`).
    pub kbs_url: Option<String>,
}

/// Timings of one cold start, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StartTimings {
    /// Sandbox boot (0 when taken from the pool).
    pub boot_ms: f64,
    /// Whether the sandbox came from the pre-booted pool.
    pub pooled: bool,
    /// Which pool it came from: `generic`, `tenant-attested`, or `none` (booted on demand).
    pub pool: String,
    /// Blobs made present in the node cache.
    pub cache_ms: f64,
    /// Phases inside the sandbox.
    pub agent: PhaseTimings,
    /// Total from request to ready.
    pub total_ms: f64,
    /// Where it runs: the backend, and the accelerator for VMs (`microvm/tcg`).
    pub backend: String,
}

impl StartTimings {
    /// The phase names, in the order [`StartTimings::phases`] gives them.
    pub const PHASES: [&'static str; 10] = [
        "total",
        "boot",
        "cache",
        "attest",
        "release",
        "manifest",
        "signature",
        "layers",
        "spawn",
        "ready",
    ];

    /// Every phase with its duration in milliseconds, in the order of [`StartTimings::PHASES`]
    /// (what `veil describe`, the phase histograms and the benchmarks show).
    pub fn phases(&self) -> [(&'static str, f64); 10] {
        let a = &self.agent;
        let ms = [
            self.total_ms,
            self.boot_ms,
            self.cache_ms,
            a.attest_ms,
            a.release_ms,
            a.manifest_ms,
            a.signature_ms,
            a.layers_ms,
            a.spawn_ms,
            a.ready_ms,
        ];
        std::array::from_fn(|i| (Self::PHASES[i], ms[i]))
    }
}

/// A running instance of a function: one assigned sandbox.
pub struct Instance {
    sandbox: Arc<SandboxEntry>,
    node: std::sync::Weak<Node>,
    /// Keeps the agent's invocation substreams alive between requests.
    client: mux::SubstreamPool,
    /// Function name.
    pub function: String,
    /// Cold start timings.
    pub timings: StartTimings,
}

impl Instance {
    /// Sandbox id.
    pub fn id(&self) -> &str {
        &self.sandbox.id
    }

    /// False once the sandbox has ended (the function exited) or was destroyed.
    pub fn is_alive(&self) -> bool {
        !self.sandbox.dead.load(Ordering::SeqCst) && !self.sandbox.mux.is_closed()
    }

    /// Carry one HTTP request to the function.
    pub async fn invoke<B>(
        &self,
        req: hyper::Request<B>,
    ) -> Result<hyper::Response<mux::PooledBody>, NodeError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use http_body_util::BodyExt;
        let req = req.map(|b| b.map_err(Into::into).boxed_unsync());
        self.client
            .request(req)
            .await
            .map_err(|e| NodeError::Channel {
                id: self.sandbox.id.clone(),
                reason: e.to_string(),
            })
    }

    /// Destroy this instance's sandbox.
    pub async fn destroy(&self) {
        match self.node.upgrade() {
            Some(node) => node.destroy_entry(&self.sandbox).await,
            None => {
                let _ = self.sandbox.handle.destroy().await;
            }
        }
    }

    /// Host pids still in this instance's sandbox.
    pub fn pids(&self) -> Vec<u32> {
        self.sandbox.handle.pids()
    }
}

/// Refills the node's pools when dropped (at the end of a start).
struct RefillAfter(std::sync::Weak<Node>);

impl Drop for RefillAfter {
    fn drop(&mut self) {
        let Some(node) = self.0.upgrade() else { return };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        node.fill_tenant_pools();
        tokio::spawn(async move { node.fill_pool().await });
    }
}

impl Node {
    /// Cold-start an instance in the room `claim` holds (a pooled sandbox, or budget to boot
    /// one): make the image's blobs present in the cache, and assign the sandbox to the
    /// function.
    ///
    /// If `cancel` fires first (the function was deleted or redeployed), the sandbox is
    /// destroyed and [`NodeError::Cancelled`] returned.
    pub async fn start_instance(
        self: &Arc<Self>,
        spec: &InstanceSpec,
        claim: Claim,
        cancel: &CancellationToken,
    ) -> Result<Instance, NodeError> {
        let t0 = Instant::now();
        // The pools are refilled when this start is over, whichever way it ends, so that booting
        // and attesting their replacements does not compete with it for the CPU.
        let _refill = RefillAfter(Arc::downgrade(self));
        let mut timings = StartTimings {
            backend: self.backend_label(),
            ..StartTimings::default()
        };
        // The manifest first, as this image's (a manifest of the same digest stored for
        // another image or tenant does not count), then what it names.
        let md: Digest = spec
            .image
            .manifest_digest
            .parse()
            .map_err(|e: veil_image::Error| NodeError::Image(e.to_string()))?;
        self.cache.ensure(&spec.image, &md).await?;
        let blobs = self.cache.manifest_blobs(&spec.image)?;
        let _hold = self
            .cache
            .hold(&blobs.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>());
        // Fetch blobs into the cache in parallel with booting the sandbox.
        let cache = self.cache.clone();
        let image = spec.image.clone();
        let fetch_blobs = blobs.clone();
        let fetch = tokio::spawn(async move {
            let t = Instant::now();
            let all =
                futures::future::join_all(fetch_blobs.iter().map(|(d, _)| cache.ensure(&image, d)))
                    .await;
            all.into_iter()
                .collect::<Result<Vec<()>, _>>()
                .map(|_| t.elapsed())
        });
        let sandbox = match claim.take() {
            Some(pool::Room::Pooled(sb)) => {
                timings.pooled = true;
                timings.pool = "generic".into();
                sb
            }
            Some(pool::Room::TenantAttested(tenant, ready)) => {
                if tenant != spec.tenant {
                    // claim_for hands out only the tenant's own; never cross tenants.
                    self.return_tenant_sandbox(&tenant, ready);
                    return Err(NodeError::Channel {
                        id: "-".into(),
                        reason: format!(
                            "a sandbox of tenant {tenant:?} was claimed for tenant {:?}",
                            spec.tenant
                        ),
                    });
                }
                timings.pooled = true;
                timings.pool = "tenant-attested".into();
                ready.sb
            }
            Some(pool::Room::Fresh(reservation)) => {
                timings.pool = "none".into();
                let t = Instant::now();
                let sb = self.boot(reservation).await?;
                timings.boot_ms = t.elapsed().as_secs_f64() * 1000.0;
                sb
            }
            Some(pool::Room::Evicted(victim, reservation)) => {
                // Another tenant's idle sandbox made room: it is gone before this one boots,
                // so the node never holds more than its capacity.
                timings.pool = "none".into();
                let t = Instant::now();
                self.destroy_entry(&victim).await;
                let sb = self.boot(reservation).await?;
                timings.boot_ms = t.elapsed().as_secs_f64() * 1000.0;
                sb
            }
            None => {
                return Err(NodeError::Channel {
                    id: "-".into(),
                    reason: "the claim was already used".into(),
                })
            }
        };
        let cache_res = fetch
            .await
            .map_err(|e| NodeError::Storage(format!("blob fetch task: {e}")))
            .and_then(|r| r);
        match cache_res {
            Ok(d) => timings.cache_ms = d.as_secs_f64() * 1000.0,
            Err(e) => {
                self.destroy_entry(&sandbox).await;
                return Err(e);
            }
        }
        if cancel.is_cancelled() {
            self.destroy_entry(&sandbox).await;
            return Err(NodeError::Cancelled(spec.function.clone()));
        }
        let mut digests: HashSet<Digest> = blobs.into_iter().map(|(d, _)| d).collect();
        digests.insert(md);
        *sandbox.grant.lock().unwrap_or_else(|p| p.into_inner()) = Some(Grant {
            image: spec.image.clone(),
            digests,
        });
        *crate::lock(&sandbox.owner) = Some(crate::logs::Owner::new(&spec.tenant, &spec.function));
        *sandbox.kbs_url.lock().unwrap_or_else(|p| p.into_inner()) = spec.kbs_url.clone();
        let assignment = Assignment {
            tenant: spec.tenant.clone(),
            function: spec.function.clone(),
            image: spec.image.reference.clone(),
            repository: spec.image.repository.clone(),
            manifest_digest: spec.image.manifest_digest.clone(),
            env: spec.env.clone(),
            port: spec.port,
            concurrency: spec.concurrency,
            ready_timeout_ms: spec.ready_timeout.as_millis() as u64,
            attestation: spec.attestation.clone().map(|mut plan| {
                if plan.allow_software_tee {
                    plan.software_tee = Some(self.endorse_software_tee(&sandbox.id, spec));
                }
                plan
            }),
            signatures: spec.image.signatures.clone(),
            index_digest: spec.image.index_digest.clone(),
        };
        let assigned = tokio::select! {
            r = self.assign(&sandbox, &assignment) => r,
            _ = cancel.cancelled() => Err(NodeError::Cancelled(spec.function.clone())),
        };
        match assigned {
            Ok(reply) => {
                timings.agent = reply.timings;
                timings.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(function = %spec.function, sandbox = %sandbox.id, ?timings, "instance ready");
                Ok(Instance {
                    client: sandbox.mux.pool(StreamKind::Invoke),
                    sandbox,
                    node: Arc::downgrade(self),
                    function: spec.function.clone(),
                    timings,
                })
            }
            Err(e) => {
                tracing::error!(function = %spec.function, sandbox = %sandbox.id, error = %e, "cold start failed");
                self.destroy_entry(&sandbox).await;
                Err(e)
            }
        }
    }

    async fn assign(&self, sb: &SandboxEntry, a: &Assignment) -> Result<AssignReply, NodeError> {
        let chan = |reason: String| NodeError::Channel {
            id: sb.id.clone(),
            reason,
        };
        let body = serde_json::to_vec(a).map_err(|e| chan(e.to_string()))?;
        let req = hyper::Request::post(veil_proto::ASSIGN_PATH)
            .header(http::header::HOST, "agent")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| chan(e.to_string()))?;
        let resp = sb
            .mux
            .request(StreamKind::Control, req)
            .await
            .map_err(|e| chan(format!("assignment not delivered: {e}")))?;
        let status = resp.status();
        let body = mux::read_body_limited(resp.into_body(), 1 << 20)
            .await
            .map_err(|e| chan(format!("reading the assignment reply: {e}")))?;
        if status.is_success() {
            serde_json::from_slice(&body).map_err(|e| chan(format!("bad assignment reply: {e}")))
        } else {
            let err: ErrorBody = serde_json::from_slice(&body).unwrap_or(ErrorBody {
                code: status.to_string(),
                message: String::from_utf8_lossy(&body).into_owned(),
            });
            Err(NodeError::Assign {
                function: a.function.clone(),
                code: err.code,
                message: err.message,
            })
        }
    }

    /// Destroy an instance's sandbox.
    pub async fn destroy(&self, inst: &Instance) {
        self.destroy_entry(&inst.sandbox).await;
    }
}
