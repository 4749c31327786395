//! Blob uploads to the local store: `POST` (start, monolithic with `?digest=`, or a
//! cross-repository mount with `?mount=&from=`), `PATCH` (append), `PUT ?digest=` (finish),
//! `GET` (progress) and `DELETE` (cancel).
//!
//! An upload streams into a temporary file of the store and becomes a blob of its repository
//! only once its digest checks out. Its id works only under the repository it was started in.
//! It may grow to [`LocalStoreConfig::max_blob_bytes`] (beyond: `413 SIZE_INVALID`, and the
//! upload is gone); its bytes count against the local store's bound
//! [`LocalStoreConfig::max_store_bytes`] together with every blob the store holds already
//! (`507` when they would exceed it: local blobs are never evicted, so this is what bounds
//! them), and against the node's cache bound together with upstream blobs (`507` when uploads
//! alone would exceed it). An upload with no activity for [`LocalStoreConfig::upload_expiry`]
//! is abandoned: its file is deleted and its id forgotten.

use super::{parse_digest, reg_error, repo_ok, store_error, RegError};
use crate::Gateway;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use veil_image::Digest;
use veil_node::cache::UploadReservation;
use veil_node::store::Member;
use veil_node::NodeError;

/// Limits of the local store's uploads (part of [`crate::GatewayConfig`]).
#[derive(Debug, Clone)]
pub struct LocalStoreConfig {
    /// Largest blob an upload may produce, in bytes. Default 2 GiB: larger than the layers of
    /// ordinary function images by far, small enough that one client cannot fill the disk
    /// with a single upload.
    pub max_blob_bytes: u64,
    /// An upload with no request for this long is abandoned (file deleted, id forgotten); a
    /// request body that sends nothing for this long ends the same way. Default 10 minutes.
    pub upload_expiry: Duration,
    /// Most bytes the local store may hold: the blobs and manifests of all its repositories
    /// (each counted once) plus the uploads in progress. A push that would exceed it is
    /// refused with `507` and stores nothing. Local-store blobs are never evicted, so this is
    /// their only bound. Default 20 GiB.
    pub max_store_bytes: u64,
}

impl Default for LocalStoreConfig {
    fn default() -> Self {
        Self {
            max_blob_bytes: 2 << 30,
            upload_expiry: Duration::from_secs(600),
            max_store_bytes: 20 << 30,
        }
    }
}

/// Uploads in progress: id → upload.
#[derive(Default)]
pub struct Uploads {
    map: Mutex<HashMap<String, Upload>>,
    /// Whether the task that expires abandoned uploads runs.
    sweeper: std::sync::OnceLock<()>,
}

struct Upload {
    repository: String,
    path: PathBuf,
    /// `None` while a request works on the upload.
    reservation: Option<UploadReservation>,
    last_active: Instant,
}

/// Why an upload cannot be used.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// No such upload (never started, finished, expired, or started in another repository).
    Unknown,
    /// Another request is working on it.
    Busy,
}

impl Refused {
    fn into_error(self, id: &str) -> RegError {
        match self {
            Refused::Unknown => reg_error(
                StatusCode::NOT_FOUND,
                "BLOB_UPLOAD_UNKNOWN",
                format!("no upload {id} in this repository (finished, expired or never started)"),
            ),
            Refused::Busy => reg_error(
                StatusCode::CONFLICT,
                "BLOB_UPLOAD_INVALID",
                format!("upload {id} is in use by another request"),
            ),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an upload's file");
        }
    }
}

impl Uploads {
    /// Register a new upload of `repository` whose bytes go to `path`.
    fn start(
        &self,
        repository: &str,
        path: PathBuf,
        reservation: UploadReservation,
        now: Instant,
    ) -> String {
        let id = format!("{:032x}", rand::random::<u128>());
        lock(&self.map).insert(
            id.clone(),
            Upload {
                repository: repository.to_string(),
                path,
                reservation: Some(reservation),
                last_active: now,
            },
        );
        id
    }

