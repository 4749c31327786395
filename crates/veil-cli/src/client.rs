//! Client of the gateway's admin API.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use veil_gateway::{ApiError, DeployRequest, FunctionStatus};

/// Admin API client.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
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
    /// A client for the gateway at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> Result<Self> {
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .context("http client")?,
        })
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
            .http
            .put(self.url(&format!("/v1/functions/{name}")))
            .json(req)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    /// List functions.
    pub async fn list(&self) -> Result<Vec<FunctionStatus>> {
        let r = self
            .http
            .get(self.url("/v1/functions"))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    /// Delete a function.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let r = self
            .http
            .delete(self.url(&format!("/v1/functions/{name}")))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        check(r).await?;
        Ok(())
    }

    /// Recent log lines of a function.
    pub async fn logs(&self, name: &str, tail: usize) -> Result<Vec<serde_json::Value>> {
        let r = self
            .http
            .get(self.url(&format!("/v1/functions/{name}/logs?tail={tail}")))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
    }

    /// Sandboxes on the node.
    pub async fn sandboxes(&self) -> Result<Vec<serde_json::Value>> {
        let r = self
            .http
            .get(self.url("/v1/sandboxes"))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(check(r).await?.json().await?)
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
            .request(method, self.url(&format!("/f/{name}/{path}")))
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
