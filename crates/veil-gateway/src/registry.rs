//! The local image store over the OCI distribution API (`/v2/`): `local/<repo>:<tag>` images
//! pushed by `veil image push` (or any client that speaks the API) land in the node's blob
//! store. Pull endpoints serve them back. Uploads stream to a temporary file and become visible
//! only once their digest checks out.

use crate::Gateway;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use veil_image::manifest::{self, Manifest};
use veil_image::{Digest, Reference};

/// Uploads in progress: id → temporary file.
#[derive(Default)]
pub struct Uploads {
    map: Mutex<HashMap<String, std::path::PathBuf>>,
}

const MAX_MANIFEST: usize = 4 << 20;

/// An error in the distribution API's JSON shape (`{"errors":[{"code","message"}]}`).
pub struct RegError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for RegError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(
                serde_json::json!({ "errors": [{ "code": self.code, "message": self.message }] }),
            ),
        )
            .into_response()
    }
}

fn reg_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> RegError {
    RegError {
        status,
        code,
        message: message.into(),
    }
}

/// `GET /v2/`.
pub async fn base() -> Response {
    let mut r = axum::Json(serde_json::json!({})).into_response();
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

enum Route {
    Manifest(String, String),
    Blob(String, String),
    StartUpload(String),
    Upload(String, String),
}

fn parse(rest: &str) -> Option<Route> {
    if let Some((repo, id)) = rest.split_once("/blobs/uploads/") {
        return Some(if id.is_empty() {
            Route::StartUpload(repo.into())
        } else {
            Route::Upload(repo.into(), id.into())
        });
    }
    if let Some(repo) = rest.strip_suffix("/blobs/uploads") {
        return Some(Route::StartUpload(repo.into()));
    }
    if let Some((repo, d)) = rest.rsplit_once("/blobs/") {
        return Some(Route::Blob(repo.into(), d.into()));
    }
    if let Some((repo, r)) = rest.rsplit_once("/manifests/") {
        return Some(Route::Manifest(repo.into(), r.into()));
    }
    None
}

/// Check a repository name the way image references are checked.
fn repo_ok(repo: &str) -> Result<(), RegError> {
    format!("local/{repo}:x")
        .parse::<Reference>()
        .map(|_| ())
        .map_err(|e| reg_error(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string()))
}

/// Everything under `/v2/`.
pub async fn dispatch(
    State(gw): State<Arc<Gateway>>,
    Path(rest): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    req: Request<Body>,
) -> Response {
    let Some(route) = parse(&rest) else {
        return reg_error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            format!("no such endpoint /v2/{rest}"),
        )
        .into_response();
    };
    let method = req.method().clone();
    let res = match (route, &method) {
        (Route::Manifest(repo, r), &Method::GET | &Method::HEAD) => {
            get_manifest(&gw, &repo, &r, method == Method::HEAD)
        }
        (Route::Manifest(repo, r), &Method::PUT) => put_manifest(&gw, &repo, &r, req).await,
        (Route::Blob(repo, d), &Method::GET | &Method::HEAD) => {
            get_blob(&gw, &repo, &d, method == Method::HEAD).await
        }
        (Route::StartUpload(repo), &Method::POST) => {
            start_upload(&gw, &repo, q.get("digest"), req).await
        }
        (Route::Upload(repo, id), &Method::PATCH) => patch_upload(&gw, &repo, &id, req).await,
        (Route::Upload(repo, id), &Method::PUT) => {
            finish_upload(&gw, &repo, &id, q.get("digest"), req).await
        }
        _ => Err(reg_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{method} /v2/{rest} is not supported"),
        )),
    };
    res.unwrap_or_else(IntoResponse::into_response)
}

fn parse_digest(d: &str) -> Result<Digest, RegError> {
    d.parse().map_err(|e: veil_image::Error| {
        reg_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string())
    })
}

fn get_manifest(gw: &Gateway, repo: &str, r: &str, head: bool) -> Result<Response, RegError> {
    repo_ok(repo)?;
    let store = gw.node.cache().store();
    let d = if r.contains(':') {
        parse_digest(r)?
    } else {
        store
            .get_tag(repo, r)
            .map_err(|e| match e {
                veil_node::NodeError::BadReference(m) => {
                    reg_error(StatusCode::BAD_REQUEST, "TAG_INVALID", m)
                }
                other => reg_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    other.to_string(),
                ),
            })?
            .ok_or_else(|| {
                reg_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    format!("local/{repo}:{r} is not in the local image store"),
                )
            })?
    };
    let bytes = store.read(&d).map_err(|_| {
        reg_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest {d} is not in the local image store"),
        )
    })?;
    let media = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string());
    let len = bytes.len();
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(bytes))
    };
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&media) {
        h.insert(http::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(d.as_str()) {
        h.insert("docker-content-digest", v);
    }
    Ok(resp)
}

async fn read_limited(req: Request<Body>, limit: usize) -> Result<bytes::Bytes, RegError> {
    http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            reg_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "SIZE_INVALID",
                format!("manifest body: {e} (limit {limit} bytes)"),
            )
        })
}