    /// Take upload `id` of `repository` for one request. An expired upload is removed here
    /// even if the sweeper has not run yet.
    fn checkout(
        &self,
        id: &str,
        repository: &str,
        expiry: Duration,
        now: Instant,
    ) -> Result<Active<'_>, Refused> {
        let mut map = lock(&self.map);
        let up = map.get_mut(id).ok_or(Refused::Unknown)?;
        if up.repository != repository {
            return Err(Refused::Unknown);
        }
        if up.reservation.is_some() && now.saturating_duration_since(up.last_active) >= expiry {
            if let Some(up) = map.remove(id) {
                remove_file(&up.path);
            }
            return Err(Refused::Unknown);
        }
        let reservation = up.reservation.take().ok_or(Refused::Busy)?;
        Ok(Active {
            uploads: self,
            id: id.to_string(),
            path: up.path.clone(),
            reservation: Some(reservation),
        })
    }

    /// Remove uploads idle for `expiry` or longer at `now`, deleting their files. Uploads a
    /// request is working on are left alone (their requests end by the same expiry when they
    /// stall). Returns how many were removed.
    fn sweep(&self, expiry: Duration, now: Instant) -> usize {
        let expired: Vec<Upload> = {
            let mut map = lock(&self.map);
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, u)| {
                    u.reservation.is_some()
                        && now.saturating_duration_since(u.last_active) >= expiry
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for up in &expired {
            remove_file(&up.path);
            tracing::info!(repository = %up.repository, "abandoned upload expired");
        }
        expired.len()
    }

    /// Forget upload `id` of `repository` and delete its file.
    fn cancel(&self, id: &str, repository: &str) -> Result<(), Refused> {
        let mut map = lock(&self.map);
        match map.get(id) {
            Some(u) if u.repository == repository && u.reservation.is_some() => {
                if let Some(up) = map.remove(id) {
                    remove_file(&up.path);
                }
                Ok(())
            }
            Some(u) if u.repository == repository => Err(Refused::Busy),
            _ => Err(Refused::Unknown),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

/// An upload taken by one request. Unless handed back with [`Active::checkin`] or finished
/// with [`Active::finish`], dropping it (an error, a client gone mid-request) removes the
/// upload and deletes its file: a partial write is never resumed.
struct Active<'a> {
    uploads: &'a Uploads,
    id: String,
    path: PathBuf,
    reservation: Option<UploadReservation>,
}

impl Active<'_> {
    fn size(&self) -> u64 {
        self.reservation.as_ref().map_or(0, UploadReservation::used)
    }

    /// Hand the upload back for later requests; activity counts from `now`.
    fn checkin(mut self, now: Instant) {
        let mut map = lock(&self.uploads.map);
        if let Some(up) = map.get_mut(&self.id) {
            up.reservation = self.reservation.take();
            up.last_active = now;
        }
    }

    /// End the upload: its file and reservation go to the caller.
    fn finish(mut self) -> (PathBuf, Option<UploadReservation>) {
        lock(&self.uploads.map).remove(&self.id);
        let r = self.reservation.take();
        self.id.clear();
        (std::mem::take(&mut self.path), r)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if self.reservation.is_some() {
            lock(&self.uploads.map).remove(&self.id);
            remove_file(&self.path);
        }
    }
}

/// Expire abandoned uploads periodically (a quarter of the expiry, between 1 s and 60 s)
/// until the gateway is gone. Started on the first upload.
fn spawn_upload_sweeper(gw: Weak<Gateway>, expiry: Duration) {
    let every = (expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(gw) = gw.upgrade() else {
                return;
            };
            gw.uploads.sweep(expiry, Instant::now());
        }
    });
}

fn config(gw: &Gateway) -> &LocalStoreConfig {
    &gw.config.local_store
}

