//! The local image store over the OCI distribution API (`/v2/`): `local/<repo>:<tag>` images
//! pushed by `veil image push` (or any client that speaks the API) land in the node's blob
//! store. Pull endpoints serve them back.
//!
//! A blob or manifest is served only under a repository it was pushed to (or mounted into from
//! a repository that holds it): the store records membership after verifying the bytes, so a
//! digest alone proves nothing, and blobs the node cached from upstream registries for
//! deployments are never served here at all. A manifest is accepted only if everything it
//! names is already in its repository; a refused push writes nothing. Uploads are bounded in
//! size, expire when abandoned and belong to the repository they were started in (see
//! [`uploads`]).

mod uploads;

pub use uploads::{LocalStoreConfig, Uploads};

use crate::Gateway;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::sync::Arc;
use veil_image::manifest::{self, Manifest};
use veil_image::{Digest, Reference};
use veil_node::store::Member;
use veil_node::{ErrorKind, NodeError};

const MAX_MANIFEST: usize = 4 << 20;
/// Tags listed per page when the client does not say (`n`), and the most it may ask for.
const MAX_TAGS_PAGE: usize = 1000;

/// An error in the distribution API's JSON shape (`{"errors":[{"code","message"}]}`).
#[derive(Debug)]
pub struct RegError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for RegError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(
                serde_json::json!({ "errors": [{ "code": self.code, "message": self.message }] }),
            ),
        )
            .into_response();
        // A refusal for size or space comes before the body is read: the connection is closed
        // after the answer, and saying so keeps a client from reusing it for its next request.
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::INSUFFICIENT_STORAGE
        ) {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

fn reg_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> RegError {
    RegError {
        status,
        code,
        message: message.into(),
    }
}

/// A 401 in the distribution API's shape (the caller adds `WWW-Authenticate`).
pub(crate) fn unauthorized(why: &str) -> Response {
    reg_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", why).into_response()
}

/// A 403 in the distribution API's shape.
pub(crate) fn denied(message: &str) -> Response {
    reg_error(StatusCode::FORBIDDEN, "DENIED", message).into_response()
}

/// 404 in the distribution API's error shape: to this token, the repository does not exist.
pub(crate) fn unknown_repository(why: &str) -> Response {
    reg_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", why.to_string()).into_response()
}

/// A store error as the distribution API reports it.
fn store_error(e: &NodeError) -> RegError {
    match e.kind() {
        ErrorKind::BadReference => {
            reg_error(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string())
        }
        ErrorKind::Tampered => reg_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string()),
        ErrorKind::StoreFull => reg_error(
            StatusCode::INSUFFICIENT_STORAGE,
            "BLOB_UPLOAD_INVALID",
            e.to_string(),
        ),
        _ => reg_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()),
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

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Manifest(String, String),
    Blob(String, String),
    StartUpload(String),
    Upload(String, String),
    Tags(String),
}

/// Route `/v2/<rest>` by its last components, as the distribution spec lays them out
/// (`<name>/blobs/<digest>`, `<name>/manifests/<reference>`, `<name>/blobs/uploads/[<id>]`,
/// `<name>/tags/list`), so a repository whose name contains `blobs` or `manifests` cannot be
/// read as another route of a shorter repository.
fn parse(rest: &str) -> Option<Route> {
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(repo.into()));
    }
    if let Some(repo) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Route::StartUpload(repo.into()));
    }
    let (head, last) = rest.rsplit_once('/')?;
    if last.is_empty() {
        return None;
    }
    let (repo, kind) = head.rsplit_once('/')?;
    match kind {
        "blobs" => Some(Route::Blob(repo.into(), last.into())),
        "manifests" => Some(Route::Manifest(repo.into(), last.into())),
        "uploads" => repo
            .strip_suffix("/blobs")
            .map(|r| Route::Upload(r.into(), last.into())),
        _ => None,
    }
}

