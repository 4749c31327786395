//! Client of the gateway's admin API.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use veil_gateway::{ApiError, DeployRequest, FunctionStatus};

/// Admin API client.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

/// Percent-encode one URL path segment: everything but unreserved characters, and the dots of
/// `.` and `..`, so that a name like `x/../victim` stays one segment and cannot be normalised
/// into another path on the way.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let dots_only = !s.is_empty() && s.bytes().all(|b| b == b'.');
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_~".contains(&b) || (b == b'.' && !dots_only) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ApiError>(&body) {
        Ok(e) => bail!("{} ({}, HTTP {})", e.message, e.code, status.as_u16()),
        Err(_) => bail!("HTTP {status}: {body}"),
    }
}

/// Result of one invocation.
#[derive(Debug)]
pub struct Invocation {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body.
    pub body: bytes::Bytes,
}

impl AdminClient {
    /// A client for the gateway at `base` (e.g. `http://127.0.0.1:8080`), without a token
    /// (the admin API then answers 401; see [`AdminClient::with_token`]).
    pub fn new(base: &str) -> Result<Self> {
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .context("http client")?,
            token: None,
        })
    }

    /// The same client, authenticating with `token` (the operator's or a tenant's).
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// `GET path` on the admin API, its JSON answer parsed.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self
            .admin(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    /// Create a token for `tenant` (operator only).
    pub async fn create_token(&self, tenant: &str) -> Result<veil_gateway::auth::NewToken> {
        let r = self
            .admin(reqwest::Method::POST, "/v1/tokens")
            .json(&veil_gateway::TokenRequest {
                tenant: tenant.to_string(),
            })
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    /// List tenant tokens (operator only; never their values).
    pub async fn tokens(&self) -> Result<Vec<veil_gateway::auth::TokenInfo>> {
        self.get_json("/v1/tokens").await
    }

    /// Revoke a tenant token by id (operator only).
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let r = self
            .admin(
                reqwest::Method::DELETE,
                &format!("/v1/tokens/{}", path_segment(id)),
            )
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        check(r).await?;
        Ok(())
    }

    /// Every tenant the gateway knows of (operator only).
    pub async fn tenants(&self) -> Result<Vec<veil_gateway::tenants::TenantInfo>> {
        self.get_json("/v1/tenants").await
    }

    /// Delete a tenant: revoke its tokens, remove its pool, delete its functions (draining
    /// them). Operator only.
    pub async fn delete_tenant(
        &self,
        tenant: &str,
    ) -> Result<veil_gateway::tenants::TenantDeleted> {
        let r = self
            .admin(
                reqwest::Method::DELETE,
                &format!("/v1/tenants/{}", path_segment(tenant)),
            )
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "cannot reach veil at {} (is `veil up` running?): {e}",
            self.base
        )
    }

    /// Deploy (create or update) a function.
    pub async fn deploy(&self, name: &str, req: &DeployRequest) -> Result<FunctionStatus> {
        let r = self
            .admin(
                reqwest::Method::PUT,
                &format!("/v1/functions/{}", path_segment(name)),
            )
            .json(req)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    /// List functions.
    pub async fn list(&self) -> Result<Vec<FunctionStatus>> {
        self.get_json("/v1/functions").await
    }

    /// One function, with its revisions and traffic.
    pub async fn function(&self, name: &str) -> Result<FunctionStatus> {
        self.get_json(&format!("/v1/functions/{}", path_segment(name)))
            .await
    }

    /// Set where a function's requests go.
    pub async fn set_traffic(
        &self,
        name: &str,
        traffic: Vec<veil_gateway::TrafficTarget>,
    ) -> Result<FunctionStatus> {
        let r = self
            .admin(
                reqwest::Method::PUT,
                &format!("/v1/functions/{}/traffic", path_segment(name)),
            )
            .json(&veil_gateway::TrafficRequest { traffic })
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    /// An asynchronous invocation.
    pub async fn invocation(&self, id: &str) -> Result<veil_gateway::InvocationStatus> {
        self.get_json(&format!("/v1/invocations/{}", path_segment(id)))
            .await
    }

    /// Delete a function.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let r = self
            .admin(
                reqwest::Method::DELETE,
                &format!("/v1/functions/{}", path_segment(name)),
            )
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        check(r).await?;
        Ok(())
    }

    /// Recent log lines of a function.
    pub async fn logs(&self, name: &str, tail: usize) -> Result<Vec<serde_json::Value>> {
        self.get_json(&format!(
            "/v1/functions/{}/logs?tail={tail}",
            path_segment(name)
        ))
        .await
    }

    /// At most `n` of a function's log lines after `after` (a line's `seq`), waiting up to
    /// `wait_s` seconds for one if there is none yet.
    pub async fn logs_after(
        &self,
        name: &str,
        after: u64,
        n: usize,
        wait_s: u64,
    ) -> Result<Vec<serde_json::Value>> {
        self.get_json(&format!(
            "/v1/functions/{}/logs?after={after}&tail={n}&wait={wait_s}",
            path_segment(name)
        ))
        .await
    }

    /// Tenants' pools of attested sandboxes.
    pub async fn tenant_pools(&self) -> Result<Vec<veil_node::TenantPoolStatus>> {
        self.get_json("/v1/tenant-pools").await
    }

    /// Create, resize or reconfigure a tenant's pool.
    pub async fn set_tenant_pool(
        &self,
        tenant: &str,
        req: &veil_gateway::TenantPoolRequest,
    ) -> Result<Vec<veil_node::TenantPoolStatus>> {
        let r = self
            .admin(
                reqwest::Method::PUT,
                &format!("/v1/tenant-pools/{}", path_segment(tenant)),
            )
            .json(req)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    /// Remove a tenant's pool (its sandboxes are destroyed).
    pub async fn remove_tenant_pool(&self, tenant: &str) -> Result<()> {
        let r = self
            .admin(
                reqwest::Method::DELETE,
                &format!("/v1/tenant-pools/{}", path_segment(tenant)),
            )
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        check(r).await?;
        Ok(())
    }

    /// Sandboxes on the node.
    pub async fn sandboxes(&self) -> Result<Vec<serde_json::Value>> {
        self.get_json("/v1/sandboxes").await
    }

    /// Invoke a function; any HTTP status is returned, not turned into an error.
    pub async fn invoke(
        &self,
        name: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
        headers: &BTreeMap<String, String>,
    ) -> Result<Invocation> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).context("HTTP method")?;
        let path = path.trim_start_matches('/');
        let mut rb = self
            .http
            .request(
                method,
                self.url(&format!("/f/{}/{path}", path_segment(name))),
            )
            .body(body);
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        let r = rb.send().await.map_err(|e| self.unreachable(e))?;
        Ok(Invocation {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.bytes().await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::path_segment;

    #[test]
    fn segments_stay_segments() {
        assert_eq!(path_segment("hello-1"), "hello-1");
        assert_eq!(
            path_segment("nonexistent/../victim"),
            "nonexistent%2F..%2Fvictim"
        );
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("."), "%2E");
        assert_eq!(path_segment("a b?#"), "a%20b%3F%23");
    }
}