fn ensure_sweeper(gw: &Arc<Gateway>) {
    gw.uploads.sweeper.get_or_init(|| {
        spawn_upload_sweeper(Arc::downgrade(gw), config(gw).upload_expiry);
    });
}

/// Refuse (`507`) manifest `bytes` for `repo` that the local store has no room for under
/// [`LocalStoreConfig::max_store_bytes`] (manifests are small, so no reservation is taken). A
/// manifest the repository holds already (a new tag for it) adds nothing.
pub(super) fn manifest_room(gw: &Gateway, repo: &str, bytes: &[u8]) -> Result<(), RegError> {
    let store = gw.node.cache().store();
    if store.is_member(repo, Member::Manifest, &Digest::sha256(bytes)) {
        return Ok(());
    }
    let limit = config(gw).max_store_bytes;
    let stored = store.local_bytes();
    let needed = bytes.len() as u64;
    if stored.saturating_add(needed) > limit {
        return Err(store_error(&NodeError::LocalStoreFull {
            needed,
            stored,
            limit,
        }));
    }
    Ok(())
}

fn too_large(max: u64) -> RegError {
    reg_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "SIZE_INVALID",
        format!("the blob would be larger than the limit of {max} bytes; the upload was discarded"),
    )
}

/// Append a request body to the upload's file, within the blob size limit and the store's
/// bound. On an error the caller drops the upload (and its partial file).
async fn append(
    gw: &Gateway,
    path: &Path,
    reservation: &mut UploadReservation,
    req: Request<Body>,
) -> Result<(), RegError> {
    let max = config(gw).max_blob_bytes;
    let idle = config(gw).upload_expiry;
    let announced = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| reservation.used().saturating_add(n) > max) {
        return Err(too_large(max));
    }
    let internal = |e: std::io::Error| {
        reg_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            format!("writing the upload: {e}"),
        )
    };
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(internal)?;
    let mut stream = req.into_body().into_data_stream();
    loop {
        let chunk = match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(c)) => c.map_err(|e| {
                reg_error(
                    StatusCode::BAD_REQUEST,
                    "BLOB_UPLOAD_INVALID",
                    e.to_string(),
                )
            })?,
            Ok(None) => break,
            Err(_) => {
                return Err(reg_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "BLOB_UPLOAD_INVALID",
                    format!("the request body sent nothing for {idle:?}; the upload was discarded"),
                ))
            }
        };
        let n = chunk.len() as u64;
        if reservation.used().saturating_add(n) > max {
            return Err(too_large(max));
        }
        gw.node
            .cache()
            .grow_upload(reservation, n, config(gw).max_store_bytes)
            .map_err(|e| store_error(&e))?;
        f.write_all(&chunk).await.map_err(internal)?;
    }
    f.flush().await.map_err(internal)?;
    Ok(())
}

/// Verify the finished upload at `path` and publish it as a blob of `repo`.
async fn commit(
    gw: &Gateway,
    repo: &str,
    path: PathBuf,
    d: &Digest,
    reservation: Option<UploadReservation>,
) -> Result<Response, RegError> {
    let store = gw.node.cache().store().clone();
    let (d2, repo2) = (d.clone(), repo.to_string());
    let res = tokio::task::spawn_blocking(move || store.import_file(&path, &d2, &repo2))
        .await
        .map_err(|e| reg_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))?;
    drop(reservation);
    res.map_err(|e| match e {
        NodeError::DigestMismatch { .. } => reg_error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("{e}; the upload was discarded"),
        ),
        other => store_error(&other),
    })?;
    tracing::info!(repository = repo, digest = %d, "blob pushed to the local store");
    Ok(blob_created(repo, d))
}