/// Whether `/v2/<rest>` names an endpoint of the local store (for fuzzing the route parser).
pub(crate) fn route_is_known(rest: &str) -> bool {
    parse(rest).is_some()
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
    // Tenants reach only their repositories: checked on the repository this very parse
    // found (and the source of a cross-repository mount), never on a second reading of the
    // path that could disagree with it.
    {
        // Fails closed: without the authenticating middleware nothing is served.
        let Some(caller) = req.extensions().get::<crate::auth::Caller>() else {
            return unauthorized("this endpoint needs a token");
        };
        let repo = match &route {
            Route::Manifest(r, _)
            | Route::Blob(r, _)
            | Route::StartUpload(r)
            | Route::Upload(r, _)
            | Route::Tags(r) => r.as_str(),
        };
        // Only a valid name and a write the store supports may claim a repository; anything
        // else is checked as a read (and then refused below as unsupported).
        let write = matches!(
            (&route, &method),
            (Route::Manifest(..), &Method::PUT)
                | (Route::StartUpload(_), &Method::POST)
                | (
                    Route::Upload(..),
                    &Method::PATCH | &Method::PUT | &Method::DELETE
                )
        );
        let from = q.get("from").map(|f| (f.as_str(), false));
        for (repo, write) in std::iter::once((repo, write)).chain(from) {
            if let Err(e) = repo_ok(repo) {
                return e.into_response();
            }
            match gw.auth.repository_access(caller, repo, write) {
                Ok(()) => {}
                Err(crate::auth::Denied::Unknown(m)) => return unknown_repository(&m),
                Err(d) => return denied(&d.message()),
            }
        }
    }
    let res = match (route, &method) {
        (Route::Manifest(repo, r), &Method::GET | &Method::HEAD) => {
            get_manifest(&gw, &repo, &r, method == Method::HEAD)
        }
        (Route::Manifest(repo, r), &Method::PUT) => put_manifest(&gw, &repo, &r, req).await,
        (Route::Blob(repo, d), &Method::GET | &Method::HEAD) => {
            get_blob(&gw, &repo, &d, method == Method::HEAD).await
        }
        (Route::Tags(repo), &Method::GET) => list_tags(&gw, &repo, &q),
        (Route::StartUpload(repo), &Method::POST) => uploads::start(&gw, &repo, &q, req).await,
        (Route::Upload(repo, id), &Method::GET) => uploads::status(&gw, &repo, &id),
        (Route::Upload(repo, id), &Method::PATCH) => uploads::patch(&gw, &repo, &id, req).await,
        (Route::Upload(repo, id), &Method::PUT) => {
            uploads::finish(&gw, &repo, &id, q.get("digest"), req).await
        }
        (Route::Upload(repo, id), &Method::DELETE) => uploads::cancel(&gw, &repo, &id),
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

fn manifest_unknown(repo: &str, r: &str) -> RegError {
    reg_error(
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        format!("manifest {r} is not in local/{repo} of the local image store"),
    )
}

fn get_manifest(gw: &Gateway, repo: &str, r: &str, head: bool) -> Result<Response, RegError> {
    repo_ok(repo)?;
    let store = gw.node.cache().store();
    let d = if r.contains(':') {
        parse_digest(r)?
    } else {
        store
            .get_tag(repo, r)
            .map_err(|e| match e.kind() {
                ErrorKind::BadReference => {
                    reg_error(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string())
                }
                _ => store_error(&e),
            })?
            .ok_or_else(|| manifest_unknown(repo, r))?
    };
    if !store.is_member(repo, Member::Manifest, &d) {
        return Err(manifest_unknown(repo, d.as_str()));
    }
    let bytes = store
        .read(&d)
        .map_err(|_| manifest_unknown(repo, d.as_str()))?;
    let media = media_type(&bytes);
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

/// A stored manifest's media type: its `mediaType`, else what its shape says.
fn media_type(bytes: &[u8]) -> String {
    let declared = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(String::from)
        });
    declared.unwrap_or_else(|| match manifest::parse_manifest(bytes, None) {
        Ok(Manifest::Index(_)) => manifest::OCI_INDEX.to_string(),
        _ => manifest::OCI_MANIFEST.to_string(),
    })
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
    // Everything is checked before anything is written: a refused push stores nothing.
    let expected = if r.contains(':') {
        Some(parse_digest(r)?)
    } else {
        format!("local/{repo}:{r}")
            .parse::<Reference>()
            .map_err(|e| reg_error(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()))?;
        None
    };
    let bytes = read_limited(req, MAX_MANIFEST).await?;
    let parsed = manifest::parse_manifest(&bytes, None)
        .map_err(|e| reg_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", e.to_string()))?;
    let store = gw.node.cache().store();
    let needed: Vec<(Member, Digest)> = match &parsed {
        Manifest::Image(m) => std::iter::once(m.config.digest.clone())
            .chain(m.layers.iter().map(|l| l.digest.clone()))
            .map(|d| (Member::Blob, d))
            .collect(),
        Manifest::Index(entries) => entries
            .iter()
            .map(|e| (Member::Manifest, e.digest.clone()))
            .collect(),
    };
    if let Some((member, missing)) = needed
        .iter()
        .find(|(member, d)| !store.is_member(repo, *member, d))
    {
        let what = match member {
            Member::Blob => "blob",
            Member::Manifest => "manifest",
        };
        return Err(reg_error(
            StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
            format!("{what} {missing} must be pushed to local/{repo} before the manifest"),
        ));
    }
    uploads::manifest_room(gw, repo, &bytes)?;
    let d = store
        .put_manifest(repo, &bytes, expected.as_ref())
        .map_err(|e| store_error(&e))?;
    if expected.is_none() {
        store.set_tag(repo, r, &d).map_err(|e| store_error(&e))?;
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
    let store = gw.node.cache().store();
    let unknown = || {
        reg_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {d} is not in local/{repo} of the local image store"),
        )
    };
    if !(store.is_member(repo, Member::Blob, &d) || store.is_member(repo, Member::Manifest, &d)) {
        return Err(unknown());
    }
    let file = tokio::fs::File::open(store.path(&d))
        .await
        .map_err(|_| unknown())?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from_stream(file_stream(file)))
    };
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(d.as_str()) {
        resp.headers_mut().insert("docker-content-digest", v);
    }
    Ok(resp)
}

