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

/// A blob download. The stream resumes transparently (with `Range`
/// requests) if the connection breaks; the caller verifies the digest.
pub struct BlobStream {
    /// Size announced by the registry, if any.
    pub size: Option<u64>,
    /// The blob's bytes.
    pub stream: BoxStream<'static, Result<Bytes, Error>>,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
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

    // ---- authentication -------------------------------------------------

    fn basic_header(user: &str, pass: &str) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_str(&format!(
            "Basic {}",
            base64_encode(&format!("{user}:{pass}"))
        ))
        .ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn bearer_header(token: &str) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn cached_token(&self, host: &str, scope: &str) -> Option<String> {
        let tokens = self.inner.tokens.lock().ok()?;
        tokens
            .get(&(host.to_string(), scope.to_string()))
            .filter(|t| t.expires > Instant::now())
            .map(|t| t.token.clone())
    }

    fn forget_token(&self, host: &str, scope: &str) {
        if let Ok(mut tokens) = self.inner.tokens.lock() {
            tokens.remove(&(host.to_string(), scope.to_string()));
        }
    }

    /// The `Authorization` header to send up front, based on what the host
    /// asked for before (fetching a fresh token if needed).
    async fn auth_header(&self, ep: &Endpoint, scope: &str) -> Result<Option<HeaderValue>, Error> {
        let known = self
            .inner
            .schemes
            .lock()
            .ok()
            .and_then(|s| s.get(&ep.host).cloned());
        match known {
            None => Ok(None),
            Some(KnownAuth::Basic) => Ok(self
                .credentials(ep)
                .and_then(|(u, p)| Self::basic_header(u, p))),
            Some(KnownAuth::Bearer { realm, service }) => {
                if let Some(t) = self.cached_token(&ep.host, scope) {
                    return Ok(Self::bearer_header(&t));
                }
                let token = self
                    .fetch_token(ep, &realm, service.as_deref(), scope)
                    .await?;
                self.store_token(&ep.host, scope, &token);
                Ok(Self::bearer_header(&token.token))
            }
        }
    }

    fn store_token(&self, host: &str, scope: &str, token: &CachedToken) {
        if let Ok(mut tokens) = self.inner.tokens.lock() {
            tokens.retain(|_, t| t.expires > Instant::now());
            tokens.insert((host.to_string(), scope.to_string()), token.clone());
        }
    }