fn blob_created(repo: &str, d: &Digest) -> Response {
    let mut resp = StatusCode::CREATED.into_response();
    if let Ok(v) = HeaderValue::from_str(d.as_str()) {
        resp.headers_mut().insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{repo}/blobs/{d}")) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

fn in_progress(status: StatusCode, repo: &str, id: &str, size: u64) -> Response {
    let mut resp = status.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{repo}/blobs/uploads/{id}")) {
        h.insert(http::header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("0-{}", size.saturating_sub(1))) {
        h.insert("range", v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("docker-upload-uuid", v);
    }
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(0));
    resp
}

/// `POST /v2/<repo>/blobs/uploads/`.
pub(super) async fn start(
    gw: &Arc<Gateway>,
    repo: &str,
    q: &HashMap<String, String>,
    req: Request<Body>,
) -> Result<Response, RegError> {
    repo_ok(repo)?;
    ensure_sweeper(gw);
    let store = gw.node.cache().store();
    if let (Some(mount), Some(from)) = (q.get("mount"), q.get("from")) {
        // A mount succeeds only from a repository that holds the blob; otherwise the client
        // gets an ordinary upload session (as the distribution spec says) and must send the
        // bytes.
        let d = parse_digest(mount)?;
        repo_ok(from)?;
        if store.mount(repo, from, &d).map_err(|e| store_error(&e))? {
            tracing::info!(repository = repo, from = %from, digest = %d, "blob mounted");
            return Ok(blob_created(repo, &d));
        }
    }
    let path = store.temp_path();
    let mut reservation = gw.node.cache().reserve_upload();
    if let Some(d) = q.get("digest") {
        // Monolithic upload in one POST: the bytes must come with it and hash to the digest,
        // whether or not the store already has that blob.
        let d = parse_digest(d)?;
        let written = append(gw, &path, &mut reservation, req).await;
        if let Err(e) = written {
            remove_file(&path);
            return Err(e);
        }
        return commit(gw, repo, path, &d, Some(reservation)).await;
    }
    tokio::fs::File::create(&path)
        .await
        .map_err(|e| reg_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))?;
    let id = gw.uploads.start(repo, path, reservation, Instant::now());
    Ok(in_progress(StatusCode::ACCEPTED, repo, &id, 0))
}

fn checkout<'a>(gw: &'a Gateway, repo: &str, id: &str) -> Result<Active<'a>, RegError> {
    repo_ok(repo)?;
    gw.uploads
        .checkout(id, repo, config(gw).upload_expiry, Instant::now())
        .map_err(|r| r.into_error(id))
}

/// `GET /v2/<repo>/blobs/uploads/<id>`: how much has arrived.
pub(super) fn status(gw: &Gateway, repo: &str, id: &str) -> Result<Response, RegError> {
    let up = checkout(gw, repo, id)?;
    let size = up.size();
    up.checkin(Instant::now());
    Ok(in_progress(StatusCode::NO_CONTENT, repo, id, size))
}

/// The start offset of a `Content-Range: <start>-<end>` header, if any.
fn range_start(req: &Request<Body>) -> Result<Option<u64>, RegError> {
    let Some(v) = req.headers().get(http::header::CONTENT_RANGE) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .map(|s| {
            s.trim()
                .trim_start_matches("bytes")
                .trim_start_matches([' ', '='])
        })
        .and_then(|s| s.split('-').next())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            reg_error(
                StatusCode::BAD_REQUEST,
                "BLOB_UPLOAD_INVALID",
                "malformed Content-Range",
            )
        })
}

/// `PATCH /v2/<repo>/blobs/uploads/<id>`: append a chunk.
pub(super) async fn patch(
    gw: &Gateway,
    repo: &str,
    id: &str,
    req: Request<Body>,
) -> Result<Response, RegError> {
    let mut up = checkout(gw, repo, id)?;
    if let Some(start) = range_start(&req)? {
        if start != up.size() {
            let size = up.size();
            up.checkin(Instant::now());
            let mut r = reg_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UPLOAD_INVALID",
                format!("the chunk starts at byte {start}, the upload has {size} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("0-{}", size.saturating_sub(1))) {
                r.headers_mut().insert("range", v);
            }
            return Ok(r);
        }
    }
    let path = up.path.clone();
    let Some(reservation) = up.reservation.as_mut() else {
        return Err(Refused::Busy.into_error(id));
    };
    // On an error `up` is dropped: the upload and its partial file are gone.
    append(gw, &path, reservation, req).await?;
    let size = up.size();
    up.checkin(Instant::now());
    Ok(in_progress(StatusCode::ACCEPTED, repo, id, size))
}