fn file_stream(
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

/// One page of a tag listing: at most `n` of the sorted `tags` after `last`, and the `last`
/// of the next page if more remain.
fn tags_page<'a>(
    tags: &'a [String],
    n: Option<usize>,
    last: Option<&str>,
) -> (&'a [String], Option<&'a str>) {
    let start = match last {
        Some(l) => tags.partition_point(|t| t.as_str() <= l),
        None => 0,
    };
    let rest = &tags[start..];
    let n = n.unwrap_or(MAX_TAGS_PAGE).min(MAX_TAGS_PAGE);
    if rest.len() > n {
        let page = &rest[..n];
        (page, page.last().map(String::as_str).filter(|_| n > 0))
    } else {
        (rest, None)
    }
}

/// `GET /v2/<name>/tags/list[?n=<n>&last=<tag>]`: the repository's tags in lexical order,
/// paginated as the distribution spec says (a `Link: <…>; rel="next"` header when more
/// remain).
fn list_tags(gw: &Gateway, repo: &str, q: &HashMap<String, String>) -> Result<Response, RegError> {
    repo_ok(repo)?;
    let n = match q.get("n") {
        Some(s) => Some(s.parse::<usize>().map_err(|_| {
            reg_error(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                format!("n={s:?} is not a number"),
            )
        })?),
        None => None,
    };
    let tags = gw
        .node
        .cache()
        .store()
        .tags(repo)
        .map_err(|e| store_error(&e))?
        .ok_or_else(|| {
            reg_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                format!("repository local/{repo} is not in the local image store"),
            )
        })?;
    let (page, next) = tags_page(&tags, n, q.get("last").map(String::as_str));
    let mut resp = axum::Json(serde_json::json!({ "name": repo, "tags": page })).into_response();
    if let Some(last) = next {
        let n = n.unwrap_or(MAX_TAGS_PAGE).min(MAX_TAGS_PAGE);
        // Tags are [A-Za-z0-9_.-]: nothing to escape in the query.
        let link = format!("</v2/{repo}/tags/list?n={n}&last={last}>; rel=\"next\"");
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(http::header::LINK, v);
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse("a/b/tags/list"), Some(Route::Tags("a/b".into())));
        assert_eq!(
            parse("a/blobs/uploads/"),
            Some(Route::StartUpload("a".into()))
        );
        assert_eq!(
            parse("a/blobs/uploads/x1"),
            Some(Route::Upload("a".into(), "x1".into()))
        );
        assert_eq!(
            parse("a/b/blobs/sha256:00"),
            Some(Route::Blob("a/b".into(), "sha256:00".into()))
        );
        assert_eq!(
            parse("a/manifests/v1"),
            Some(Route::Manifest("a".into(), "v1".into()))
        );
        assert_eq!(parse("a/other"), None);
    }

    #[test]
    fn tag_pages() {
        let tags: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let page = |n, last| {
            let (p, next) = tags_page(&tags, n, last);
            (p.to_vec(), next.map(String::from))
        };
        assert_eq!(page(None, None), (tags.clone(), None));
        assert_eq!(
            page(Some(2), None),
            (vec!["a".into(), "b".into()], Some("b".into()))
        );
        assert_eq!(
            page(Some(2), Some("b")),
            (vec!["c".into(), "d".into()], Some("d".into()))
        );
        assert_eq!(page(Some(2), Some("d")), (vec!["e".into()], None));
        // `last` need not be a tag; exactly n remaining means no next page.
        assert_eq!(
            page(Some(2), Some("bb")),
            (vec!["c".into(), "d".into()], Some("d".into()))
        );
        assert_eq!(page(Some(5), None), (tags.clone(), None));
        assert_eq!(page(Some(3), Some("z")), (vec![], None));
        assert_eq!(page(Some(0), None), (vec![], None));
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    fn name(r: Option<Route>) -> Option<String> {
        r.map(|r| match r {
            Route::Manifest(n, x) => format!("manifest {n} {x}"),
            Route::Blob(n, x) => format!("blob {n} {x}"),
            Route::StartUpload(n) => format!("start {n}"),
            Route::Upload(n, x) => format!("upload {n} {x}"),
            Route::Tags(n) => format!("tags {n}"),
        })
    }

    #[test]
    fn routes_are_read_from_the_end() {
        for (path, want) in [
            ("app/manifests/v1", Some("manifest app v1")),
            (
                "team/blobs/app/manifests/v1",
                Some("manifest team/blobs/app v1"),
            ),
            (
                "team/manifests/app/blobs/sha256:ab",
                Some("blob team/manifests/app sha256:ab"),
            ),
            ("a/b/blobs/uploads/", Some("start a/b")),
            ("a/b/blobs/uploads", Some("start a/b")),
            ("a/blobs/uploads/123", Some("upload a 123")),
            ("a/blobs/uploads/tags/list", Some("tags a/blobs/uploads")),
            ("a/tags/list", Some("tags a")),
            ("a/blobs/", None),
            ("a/uploads/1", None),
            ("manifests/v1", None),
            ("a/other/x", None),
        ] {
            assert_eq!(name(parse(path)).as_deref(), want, "{path}");
        }
    }
}