    /// Answers a 401: learns the scheme and obtains a token if needed.
    async fn authenticate(
        &self,
        ep: &Endpoint,
        scope: &str,
        challenges: &[Challenge],
    ) -> Result<(), Error> {
        let bearer = challenges.iter().find(|c| c.scheme == "bearer");
        let basic = challenges.iter().find(|c| c.scheme == "basic");
        if let Some(ch) = bearer {
            let realm = ch.param("realm").ok_or_else(|| Error::Protocol {
                registry: ep.registry.clone(),
                detail: "bearer challenge without realm".into(),
            })?;
            let service = ch.param("service").map(str::to_string);
            // Ask for what the registry said it wants, else for our scope.
            let want = ch.param("scope").unwrap_or(scope);
            let token = self
                .fetch_token(ep, realm, service.as_deref(), want)
                .await?;
            self.store_token(&ep.host, scope, &token);
            if let Ok(mut s) = self.inner.schemes.lock() {
                s.insert(
                    ep.host.clone(),
                    KnownAuth::Bearer {
                        realm: realm.to_string(),
                        service,
                    },
                );
            }
            Ok(())
        } else if basic.is_some() {
            if self.credentials(ep).is_none() {
                return Err(Error::Unauthorized {
                    registry: ep.registry.clone(),
                    detail: format!(
                        "{} requires basic authentication and no credentials are configured for it",
                        ep.host
                    ),
                });
            }
            if let Ok(mut s) = self.inner.schemes.lock() {
                s.insert(ep.host.clone(), KnownAuth::Basic);
            }
            Ok(())
        } else {
            Err(Error::Unauthorized {
                registry: ep.registry.clone(),
                detail: format!(
                    "{} answered 401 without a supported WWW-Authenticate challenge",
                    ep.host
                ),
            })
        }
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<CachedToken, Error> {
        let mut url = Url::parse(realm).map_err(|e| Error::Protocol {
            registry: ep.registry.clone(),
            detail: format!("invalid token realm {realm:?}: {e}"),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scope.split_whitespace() {
                q.append_pair("scope", s);
            }
        }
        debug!(url = %loggable(&url), "registry token request");
        let mut rb = self.inner.http.get(url);
        if let Some((u, p)) = self.credentials(ep) {
            rb = rb.basic_auth(u, Some(p));
        }
        let what = format!("token for {scope}");
        let resp = tokio::time::timeout(self.inner.config.timeout, rb.send())
            .await
            .map_err(|_| {
                Error::Transport(format!(
                    "token request for {} timed out after {:?}",
                    ep.registry, self.inner.config.timeout
                ))
            })?
            .map_err(|e| {
                Error::Transport(format!(
                    "token request for {}: {}",
                    ep.registry,
                    error_chain(&e.without_url())
                ))
            })?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Error::Unauthorized {
                registry: ep.registry.clone(),
                detail: format!(
                    "token server refused {scope} (HTTP {}){}",
                    status.as_u16(),
                    if self.credentials(ep).is_some() {
                        ": credentials rejected"
                    } else {
                        ": no credentials configured"
                    }
                ),
            });
        }
        let resp = check(resp, ep, &what).await?;
        let body = read_limited(resp, MAX_SMALL_BODY, &what).await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| Error::Protocol {
            registry: ep.registry.clone(),
            detail: format!("malformed token response: {e}"),
        })?;
        let token = t
            .token
            .filter(|t| !t.is_empty())
            .or(t.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| Error::Protocol {
                registry: ep.registry.clone(),
                detail: "token response without token".into(),
            })?;
        let lifetime = t.expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME).max(1);
        // Renew a little early so a token does not expire in flight.
        let margin = if lifetime > 20 { 5 } else { 0 };
        Ok(CachedToken {
            token,
            expires: Instant::now() + Duration::from_secs(lifetime - margin),
        })
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
    /// Mirrors are tried first. Bodies are capped at [`MAX_MANIFEST_SIZE`].
    pub async fn get_manifest(&self, r: &Reference) -> Result<FetchedManifest, Error> {
        Self::not_local(r)?;
        self.on_endpoints(self.read_endpoints(r), |ep| async move {
            self.get_manifest_at(&ep, r).await
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

    // ---- blobs ------------------------------------------------------------

    fn blob_what(r: &Reference, digest: &Digest) -> String {
        format!("blob {}/{}@{}", r.registry, r.repository, digest)
    }

    /// `HEAD /v2/<repo>/blobs/<digest>` on the registry itself (mirrors are
    /// not consulted: this serves pushes).
    pub async fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<bool, Error> {
        self.blob_exists_as(r, digest, Access::Pull).await
    }

    async fn blob_exists_as(
        &self,
        r: &Reference,
        digest: &Digest,
        access: Access,
    ) -> Result<bool, Error> {
        Self::not_local(r)?;
        let ep = self.registry_endpoint(r);
        let what = Self::blob_what(r, digest);
        let url = self.url(&ep, &format!("/v2/{}/blobs/{}", r.repository, digest))?;
        let req = Req::new(Method::HEAD, url);
        let resp = self
            .send(&ep, &scope(&r.repository, access), &what, &req)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        check(resp, &ep, &what).await?;
        Ok(true)
    }

    /// Uploads a blob monolithically (`POST …/blobs/uploads/` then
    /// `PUT <Location>?digest=…`), unless the registry already has it.
    /// `data` must hash to `digest`.
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        data: Bytes,
    ) -> Result<(), Error> {
        let what = Self::blob_what(r, digest);
        expect_digest(&what, Some(digest), &Digest::sha256(&data))?;
        if self.blob_exists_as(r, digest, Access::Push).await? {
            debug!(%digest, "blob already present, skipping upload");
            return Ok(());
        }
        let ep = self.registry_endpoint(r);
        let scope = scope(&r.repository, Access::Push);
        let url = self.url(&ep, &format!("/v2/{}/blobs/uploads/", r.repository))?;
        let mut req = Req::new(Method::POST, url);
        req.body = Some(Bytes::new());
        let resp = self.send(&ep, &scope, &what, &req).await?;
        let resp = check(resp, &ep, &what).await?;
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Protocol {
                registry: ep.registry.clone(),
                detail: format!("upload of {what} started without a Location header"),
            })?;
        let mut put_url = resp.url().join(location).map_err(|e| Error::Protocol {
            registry: ep.registry.clone(),
            detail: format!("invalid upload Location {location:?}: {e}"),
        })?;
        put_url
            .query_pairs_mut()
            .append_pair("digest", digest.as_str());
        drop(resp);
        let mut req = Req::new(Method::PUT, put_url);
        req.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        req.body = Some(data);
        let resp = self.send(&ep, &scope, &what, &req).await?;
        check(resp, &ep, &what).await?;
        Ok(())
    }

    /// `GET /v2/<repo>/blobs/<digest>`, following redirects, as a stream.
    /// Mirrors are tried first. A connection that breaks mid-body is resumed
    /// with a `Range` request (at most 3 times) inside the stream. The
    /// caller verifies the digest.
    pub async fn get_blob(&self, r: &Reference, digest: &Digest) -> Result<BlobStream, Error> {
        Self::not_local(r)?;
        let what = Self::blob_what(r, digest);
        let scope = scope(&r.repository, Access::Pull);
        let path = format!("/v2/{}/blobs/{}", r.repository, digest);
        let (ep, url, resp) = self
            .on_endpoints(self.read_endpoints(r), |ep| {
                let (what, scope, path) = (&what, &scope, &path);
                async move {
                    let url = self.url(&ep, path)?;
                    let req = Req::new(Method::GET, url.clone());
                    let resp = self.send(&ep, scope, what, &req).await?;
                    let resp = check(resp, &ep, what).await?;
                    Ok((ep, url, resp))
                }
            })
            .await?;
        let size = resp.content_length();
        let download = BlobDownload {
            client: self.clone(),
            ep,
            url,
            scope,
            what,
            offset: 0,
            size,
            skip: 0,
            body: Some(resp.bytes_stream().boxed()),
            resumes: 0,
            done: false,
        };
        Ok(BlobStream {
            size,
            stream: download.into_stream(),
        })
    }
}