/// `PUT /v2/<repo>/blobs/uploads/<id>?digest=<digest>`: the last chunk (if any) and commit.
pub(super) async fn finish(
    gw: &Gateway,
    repo: &str,
    id: &str,
    digest: Option<&String>,
    req: Request<Body>,
) -> Result<Response, RegError> {
    let mut up = checkout(gw, repo, id)?;
    let d = match digest.map(|d| parse_digest(d)) {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            up.checkin(Instant::now());
            return Err(e);
        }
        None => {
            up.checkin(Instant::now());
            return Err(reg_error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "the digest query parameter is required",
            ));
        }
    };
    let path = up.path.clone();
    let Some(reservation) = up.reservation.as_mut() else {
        return Err(Refused::Busy.into_error(id));
    };
    append(gw, &path, reservation, req).await?;
    let (path, reservation) = up.finish();
    commit(gw, repo, path, &d, reservation).await
}

/// `DELETE /v2/<repo>/blobs/uploads/<id>`: cancel.
pub(super) fn cancel(gw: &Gateway, repo: &str, id: &str) -> Result<Response, RegError> {
    repo_ok(repo)?;
    gw.uploads.cancel(id, repo).map_err(|r| r.into_error(id))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_node::cache::BlobCache;
    use veil_node::ErrorKind;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<veil_node::store::BlobStore>,
        cache: BlobCache,
        uploads: Uploads,
    }

    fn fixture(limit: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(veil_node::store::BlobStore::open(dir.path()).unwrap());
        let client =
            veil_registry::RegistryClient::new(veil_registry::RegistryConfig::default()).unwrap();
        let cache = BlobCache::new(store.clone(), client, limit);
        Fixture {
            _dir: dir,
            store,
            cache,
            uploads: Uploads::default(),
        }
    }

    const EXPIRY: Duration = Duration::from_secs(600);

    fn begin(f: &Fixture, repo: &str, t: Instant) -> (String, PathBuf) {
        let path = f.store.temp_path();
        std::fs::write(&path, b"partial").unwrap();
        let id = f
            .uploads
            .start(repo, path.clone(), f.cache.reserve_upload(), t);
        (id, path)
    }

    #[test]
    fn abandoned_uploads_expire_and_their_ids_become_unknown() {
        let f = fixture(1 << 30);
        let t0 = Instant::now();
        let (idle, idle_path) = begin(&f, "app", t0);
        let (busy, busy_path) = begin(&f, "app", t0);
        // Activity at t0 + 9 min keeps `busy` alive past t0 + 10 min.
        f.uploads
            .checkout(&busy, "app", EXPIRY, t0 + Duration::from_secs(540))
            .unwrap()
            .checkin(t0 + Duration::from_secs(540));
        assert_eq!(f.uploads.sweep(EXPIRY, t0 + Duration::from_secs(599)), 0);
        assert_eq!(f.uploads.sweep(EXPIRY, t0 + Duration::from_secs(600)), 1);
        assert!(
            !idle_path.exists(),
            "the abandoned upload's file is deleted"
        );
        assert_eq!(
            f.uploads
                .checkout(&idle, "app", EXPIRY, t0 + Duration::from_secs(601))
                .err(),
            Some(Refused::Unknown)
        );
        assert!(busy_path.exists());
        // Expired on use too, before any sweep.
        assert_eq!(
            f.uploads
                .checkout(&busy, "app", EXPIRY, t0 + Duration::from_secs(1140))
                .err(),
            Some(Refused::Unknown)
        );
        assert!(!busy_path.exists());
        assert_eq!(f.uploads.len(), 0);
    }

    #[test]
    fn an_upload_id_belongs_to_its_repository() {
        let f = fixture(1 << 30);
        let t0 = Instant::now();
        let (id, path) = begin(&f, "team/app", t0);
        assert_eq!(
            f.uploads.checkout(&id, "other", EXPIRY, t0).err(),
            Some(Refused::Unknown)
        );
        assert_eq!(f.uploads.cancel(&id, "other"), Err(Refused::Unknown));
        assert!(
            path.exists(),
            "another repository's request changed nothing"
        );
        let up = f.uploads.checkout(&id, "team/app", EXPIRY, t0).unwrap();
        assert_eq!(
            f.uploads.checkout(&id, "team/app", EXPIRY, t0).err(),
            Some(Refused::Busy)
        );
        // A request that fails (or a client that goes away) drops the upload.
        drop(up);
        assert!(!path.exists());
        assert_eq!(
            f.uploads.checkout(&id, "team/app", EXPIRY, t0).err(),
            Some(Refused::Unknown)
        );
    }

    #[test]
    fn uploads_in_progress_count_against_the_store_bound() {
        let f = fixture(20 << 20);
        let mut a = f.cache.reserve_upload();
        f.cache.grow_upload(&mut a, 12 << 20, u64::MAX).unwrap();
        assert!(f.cache.uploading_bytes() >= 12 << 20);
        let mut b = f.cache.reserve_upload();
        let e = f.cache.grow_upload(&mut b, 12 << 20, u64::MAX).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::StoreFull, "{e}");
        assert_eq!(b.used(), 0);
        f.cache.grow_upload(&mut b, 4 << 20, u64::MAX).unwrap();
        drop(a);
        assert!(f.cache.uploading_bytes() <= 8 << 20);
        f.cache.grow_upload(&mut b, 12 << 20, u64::MAX).unwrap();
        drop(b);
        assert_eq!(f.cache.uploading_bytes(), 0, "reservations are given back");
    }

    /// The local store's bound counts the blobs it holds and what uploads in progress wrote;
    /// a refused write changes nothing, and a finished or abandoned upload gives its share
    /// back.
    #[test]
    fn the_local_store_bound_counts_stored_blobs_and_uploads_in_progress() {
        let f = fixture(1 << 30);
        let limit = 1000;
        let p = f.store.temp_path();
        std::fs::write(&p, [1u8; 600]).unwrap();
        f.store
            .import_file(&p, &Digest::sha256(&[1u8; 600]), "app")
            .unwrap();
        let mut a = f.cache.reserve_upload();
        f.cache.grow_upload(&mut a, 300, limit).unwrap();
        let mut b = f.cache.reserve_upload();
        let e = f.cache.grow_upload(&mut b, 101, limit).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::StoreFull, "{e}");
        assert!(e.to_string().contains("local image store is full"), "{e}");
        assert_eq!(b.used(), 0);
        f.cache.grow_upload(&mut b, 100, limit).unwrap();
        let e = f.cache.grow_upload(&mut a, 1, limit).unwrap_err();
        assert_eq!(a.used(), 300, "{e}");
        drop(a);
        f.cache.grow_upload(&mut b, 300, limit).unwrap();
        drop(b);
        let mut c = f.cache.reserve_upload();
        f.cache.grow_upload(&mut c, 400, limit).unwrap();
    }

    #[test]
    fn uploads_evict_upstream_blobs_to_make_room() {
        let f = fixture(20 << 20);
        let cached = f.store.put(&vec![7u8; 10 << 20], None).unwrap();
        f.store.mark_cached(&cached);
        let mut a = f.cache.reserve_upload();
        f.cache.grow_upload(&mut a, 15 << 20, u64::MAX).unwrap();
        assert!(
            !f.store.contains(&cached),
            "the upstream blob was not evicted"
        );
    }
}
