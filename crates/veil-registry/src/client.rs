//! The HTTP client for the OCI distribution API.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};
use tracing::debug;
use veil_image::manifest::{self, Manifest};
use veil_image::{Digest, Reference};

use crate::challenge::{parse_challenges, Challenge};
use crate::config::RegistryConfig;
use crate::error::Error;

mod auth;
mod blob;

pub use blob::BlobStream;

/// Largest manifest body accepted.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// Largest token / error body read.
const MAX_SMALL_BODY: u64 = 1024 * 1024;
/// Retries after 429/503, and resumptions of a broken blob download.
const MAX_RETRIES: u32 = 3;
/// Upper bound for a honoured `Retry-After`.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Token lifetime when the token server does not say.
const DEFAULT_TOKEN_LIFETIME: u64 = 60;
/// Platform selected from an index by [`RegistryClient::resolve_image`].
const DEFAULT_OS: &str = "linux";
const DEFAULT_ARCH: &str = "amd64";

/// A manifest as fetched from a registry.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// sha256 of `bytes`.
    pub digest: Digest,
    /// The media type (from `Content-Type`, else the manifest's `mediaType`).
    pub media_type: String,
    /// The raw manifest bytes, exactly as served.
    pub bytes: Bytes,
}

/// The result of [`RegistryClient::resolve_image_full`].
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The image manifest (linux/amd64 if the reference named an index).
    pub manifest: FetchedManifest,
    /// The digest the reference resolved to at the top level (the index's
    /// digest for a multi-platform image, else the manifest's own digest).
    pub top_digest: Digest,
    /// The index itself, when the reference named one.
    pub index: Option<FetchedManifest>,
}

/// A client for OCI distribution registries. Cheap to clone; clones share
/// the connection pool and the token cache.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    http: reqwest::Client,
    config: RegistryConfig,
    /// (api host, scope) -> bearer token.
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
    /// api host -> how it asked us to authenticate last time.
    schemes: Mutex<HashMap<String, KnownAuth>>,
}

#[derive(Clone)]
struct CachedToken {
    token: String,
    expires: Instant,
}

#[derive(Clone)]
enum KnownAuth {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Where requests go: a registry or one of its mirrors.
#[derive(Clone, Debug)]
struct Endpoint {
    /// `host[:port]` as reached over HTTP (docker.io mapped).
    host: String,
    /// `scheme://host`.
    base: String,
    /// The registry name as written in the reference (for messages and
    /// credentials lookup).
    registry: String,
}

#[derive(Clone, Copy)]
enum Access {
    Pull,
    Push,
}

fn scope(repo: &str, access: Access) -> String {
    match access {
        Access::Pull => format!("repository:{repo}:pull"),
        Access::Push => format!("repository:{repo}:pull,push"),
    }
}

/// A request that can be re-sent (after authenticating or being throttled).
struct Req {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
}

impl Req {
    fn new(method: Method, url: Url) -> Self {
        Req {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
        }
    }
}

/// The host name used for HTTP requests to `registry`.
fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// `registry/repo:tag` or `registry/repo@digest`.
fn display_ref(r: &Reference) -> String {
    match (&r.digest, &r.tag) {
        (Some(d), _) => format!("{}/{}@{}", r.registry, r.repository, d),
        (None, Some(t)) => format!("{}/{}:{}", r.registry, r.repository, t),
        (None, None) => format!("{}/{}:latest", r.registry, r.repository),
    }
}

/// The tag or digest to put in a manifest URL (digest preferred).
fn reference_for_get(r: &Reference) -> String {
    match (&r.digest, &r.tag) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.clone(),
        (None, None) => "latest".to_string(),
    }
}

/// Formats an error with its chain of sources (reqwest hides the cause in
/// the top-level message).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The URL without its query (which may carry upload state), for logs.
fn loggable(url: &Url) -> String {
    format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port().map(|p| format!(":{p}")).unwrap_or_default()
    ) + url.path()
}