/// State of a resumable blob download.
struct BlobDownload {
    client: RegistryClient,
    ep: Endpoint,
    url: Url,
    scope: String,
    what: String,
    /// Bytes delivered so far.
    offset: u64,
    size: Option<u64>,
    /// Bytes to drop from the current body (a server that ignored `Range`).
    skip: u64,
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    resumes: u32,
    done: bool,
}

impl BlobDownload {
    fn into_stream(self) -> BoxStream<'static, Result<Bytes, Error>> {
        futures::stream::unfold(self, |mut st| async move {
            if st.done {
                return None;
            }
            match st.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), st)),
                Ok(None) => None,
                Err(e) => {
                    st.done = true;
                    Some((Err(e), st))
                }
            }
        })
        .boxed()
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            let Some(body) = self.body.as_mut() else {
                self.reopen().await?;
                continue;
            };
            match body.next().await {
                Some(Ok(mut chunk)) => {
                    if self.skip > 0 {
                        let n = self.skip.min(chunk.len() as u64);
                        chunk = chunk.slice(n as usize..);
                        self.skip -= n;
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    self.offset += chunk.len() as u64;
                    if self.size.is_some_and(|s| self.offset > s) {
                        return Err(Error::Protocol {
                            registry: self.ep.registry.clone(),
                            detail: format!("{} is longer than announced", self.what),
                        });
                    }
                    return Ok(Some(chunk));
                }
                Some(Err(e)) => {
                    self.body = None;
                    self.note_break(format!(
                        "reading {} at byte {}: {}",
                        self.what,
                        self.offset,
                        error_chain(&e.without_url())
                    ))?;
                }
                None => {
                    self.body = None;
                    match self.size {
                        Some(s) if self.offset < s => {
                            self.note_break(format!(
                                "{} ended at byte {} of {s}",
                                self.what, self.offset
                            ))?;
                        }
                        _ => return Ok(None),
                    }
                }
            }
        }
    }

    /// Records a broken body; fails once the resumptions are used up.
    fn note_break(&mut self, why: String) -> Result<(), Error> {
        if self.resumes >= MAX_RETRIES {
            return Err(Error::Transport(format!(
                "{why} (gave up after {} resumptions)",
                self.resumes
            )));
        }
        self.resumes += 1;
        debug!(reason = %why, attempt = self.resumes, "blob download broke, resuming");
        Ok(())
    }

    /// Re-requests the rest of the blob with a `Range` header.
    async fn reopen(&mut self) -> Result<(), Error> {
        tokio::time::sleep(backoff(self.resumes) / 2).await;
        let mut req = Req::new(Method::GET, self.url.clone());
        if self.offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={}-", self.offset))
                .map_err(|e| Error::Config(e.to_string()))?;
            req.headers.insert(header::RANGE, range);
        }
        let resp = match self
            .client
            .send(&self.ep, &self.scope, &self.what, &req)
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_transport() => {
                self.note_break(e.to_string())?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let resp = check(resp, &self.ep, &self.what).await?;
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            // `Content-Range: bytes <start>-<end>/<total>` must start where
            // we are.
            if let Some(cr) = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
            {
                let start = cr
                    .trim()
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if start != Some(self.offset) {
                    return Err(Error::Protocol {
                        registry: self.ep.registry.clone(),
                        detail: format!(
                            "resuming {} at byte {} got Content-Range {cr:?}",
                            self.what, self.offset
                        ),
                    });
                }
                if self.size.is_none() {
                    self.size = cr
                        .rsplit('/')
                        .next()
                        .and_then(|t| t.trim().parse::<u64>().ok());
                }
            }
            self.skip = 0;
        } else {
            // The server ignored the range and sends the whole blob again.
            self.skip = self.offset;
        }
        self.body = Some(resp.bytes_stream().boxed());
        Ok(())
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
