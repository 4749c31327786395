//! The node's blob cache: blobs as the registry serves them (ciphertext for encrypted layers),
//! fetched from upstream on a miss, verified before they become visible, and fetched once per
//! source no matter how many sandboxes ask at the same time.
//!
//! The blob directory is shared by every tenant, so a digest proves nothing: a blob counts as
//! present for an upstream image only if it was downloaded from that image's source (registry
//! host and repository) and verified there — otherwise it is fetched from that source, even
//! if the same bytes are stored already (a registry cannot produce bytes it does not have).
//! For an image of the local store, a blob is present only if it is a member of the image's
//! repository. Manifests, configs, layers and signatures alike.

mod fetch;

use crate::store::{BlobStore, Member, Source};
use crate::NodeError;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use veil_image::manifest::{self, Manifest};
use veil_image::{Digest, Reference};
use veil_registry::RegistryClient;

type Flight = Shared<BoxFuture<'static, Result<(), Arc<NodeError>>>>;

/// The registry name of the node's own store in a [`ResolvedImage`].
const LOCAL: &str = "local";

/// What a deployment pins: the image as written, where it lives and the manifest digest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedImage {
    /// The reference as the user gave it.
    pub reference: String,
    /// Registry host, or `local` for the node's own store.
    pub registry: String,
    /// Repository within the registry.
    pub repository: String,
    /// Digest of the (platform) image manifest.
    pub manifest_digest: String,
    /// Digests of the cosign/sigstore signature manifests found for that digest at deploy time
    /// (cached with the image; the agent checks them against the tenant's policy).
    #[serde(default)]
    pub signatures: Vec<String>,
    /// The index the reference resolved to, for multi-platform images (signatures may sign
    /// the index instead of the platform manifest).
    #[serde(default)]
    pub index_digest: Option<String>,
}

impl ResolvedImage {
    /// The pinned manifest digest.
    fn manifest(&self) -> Result<Digest, NodeError> {
        self.manifest_digest
            .parse()
            .map_err(|e: veil_image::Error| NodeError::Image(format!("{}: {e}", self.reference)))
    }

    /// `d` in the image's repository, as the registry client names it.
    fn origin(&self, d: &Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(d.clone()),
        }
    }

    /// Where the image's blobs come from (an upstream registry's repository).
    pub fn source(&self) -> Source {
        Source {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
        }
    }

    /// Whether the image names `d` as a manifest (its manifest, index or a signature
    /// manifest), fetched from the `manifests` endpoint rather than `blobs`.
    fn is_manifest(&self, d: &Digest) -> bool {
        let is = |s: &str| s == d.as_str();
        is(&self.manifest_digest)
            || self.index_digest.as_deref().is_some_and(is)
            || self.signatures.iter().any(|s| is(s))
    }
}

/// Upstream-backed, single-flight blob cache over a [`BlobStore`].
pub struct BlobCache {
    store: Arc<BlobStore>,
    client: RegistryClient,
    /// Fetches in progress, one per (source, digest).
    inflight: Mutex<HashMap<(Source, Digest), Flight>>,
    upstream_fetches: std::sync::atomic::AtomicU64,
    /// Bytes of upstream blobs kept before least-recently-used ones are evicted.
    limit: u64,
    /// Blobs that must not be evicted now (those of images assigned to live sandboxes).
    in_use: Mutex<Option<InUse>>,
    /// Blobs held by cold starts in progress (count per digest).
    held: Arc<Mutex<HashMap<Digest, usize>>>,
    /// Bytes reserved by uploads in progress to the local store (they count against `limit`).
    uploading: Arc<AtomicU64>,
    /// Bytes written by uploads in progress (they count against the local store's bound).
    writing: Arc<AtomicU64>,
}

/// Space an upload in progress holds against the cache's size bound and the local store's
/// (see [`BlobCache::grow_upload`]); given back when dropped (the upload finished or was
/// abandoned).
#[derive(Debug)]
pub struct UploadReservation {
    uploading: Arc<AtomicU64>,
    writing: Arc<AtomicU64>,
    reserved: u64,
    used: u64,
}

impl UploadReservation {
    /// Bytes the upload has written so far.
    pub fn used(&self) -> u64 {
        self.used
    }
}

impl Drop for UploadReservation {
    fn drop(&mut self) {
        self.uploading.fetch_sub(self.reserved, Ordering::SeqCst);
        self.writing.fetch_sub(self.used, Ordering::SeqCst);
    }
}