fn host_port(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let secs: u64 = v.parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

fn backoff(attempt: u32) -> Duration {
    (Duration::from_millis(500) * 2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(MAX_RETRY_AFTER)
}

fn excerpt(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    let mut out: String = s.chars().take(300).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Parses a distribution error body: `{"errors":[{"code","message"}]}`.
/// Returns the first code and a `CODE: message; …` summary.
fn parse_error_body(body: &[u8]) -> Option<(Option<String>, String)> {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    let b: Body = serde_json::from_slice(body).ok()?;
    if b.errors.is_empty() {
        return None;
    }
    let first = b.errors.first().and_then(|e| e.code.clone());
    let summary = b
        .errors
        .iter()
        .map(|e| match (&e.code, &e.message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => "unknown error".to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some((first, summary))
}

/// Reads a body, failing with [`Error::TooLarge`] beyond `limit` bytes.
async fn read_limited(mut resp: Response, limit: u64, what: &str) -> Result<Bytes, Error> {
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(Error::TooLarge {
            what: what.to_string(),
            limit,
        });
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::Transport(format!("reading {what}: {}", error_chain(&e))))?
    {
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(Error::TooLarge {
                what: what.to_string(),
                limit,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Maps a non-success response to an error.
async fn check(resp: Response, ep: &Endpoint, what: &str) -> Result<Response, Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    // Error bodies are read best effort: a HEAD has none.
    let body = read_limited(resp, MAX_SMALL_BODY, what)
        .await
        .unwrap_or_default();
    let parsed = parse_error_body(&body);
    let detail = match &parsed {
        Some((_, d)) => d.clone(),
        None if body.is_empty() => format!("HTTP {}", status.as_u16()),
        None => format!("HTTP {}: {}", status.as_u16(), excerpt(&body)),
    };
    let code = parsed.and_then(|(c, _)| c);
    let not_found_code = matches!(
        code.as_deref(),
        Some("MANIFEST_UNKNOWN" | "BLOB_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UPLOAD_UNKNOWN")
    );
    Err(match status {
        StatusCode::NOT_FOUND => Error::NotFound {
            what: what.to_string(),
            code,
            detail,
        },
        _ if not_found_code => Error::NotFound {
            what: what.to_string(),
            code,
            detail,
        },
        StatusCode::UNAUTHORIZED => Error::Unauthorized {
            registry: ep.registry.clone(),
            detail: format!("{what}: {detail}"),
        },
        StatusCode::FORBIDDEN => Error::Denied {
            registry: ep.registry.clone(),
            what: what.to_string(),
            detail,
        },
        _ => Error::Status {
            registry: ep.registry.clone(),
            what: what.to_string(),
            status: status.as_u16(),
            body: detail,
        },
    })
}

fn content_type(resp: &Response) -> String {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

/// `mediaType` from a manifest's JSON, if present.
fn embedded_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<M>(bytes).ok()?.media_type
}

impl RegistryClient {
    /// Creates a client.
    pub fn new(config: RegistryConfig) -> Result<Self, Error> {
        if config.timeout.is_zero() {
            return Err(Error::Config("timeout must be positive".into()));
        }
        if config.manifest_deadline.is_zero() || config.blob_deadline_base.is_zero() {
            return Err(Error::Config(
                "manifest_deadline and blob_deadline_base must be positive".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .read_timeout(config.timeout)
            .user_agent(concat!("veil-registry/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(error_chain(&e)))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                config,
                tokens: Mutex::new(HashMap::new()),
                schemes: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn endpoint(&self, host: &str, registry: &str) -> Endpoint {
        let host = api_host(host).to_string();
        let scheme = if self.inner.config.is_plain_http(&host) {
            "http"
        } else {
            "https"
        };
        Endpoint {
            base: format!("{scheme}://{host}"),
            host,
            registry: registry.to_string(),
        }
    }

    fn not_local(r: &Reference) -> Result<(), Error> {
        if r.is_local() {
            return Err(Error::Config(format!(
                "{r} names the node-local image store, not a registry"
            )));
        }
        Ok(())
    }

    /// The registry itself (used for writes).
    fn registry_endpoint(&self, r: &Reference) -> Endpoint {
        self.endpoint(&r.registry, &r.registry)
    }

    /// Mirrors first, then the registry (used for reads).
    fn read_endpoints(&self, r: &Reference) -> Vec<Endpoint> {
        let mut eps: Vec<Endpoint> = self
            .inner
            .config
            .mirrors
            .get(&r.registry)
            .or_else(|| self.inner.config.mirrors.get(api_host(&r.registry)))
            .map(|m| m.iter().map(|h| self.endpoint(h, h)).collect())
            .unwrap_or_default();
        eps.push(self.registry_endpoint(r));
        eps
    }

    /// Runs `f` on each endpoint in turn until one succeeds; the last
    /// endpoint's error is returned.
    async fn on_endpoints<T, F, Fut>(&self, eps: Vec<Endpoint>, mut f: F) -> Result<T, Error>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let n = eps.len();
        let mut last = None;
        for (i, ep) in eps.into_iter().enumerate() {
            let host = ep.host.clone();
            match f(ep).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if i + 1 < n {
                        debug!(mirror = %host, error = %e, "mirror failed, trying next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Config("no endpoint".into())))
    }

    fn credentials(&self, ep: &Endpoint) -> Option<&(String, String)> {
        let creds = &self.inner.config.credentials;
        creds
            .get(&ep.host)
            .or_else(|| creds.get(&ep.registry))
            .or_else(|| creds.get(api_host(&ep.registry)))
    }

    fn url(&self, ep: &Endpoint, path: &str) -> Result<Url, Error> {
        let s = format!("{}{}", ep.base, path);
        Url::parse(&s).map_err(|e| Error::Config(format!("invalid URL {s}: {e}")))
    }

    // ---- sending ----------------------------------------------------------

    async fn send_once(
        &self,
        ep: &Endpoint,
        req: &Req,
        auth: Option<&HeaderValue>,
    ) -> Result<Response, Error> {
        debug!(method = %req.method, url = %loggable(&req.url), "registry request");
        let mut rb = self
            .inner
            .http
            .request(req.method.clone(), req.url.clone())
            .headers(req.headers.clone());
        // Credentials only ever go to the endpoint they were meant for.
        if let Some(a) = auth {
            if host_port(&req.url) == ep.host || req.url.host_str() == Some(ep.host.as_str()) {
                rb = rb.header(header::AUTHORIZATION, a.clone());
            }
        }
        if let Some(b) = &req.body {
            rb = rb.body(b.clone());
        }
        tokio::time::timeout(self.inner.config.timeout, rb.send())
            .await
            .map_err(|_| {
                Error::Transport(format!(
                    "{} {} timed out after {:?}",
                    req.method,
                    loggable(&req.url),
                    self.inner.config.timeout
                ))
            })?
            .map_err(|e| {
                Error::Transport(format!(
                    "{} {}: {}",
                    req.method,
                    loggable(&req.url),
                    error_chain(&e.without_url())
                ))
            })
    }

    /// Sends `req`, answering auth challenges once and retrying throttled
    /// requests. The response may still be an error status.
    async fn send(
        &self,
        ep: &Endpoint,
        scope: &str,
        what: &str,
        req: &Req,
    ) -> Result<Response, Error> {
        let mut authenticated = false;
        let mut throttled = 0u32;
        loop {
            let auth = self.auth_header(ep, scope).await?;
            let resp = self.send_once(ep, req, auth.as_ref()).await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED {
                if authenticated {
                    self.forget_token(&ep.host, scope);
                    return Ok(resp);
                }
                authenticated = true;
                let challenges: Vec<Challenge> = resp
                    .headers()
                    .get_all(header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(parse_challenges)
                    .collect();
                if auth.is_some() && challenges.iter().all(|c| c.scheme == "basic") {
                    // Our basic credentials were rejected outright.
                    return Ok(resp);
                }
                self.forget_token(&ep.host, scope);
                self.authenticate(ep, scope, &challenges).await?;
                continue;
            }
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                if throttled >= MAX_RETRIES {
                    return Err(Error::Throttled {
                        registry: ep.registry.clone(),
                        what: what.to_string(),
                        status: status.as_u16(),
                        attempts: throttled + 1,
                    });
                }
                throttled += 1;
                let delay = retry_after(resp.headers()).unwrap_or_else(|| backoff(throttled));
                debug!(
                    status = status.as_u16(),
                    ?delay,
                    attempt = throttled,
                    "registry throttled, retrying"
                );
                drop(resp);
                tokio::time::sleep(delay).await;
                continue;
            }
            return Ok(resp);
        }
    }

    // ---- manifests --------------------------------------------------------

    /// `GET /v2/<repo>/manifests/<tag-or-digest>`; the digest is the sha256
    /// of the bytes and must match the reference's digest, if it has one.
    /// Mirrors are tried first. Bodies are capped at [`MAX_MANIFEST_SIZE`]. Each endpoint's
    /// attempt must complete within [`RegistryConfig::manifest_deadline`], else
    /// [`Error::Deadline`].
    pub async fn get_manifest(&self, r: &Reference) -> Result<FetchedManifest, Error> {
        Self::not_local(r)?;
        let limit = self.inner.config.manifest_deadline;
        self.on_endpoints(self.read_endpoints(r), |ep| async move {
            tokio::time::timeout(limit, self.get_manifest_at(&ep, r))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Deadline {
                        what: format!("manifest {} from {}", display_ref(r), ep.host),
                        limit,
                    })
                })
        })
        .await
    }

    async fn get_manifest_at(
        &self,
        ep: &Endpoint,
        r: &Reference,
    ) -> Result<FetchedManifest, Error> {
        let what = format!("manifest {}", display_ref(r));
        let url = self.url(
            ep,
            &format!("/v2/{}/manifests/{}", r.repository, reference_for_get(r)),
        )?;
        let mut req = Req::new(Method::GET, url);
        let accept = HeaderValue::from_str(manifest::ACCEPT)
            .map_err(|e| Error::Config(format!("invalid Accept value: {e}")))?;
        req.headers.insert(header::ACCEPT, accept);
        let resp = self
            .send(ep, &scope(&r.repository, Access::Pull), &what, &req)
            .await?;
        let resp = check(resp, ep, &what).await?;
        let mut media_type = content_type(&resp);
        let bytes = read_limited(resp, MAX_MANIFEST_SIZE, &what).await?;
        let digest = Digest::sha256(&bytes);
        expect_digest(&what, r.digest.as_ref(), &digest)?;
        if media_type.is_empty() || media_type == "application/json" || media_type == "text/plain" {
            if let Some(mt) = embedded_media_type(&bytes) {
                media_type = mt;
            }
        }
        Ok(FetchedManifest {
            digest,
            media_type,
            bytes,
        })
    }

    /// Like [`get_manifest`](Self::get_manifest), but an index / manifest
    /// list is resolved to its linux/amd64 image manifest (fetched by
    /// digest). Use [`resolve_image_full`](Self::resolve_image_full) to also
    /// learn the top-level digest.
    pub async fn resolve_image(&self, r: &Reference) -> Result<FetchedManifest, Error> {
        Ok(self.resolve_image_full(r).await?.manifest)
    }

    /// Resolves `r` to an image manifest (linux/amd64 for an index) and
    /// returns it together with the digest of the top-level manifest.
    pub async fn resolve_image_full(&self, r: &Reference) -> Result<ResolvedImage, Error> {
        let top = self.get_manifest(r).await?;
        match manifest::parse_manifest(&top.bytes, Some(&top.media_type))? {
            Manifest::Image(_) => Ok(ResolvedImage {
                top_digest: top.digest.clone(),
                manifest: top,
                index: None,
            }),
            Manifest::Index(descriptors) => {
                let d = manifest::select_platform(&descriptors, DEFAULT_OS, DEFAULT_ARCH)?;
                let mut child_ref = r.clone();
                child_ref.digest = Some(d.digest.clone());
                let child = self.get_manifest(&child_ref).await?;
                match manifest::parse_manifest(&child.bytes, Some(&child.media_type))? {
                    Manifest::Image(_) => Ok(ResolvedImage {
                        manifest: child,
                        top_digest: top.digest.clone(),
                        index: Some(top),
                    }),
                    Manifest::Index(_) => Err(Error::Protocol {
                        registry: r.registry.clone(),
                        detail: format!(
                            "index {} points at another index {} for {DEFAULT_OS}/{DEFAULT_ARCH}",
                            display_ref(r),
                            d.digest
                        ),
                    }),
                }
            }
        }
    }

    /// `PUT /v2/<repo>/manifests/<tag or digest>` (the tag if the reference
    /// has one). Returns the sha256 digest of `bytes`.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, Error> {
        Self::not_local(r)?;
        let digest = Digest::sha256(&bytes);
        let what = format!("manifest {}", display_ref(r));
        expect_digest(&what, r.digest.as_ref(), &digest)?;
        let ep = self.registry_endpoint(r);
        let reference = match &r.tag {
            Some(t) => t.clone(),
            None => digest.to_string(),
        };
        let url = self.url(
            &ep,
            &format!("/v2/{}/manifests/{}", r.repository, reference),
        )?;
        let mut req = Req::new(Method::PUT, url);
        req.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type)
                .map_err(|e| Error::Config(format!("invalid media type {media_type:?}: {e}")))?,
        );
        req.body = Some(bytes);
        let resp = self
            .send(&ep, &scope(&r.repository, Access::Push), &what, &req)
            .await?;
        check(resp, &ep, &what).await?;
        Ok(digest)
    }
}

/// Standard base64 (with padding), for basic auth.
fn base64_encode(s: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `DigestMismatch` naming `what` unless `actual` is the `expected` digest (if any).
fn expect_digest(what: &str, expected: Option<&Digest>, actual: &Digest) -> Result<(), Error> {
    match expected {
        Some(e) if e != actual => Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: e.clone(),
            actual: actual.clone(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(base64_encode(""), "");
        assert_eq!(base64_encode("f"), "Zg==");
        assert_eq!(base64_encode("fo"), "Zm8=");
        assert_eq!(base64_encode("foo"), "Zm9v");
        assert_eq!(base64_encode("user:pa ss"), "dXNlcjpwYSBzcw==");
    }

    #[test]
    fn error_body() {
        let (code, detail) = parse_error_body(
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}"#,
        )
        .expect("parses");
        assert_eq!(code.as_deref(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(detail, "MANIFEST_UNKNOWN: manifest unknown");
        assert!(parse_error_body(b"not json").is_none());
        assert!(parse_error_body(br#"{"errors":[]}"#).is_none());
    }

    #[test]
    fn retry_after_is_capped() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3600"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(30), MAX_RETRY_AFTER);
    }

    #[test]
    fn docker_hub_mapping_and_schemes() {
        let client = RegistryClient::new(RegistryConfig {
            insecure: vec!["reg.lan".into()],
            ..Default::default()
        })
        .expect("client");
        let ep = client.endpoint("docker.io", "docker.io");
        assert_eq!(ep.base, "https://registry-1.docker.io");
        assert_eq!(
            client.endpoint("127.0.0.1:5000", "x").base,
            "http://127.0.0.1:5000"
        );
        assert_eq!(client.endpoint("reg.lan:80", "x").base, "http://reg.lan:80");
        assert_eq!(client.endpoint("ghcr.io", "x").base, "https://ghcr.io");
    }
}