async fn put_manifest(
    gw: &Gateway,
    repo: &str,
    r: &str,
    req: Request<Body>,
) -> Result<Response, RegError> {
    repo_ok(repo)?;
    let bytes = read_limited(req, MAX_MANIFEST).await?;
    let parsed = manifest::parse_manifest(&bytes, None)
        .map_err(|e| reg_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", e.to_string()))?;
    let store = gw.node.cache().store();
    let needed: Vec<Digest> = match &parsed {
        Manifest::Image(m) => std::iter::once(m.config.digest.clone())
            .chain(m.layers.iter().map(|l| l.digest.clone()))
            .collect(),
        Manifest::Index(entries) => entries.iter().map(|e| e.digest.clone()).collect(),
    };
    if let Some(missing) = needed.iter().find(|d| !store.contains(d)) {
        return Err(reg_error(
            StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
            format!("blob {missing} must be pushed before the manifest"),
        ));
    }
    let expected = if r.contains(':') {
        Some(parse_digest(r)?)
    } else {
        None
    };
    let d = store
        .put(&bytes, expected.as_ref())
        .map_err(|e| reg_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string()))?;
    if expected.is_none() {
        format!("local/{repo}:{r}")
            .parse::<Reference>()
            .map_err(|e| reg_error(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()))?;
        store
            .set_tag(repo, r, &d)
            .map_err(|e| reg_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))?;
    }
    tracing::info!(repository = repo, reference = r, digest = %d, "manifest pushed to the local store");
    let mut resp = StatusCode::CREATED.into_response();
    if let Ok(v) = HeaderValue::from_str(d.as_str()) {
        resp.headers_mut().insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{repo}/manifests/{d}")) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    Ok(resp)
}

async fn get_blob(gw: &Gateway, repo: &str, d: &str, head: bool) -> Result<Response, RegError> {
    repo_ok(repo)?;
    let d = parse_digest(d)?;
    let path = gw.node.cache().store().path(&d);
    let file = tokio::fs::File::open(&path).await.map_err(|_| {
        reg_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {d} is not in the local image store"),
        )
    })?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from_stream(tokio_util_stream(file)))
    };
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(d.as_str()) {
        resp.headers_mut().insert("docker-content-digest", v);
    }
    Ok(resp)
}

fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

async fn append(path: &std::path::Path, req: Request<Body>) -> Result<u64, RegError> {
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| reg_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))?;
    let mut stream = req.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            reg_error(
                StatusCode::BAD_REQUEST,
                "BLOB_UPLOAD_INVALID",
                e.to_string(),
            )
        })?;
        f.write_all(&chunk)
            .await
            .map_err(|e| reg_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))?;
    }
    f.flush()
        .await
        .map_err(|e| reg_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    Ok(len)
}

async fn commit(gw: &Gateway, path: std::path::PathBuf, d: &Digest) -> Result<Response, RegError> {
    let store = gw.node.cache().store().clone();
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || store.import_file(&path, &d2))
        .await
        .map_err(|e| reg_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))?
        .map_err(|e| reg_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string()))?;
    let mut resp = StatusCode::CREATED.into_response();
    if let Ok(v) = HeaderValue::from_str(d.as_str()) {
        resp.headers_mut().insert("docker-content-digest", v);
    }
    Ok(resp)
}

async fn start_upload(
    gw: &Gateway,
    repo: &str,
    digest: Option<&String>,
    req: Request<Body>,
) -> Result<Response, RegError> {
    repo_ok(repo)?;
    let path = gw.node.cache().store().temp_path();
    if let Some(d) = digest {
        // Monolithic upload in one POST.
        let d = parse_digest(d)?;
        append(&path, req).await?;
        return commit(gw, path, &d).await;
    }
    let id = format!("{:032x}", rand::random::<u128>());
    gw.uploads
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), path);
    let mut resp = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{repo}/blobs/uploads/{id}")) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp.headers_mut()
        .insert("range", HeaderValue::from_static("0-0"));
    Ok(resp)
}

fn upload_path(gw: &Gateway, id: &str) -> Result<std::path::PathBuf, RegError> {
    gw.uploads
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .cloned()
        .ok_or_else(|| {
            reg_error(
                StatusCode::NOT_FOUND,
                "BLOB_UPLOAD_UNKNOWN",
                format!("no upload {id}"),
            )
        })
}

async fn patch_upload(
    gw: &Gateway,
    repo: &str,
    id: &str,
    req: Request<Body>,
) -> Result<Response, RegError> {
    let path = upload_path(gw, id)?;
    let len = append(&path, req).await?;
    let mut resp = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{repo}/blobs/uploads/{id}")) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("0-{}", len.saturating_sub(1))) {
        resp.headers_mut().insert("range", v);
    }
    Ok(resp)
}

async fn finish_upload(
    gw: &Gateway,
    _repo: &str,
    id: &str,
    digest: Option<&String>,
    req: Request<Body>,
) -> Result<Response, RegError> {
    let path = upload_path(gw, id)?;
    let d = parse_digest(digest.ok_or_else(|| {
        reg_error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            "the digest query parameter is required",
        )
    })?)?;
    append(&path, req).await?;
    gw.uploads
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id);
    commit(gw, path, &d).await
}