/// Uploads reserve space in steps of this size (each step may evict upstream blobs).
const UPLOAD_STEP: u64 = 8 << 20;

/// Keeps blobs from eviction while it lives (see [`BlobCache::hold`]).
pub struct Hold {
    held: Arc<Mutex<HashMap<Digest, usize>>>,
    digests: Vec<Digest>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut m = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for d in &self.digests {
            if let Some(n) = m.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    m.remove(d);
                }
            }
        }
    }
}

type InUse = Arc<dyn Fn(&Digest) -> bool + Send + Sync>;

impl BlobCache {
    /// A cache over `store` that fetches misses with `client`.
    pub fn new(store: Arc<BlobStore>, client: RegistryClient, limit: u64) -> Self {
        Self {
            limit,
            in_use: Mutex::new(None),
            held: Arc::new(Mutex::new(HashMap::new())),
            store,
            client,
            inflight: Mutex::new(HashMap::new()),
            upstream_fetches: Default::default(),
            uploading: Arc::new(AtomicU64::new(0)),
            writing: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A reservation for a new upload to the local store, holding nothing yet.
    pub fn reserve_upload(&self) -> UploadReservation {
        UploadReservation {
            uploading: self.uploading.clone(),
            writing: self.writing.clone(),
            reserved: 0,
            used: 0,
        }
    }

    /// Account `n` more bytes of the upload holding `r`, within two bounds:
    ///
    /// - the local store's, `store_limit`: the blobs it holds (never evicted) plus what
    ///   uploads in progress have written may not exceed it, else
    ///   [`NodeError::LocalStoreFull`];
    /// - the cache's: uploads in progress and upstream blobs share it; room is made by
    ///   evicting least recently used upstream blobs, and if uploads in progress alone would
    ///   exceed it, [`NodeError::StoreFull`].
    ///
    /// On an error the reservation is unchanged (the caller drops the upload).
    pub fn grow_upload(
        &self,
        r: &mut UploadReservation,
        n: u64,
        store_limit: u64,
    ) -> Result<(), NodeError> {
        let stored = self.store.local_bytes();
        self.writing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                w.checked_add(n)
                    .filter(|t| t.saturating_add(stored) <= store_limit)
            })
            .map_err(|w| NodeError::LocalStoreFull {
                needed: n,
                stored: stored.saturating_add(w),
                limit: store_limit,
            })?;
        if let Err(e) = self.reserve(r, n) {
            self.writing.fetch_sub(n, Ordering::SeqCst);
            return Err(e);
        }
        Ok(())
    }

    /// The cache's share of [`BlobCache::grow_upload`].
    fn reserve(&self, r: &mut UploadReservation, n: u64) -> Result<(), NodeError> {
        let used = r.used.saturating_add(n);
        if used > r.reserved {
            let need = used - r.reserved;
            let limit = self.limit;
            let take = |amount: u64| {
                self.uploading
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                        cur.checked_add(amount).filter(|t| *t <= limit)
                    })
                    .map(|_| amount)
            };
            // A whole step if it fits, else just what this write needs.
            let got = take(need.max(UPLOAD_STEP))
                .or_else(|_| take(need))
                .map_err(|_| NodeError::StoreFull {
                    needed: need,
                    limit,
                })?;
            r.reserved += got;
            self.evict();
        }
        r.used = used;
        Ok(())
    }

    /// Bytes reserved by uploads in progress.
    pub fn uploading_bytes(&self) -> u64 {
        self.uploading.load(Ordering::SeqCst)
    }

    /// Tell the cache which blobs are in use (never evicted).
    pub fn set_in_use(&self, f: InUse) {
        *self.in_use.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Keep `digests` from eviction until the returned guard is dropped (a cold start holds
    /// its image's blobs until the sandbox is assigned and they count as in use).
    pub fn hold(&self, digests: &[Digest]) -> Hold {
        let mut m = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for d in digests {
            *m.entry(d.clone()).or_default() += 1;
        }
        Hold {
            held: self.held.clone(),
            digests: digests.to_vec(),
        }
    }

    fn evict(&self) {
        let in_use = self
            .in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let held: Vec<Digest> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let inflight: Vec<Digest> = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|(_, d)| d.clone())
            .collect();
        // Uploads in progress take their share of the bound first.
        let limit = self
            .limit
            .saturating_sub(self.uploading.load(Ordering::SeqCst));
        let evicted = self.store.evict(limit, |d| {
            inflight.contains(d) || held.contains(d) || in_use.as_ref().is_some_and(|f| f(d))
        });
        if !evicted.is_empty() {
            tracing::info!(
                count = evicted.len(),
                limit,
                "evicted least recently used blobs"
            );
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    /// How many blobs were fetched from upstream registries so far.
    pub fn upstream_fetches(&self) -> u64 {
        self.upstream_fetches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolve an image reference to a platform manifest digest and cache the manifest.
    pub async fn resolve(&self, image: &str) -> Result<ResolvedImage, NodeError> {
        let r: Reference = image
            .parse()
            .map_err(|e: veil_image::Error| NodeError::BadReference(format!("{image}: {e}")))?;
        let (digest, index) = if r.is_local() {
            let top = match &r.digest {
                Some(d) => d.clone(),
                None => {
                    let tag = r.tag.clone().unwrap_or_else(|| "latest".into());
                    self.store.get_tag(&r.repository, &tag)?.ok_or_else(|| {
                        NodeError::ImageNotFound(format!(
                            "{image}: no tag {tag:?} for {} in the local image store",
                            r.repository
                        ))
                    })?
                }
            };
            // Only what was pushed to this repository resolves under its name (not blobs of
            // other repositories, nor manifests cached from upstream registries).
            if !self.store.is_member(&r.repository, Member::Manifest, &top) {
                return Err(NodeError::ImageNotFound(format!(
                    "{image}: manifest {top} is not in local/{} of the local image store",
                    r.repository
                )));
            }
            let bytes = self.store.read(&top)?;
            match manifest::parse_manifest(&bytes, None)
                .map_err(|e| NodeError::Image(format!("{image}: {e}")))?
            {
                Manifest::Image(_) => (top, None),
                Manifest::Index(entries) => {
                    let d = manifest::select_platform(&entries, "linux", "amd64")
                        .map_err(|e| NodeError::Image(format!("{image}: {e}")))?;
                    (d.digest, Some(top))
                }
            }
        } else {
            let resolved = self
                .client
                .resolve_image_full(&r)
                .await
                .map_err(|e| NodeError::upstream(image, e))?;
            // Fetched from this source and verified (the client hashes what it reads).
            let source = Source {
                registry: r.registry.clone(),
                repository: r.repository.clone(),
            };
            let m = resolved.manifest;
            self.store.put(&m.bytes, Some(&m.digest))?;
            self.store.record_source(&source, &m.digest)?;
            let index = match resolved.index {
                Some(ix) => {
                    self.store.put(&ix.bytes, Some(&ix.digest))?;
                    self.store.record_source(&source, &ix.digest)?;
                    Some(ix.digest)
                }
                None => None,
            };
            (m.digest, index)
        };
        let mut signatures = self.find_signatures(&r, &digest).await;
        if let Some(ix) = &index {
            signatures.extend(self.find_signatures(&r, ix).await);
        }
        Ok(ResolvedImage {
            reference: image.to_string(),
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            manifest_digest: digest.to_string(),
            signatures,
            index_digest: index.map(|d| d.to_string()),
        })
    }

    /// The signature manifest stored for manifest `d` in `r`'s repository under the sigstore
    /// attachment tag, cached in the store; none if the image is unsigned. A registry error
    /// here is logged and treated as "unsigned": a policy that requires a signature then
    /// refuses the image inside the sandbox, so nothing is accepted by mistake.
    async fn find_signatures(&self, r: &Reference, d: &Digest) -> Vec<String> {
        let tag = veil_image::signature::signature_tag(d);
        if r.is_local() {
            return match self.store.get_tag(&r.repository, &tag) {
                Ok(Some(sd)) if self.store.is_member(&r.repository, Member::Manifest, &sd) => {
                    vec![sd.to_string()]
                }
                _ => Vec::new(),
            };
        }
        let sig_ref = veil_image::signature::signature_reference(r, d);
        let source = Source {
            registry: r.registry.clone(),
            repository: r.repository.clone(),
        };
        match self.client.get_manifest(&sig_ref).await {
            Ok(f) => match self
                .store
                .put(&f.bytes, Some(&f.digest))
                .and_then(|_| self.store.record_source(&source, &f.digest))
            {
                Ok(()) => vec![f.digest.to_string()],
                Err(e) => {
                    tracing::warn!(image = %r, error = %e, "could not cache the signature manifest");
                    Vec::new()
                }
            },
            Err(veil_registry::Error::NotFound { .. }) => Vec::new(),
            Err(e) => {
                tracing::warn!(image = %r, error = %e, "looking up signatures failed; treating the image as unsigned");
                Vec::new()
            }
        }
    }

    /// The blobs (config and layers) a cached image manifest refers to.
    pub fn manifest_blobs(&self, img: &ResolvedImage) -> Result<Vec<(Digest, u64)>, NodeError> {
        let md = img.manifest()?;
        let bytes = self.store.read(&md)?;
        match manifest::parse_manifest(&bytes, None)
            .map_err(|e| NodeError::Image(format!("{}: {e}", img.reference)))?
        {
            Manifest::Image(m) => {
                let mut out = vec![(m.config.digest.clone(), m.config.size)];
                out.extend(m.layers.iter().map(|l| (l.digest.clone(), l.size)));
                // The index (if any), signature manifests and their payload blobs travel with
                // the image.
                if let Some(ix) = img
                    .index_digest
                    .as_deref()
                    .and_then(|d| d.parse::<Digest>().ok())
                {
                    if let Ok(bytes) = self.store.read(&ix) {
                        out.push((ix, bytes.len() as u64));
                    }
                }
                for sd in &img.signatures {
                    let Ok(sd) = sd.parse::<Digest>() else {
                        continue;
                    };
                    let Ok(bytes) = self.store.read(&sd) else {
                        continue;
                    };
                    out.push((sd.clone(), bytes.len() as u64));
                    if let Ok(Manifest::Image(sm)) = manifest::parse_manifest(&bytes, None) {
                        out.extend(
                            veil_image::signature::signature_layers(&sm)
                                .into_iter()
                                .map(|(l, _)| (l.digest, l.size)),
                        );
                    }
                }
                Ok(out)
            }
            Manifest::Index(_) => Err(NodeError::Image(format!(
                "{}: {md} is an index, not an image manifest",
                img.reference
            ))),
        }
    }

    /// Make sure blob (or manifest) `d` of `img` is in the store *for `img`*: for a local
    /// image, a member of its repository; for an upstream image, downloaded from its source
    /// and verified — fetched from there now (once per source, however many ask at a time) if
    /// it was not, whether or not the store holds the same bytes for someone else.
    pub async fn ensure(&self, img: &ResolvedImage, d: &Digest) -> Result<(), NodeError> {
        if img.registry == LOCAL {
            // A local image's blobs were all in its repository when its manifest was pushed,
            // and local blobs are never evicted; a blob of another repository is not its own.
            let member = |m| self.store.is_member(&img.repository, m, d);
            return if member(Member::Blob) || member(Member::Manifest) {
                Ok(())
            } else {
                Err(NodeError::ImageNotFound(format!(
                    "{}: blob {d} is not in local/{} of the local image store",
                    img.reference, img.repository
                )))
            };
        }
        let source = img.source();
        if self.store.has_source(&source, d) {
            self.store.touch(d);
            return Ok(());
        }
        let key = (source, d.clone());
        let flight = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            // A fetch that finished since the check above has removed its entry.
            if self.store.has_source(&key.0, d) {
                return Ok(());
            }
            map.entry(key.clone())
                .or_insert_with(|| {
                    self.upstream_fetches
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let job = fetch::Job {
                        store: self.store.clone(),
                        client: self.client.clone(),
                        origin: img.origin(d),
                        reference: img.reference.clone(),
                        source: key.0.clone(),
                        digest: d.clone(),
                        manifest: img.is_manifest(d),
                    };
                    // The fetch runs on its own task: it completes (and caches the blob) even if
                    // every sandbox that asked for it goes away meanwhile.
                    let task = tokio::spawn(job.run());
                    async move {
                        match task.await {
                            Ok(r) => r.map_err(Arc::new),
                            Err(e) => Err(Arc::new(NodeError::Storage(format!(
                                "blob fetch task failed: {e}"
                            )))),
                        }
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let res = flight.clone().await;
        if res.is_ok() {
            self.evict();
        }
        {
            // Remove the entry only if it is still this flight (a later one may have replaced
            // it after this one failed).
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
                map.remove(&key);
            }
        }
        // Every waiter gets the fetch's own error, kind included.
        res.map_err(NodeError::Shared)
    }
}

#[cfg(test)]
mod tests;
