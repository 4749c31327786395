//! The attesting side: a KBS client for the agent (over its channel) and the CLI (over HTTP).

use crate::jwe::TeeKeyPair;
use crate::parse::{self, PROTOCOL_VERSION};
use crate::SESSION_COOKIE;
use bytes::Bytes;
use futures::future::BoxFuture;
use veil_attest::Attester;
use zeroize::Zeroizing;

/// Client errors. None carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request could not be sent or the reply not received.
    #[error("key broker unreachable: {0}")]
    Transport(String),
    /// The broker answered with an error.
    #[error("key broker refused ({status}): {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The `type` of the error body.
        kind: String,
        /// The `detail` of the error body (or the raw body).
        detail: String,
    },
    /// The broker's answer does not follow the protocol.
    #[error("key broker protocol error: {0}")]
    Protocol(String),
    /// Producing evidence failed.
    #[error("attestation evidence: {0}")]
    Evidence(#[from] veil_attest::Error),
    /// The released resource does not decrypt.
    #[error("{0}")]
    Jwe(#[from] crate::jwe::JweError),
    /// `get_resource` before a successful `attest`.
    #[error("not attested: call attest first")]
    NotAttested,
}

/// How the client reaches the broker: the agent tunnels HTTP through its channel to the node,
/// the CLI and tests use plain HTTP. Request URIs are origin-form (`/kbs/v0/...`).
pub trait Transport: Send + Sync {
    /// Send one request and return the full response.
    fn send(
        &self,
        req: http::Request<Bytes>,
    ) -> BoxFuture<'_, Result<http::Response<Bytes>, ClientError>>;
}

/// HTTP(S) with reqwest to `base_url` (e.g. `http://127.0.0.1:8080`).
#[cfg(feature = "reqwest")]
#[derive(Debug, Clone)]
pub struct ReqwestTransport {
    base_url: String,
    client: reqwest::Client,
}

#[cfg(feature = "reqwest")]
impl ReqwestTransport {
    /// A transport to `base_url` (no trailing slash needed).
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
        }
    }
}

#[cfg(feature = "reqwest")]
impl Transport for ReqwestTransport {
    fn send(
        &self,
        req: http::Request<Bytes>,
    ) -> BoxFuture<'_, Result<http::Response<Bytes>, ClientError>> {
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let url = format!("{}{}", self.base_url, parts.uri);
            let resp = self
                .client
                .request(parts.method, url)
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            let mut b = http::Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                b = b.header(k, v);
            }
            let body = resp
                .bytes()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            b.body(body)
                .map_err(|e| ClientError::Transport(e.to_string()))
        })
    }
}

/// A KBS client holding one session, one ephemeral key and one token.
pub struct KbsClient<T: Transport> {
    transport: T,
    cookie: Option<String>,
    token: Option<String>,
    key: Option<TeeKeyPair>,
    /// The broker is veil's (its challenge announced the init-data binding, and attestation
    /// succeeded with it): its resources must name the path asked for.
    veil_broker: bool,
    /// The assignment statement sent with resource requests, after attesting with tenant
    /// scope ([`crate::statement`]).
    statement: Option<String>,
}

fn refused(resp: &http::Response<Bytes>) -> ClientError {
    let status = resp.status().as_u16();
    match serde_json::from_slice::<kbs_types::ErrorInformation>(resp.body()) {
        Ok(e) => ClientError::Refused {
            status,
            kind: e.error_type,
            detail: e.detail,
        },
        Err(_) => ClientError::Refused {
            status,
            kind: String::new(),
            detail: String::from_utf8_lossy(resp.body())
                .chars()
                .take(500)
                .collect(),
        },
    }
}

impl<T: Transport> KbsClient<T> {
    /// A client over `transport`.
    pub fn new(transport: T) -> Self {
        Self {
            transport,
            cookie: None,
            token: None,
            key: None,
            veil_broker: false,
            statement: None,
        }
    }

    /// The token of the last successful attestation.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The token's claims (its JWT payload), read without verifying it: veil's tokens and
    /// trustee's EAR tokens are both JWTs.
    fn unverified_claims(&self) -> Option<serde_json::Value> {
        use base64::Engine;
        let payload = self.token.as_deref()?.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// When the token expires (its `exp`, seconds since the epoch), read without verifying it.
    pub fn token_expiry(&self) -> Option<u64> {
        self.unverified_claims()?.get("exp")?.as_u64()
    }

    /// A sandbox that attested with tenant scope, ahead of its assignment, keeps the session
    /// only if the broker is veil's (only veil's checks the assignment statements that follow)
    /// and its token is of tenant scope for exactly `tenant`.
    pub fn check_tenant_scoped_token(&self, tenant: &str) -> Result<(), ClientError> {
        if !self.veil_broker {
            return Err(ClientError::Protocol(
                "attesting ahead of an assignment needs veil's key broker (its challenge did not \
                 offer the init-data binding): another broker would not check the assignment \
                 the sandbox states later"
                    .into(),
            ));
        }
        let claims = self.unverified_claims().unwrap_or_default();
        let named = claims.get("tenant").and_then(|t| t.as_str());
        if named != Some(tenant) {
            return Err(ClientError::Protocol(format!(
                "the key broker attested this sandbox to tenant {named:?}, not to {tenant:?} as \
                 asked; refusing it"
            )));
        }
        if claims.get("scope").and_then(|s| s.as_str()) != Some(crate::parse::TENANT_SCOPE) {
            return Err(ClientError::Protocol(
                "the key broker's token is not of tenant scope".into(),
            ));
        }
        Ok(())
    }

    /// After attesting with tenant scope: state the function this sandbox was assigned (a JSON
    /// object, as its init data would carry it), signed with the attested key; every resource
    /// request from now on carries the statement.
    pub fn state_assignment(&mut self, assignment: &serde_json::Value) -> Result<(), ClientError> {
        let key = self.key.as_ref().ok_or(ClientError::NotAttested)?;
        // Without null members: the same object the init data would have carried.
        let mut assignment = assignment.clone();
        if let Some(o) = assignment.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        let st = crate::statement::sign(key, &assignment).map_err(ClientError::Protocol)?;
        self.statement = Some(st);
        Ok(())
    }

    /// One exchange with the session's cookie and (if `bearer`) token; the reply as it came.
    async fn exchange(
        &self,
        method: http::Method,
        uri: &str,
        body: Vec<u8>,
        bearer: bool,
    ) -> Result<http::Response<Bytes>, ClientError> {
        let mut b = http::Request::builder().method(method).uri(uri);
        if !body.is_empty() {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(c) = &self.cookie {
            b = b.header(http::header::COOKIE, format!("{SESSION_COOKIE}={c}"));
        }
        if bearer {
            if let Some(t) = &self.token {
                b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            if let Some(st) = &self.statement {
                b = b.header(crate::statement::STATEMENT_HEADER, st);
            }
        }
        let req = b
            .body(Bytes::from(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.transport.send(req).await
    }

    async fn send(
        &mut self,
        method: http::Method,
        uri: &str,
        body: Vec<u8>,
        bearer: bool,
    ) -> Result<http::Response<Bytes>, ClientError> {
        let resp = self.exchange(method, uri, body, bearer).await?;
        for v in resp.headers().get_all(http::header::SET_COOKIE) {
            if let Some(c) = v.to_str().ok().and_then(|s| s.split(';').next()) {
                if let Some(id) = parse::session_cookie(c) {
                    self.cookie = Some(id.to_string());
                }
            }
        }
        if !resp.status().is_success() {
            return Err(refused(&resp));
        }
        Ok(resp)
    }

    /// The full 0.4.0 round trip (`/auth`, then `/attest`) as guest-components' `kbs_protocol`
    /// does it, so that it works against veil's broker and trustee's KBS alike: generates the
    /// ephemeral P-256 key, sends `init_data` (a CoCo init-data TOML document, see
    /// [`parse::veil_init_data`]) and evidence whose report data is the runtime-data binding
    /// ([`parse::runtime_data_digest`]) with the algorithm the challenge selects (SHA-384 by
    /// default). Where the broker's challenge says it takes the init-data digest in the
    /// additional evidence (veil's broker), the digest goes there, so that the evidence binds
    /// the init data too; elsewhere (trustee) the init data is bound only if the TEE bound it at
    /// launch. Returns the token.
    pub async fn attest(
        &mut self,
        attester: &dyn Attester,
        init_data: Option<&str>,
    ) -> Result<String, ClientError> {
        let init = init_data
            .map(|body| parse::parse_init_data(body).map(|p| p.digest))
            .transpose()
            .map_err(|e| ClientError::Protocol(format!("init-data: {}", e.detail)))?;
        let req = kbs_types::Request {
            version: PROTOCOL_VERSION.into(),
            tee: parse::kbs_tee(attester.tee()),
            extra_params: serde_json::json!({
                parse::SUPPORTED_HASH_ALGORITHMS: ["sha384", "sha512", "sha256"],
            }),
        };
        let body = serde_json::to_vec(&req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.cookie = None;
        self.token = None;
        self.statement = None;
        let resp = self
            .send(http::Method::POST, "/kbs/v0/auth", body, false)
            .await?;
        let challenge: kbs_types::Challenge = serde_json::from_slice(resp.body())
            .map_err(|e| ClientError::Protocol(format!("challenge: {e}")))?;
        if self.cookie.is_none() {
            return Err(ClientError::Protocol(
                "no session cookie in the challenge".into(),
            ));
        }
        let alg = parse::challenge_hash_algorithm(&challenge.extra_params)
            .map_err(|e| ClientError::Protocol(format!("challenge: {e}")))?;
        let binds_init_data = challenge
            .extra_params
            .get(parse::VEIL_INIT_DATA)
            .and_then(|v| v.as_str())
            == Some(parse::VEIL_INIT_DATA_IN_ADDITIONAL_EVIDENCE);
        let additional_evidence = match &init {
            Some(digest) if binds_init_data => parse::veil_additional_evidence(digest),
            _ => String::new(),
        };
        let key = TeeKeyPair::generate();
        let tee_pubkey = key.public_key();
        let rd =
            parse::runtime_data_digest(alg, &challenge.nonce, &tee_pubkey, &additional_evidence);
        let evidence = attester.evidence(&rd)?;
        // As Confidential Containers' guest does: the host chose the launch-time data, so a
        // guest launched with init data that is not its own must not attest (else a broker
        // that trusts launch binding would take the host's init data for this sandbox's).
        if let Some(launch) = attester.launch_data(&evidence)? {
            let ours = init.as_deref().unwrap_or_default();
            if launch.iter().any(|b| *b != 0) && !veil_attest::launch_bound(&launch, ours) {
                return Err(ClientError::Protocol(format!(
                    "the host launched this guest with launch data (HOSTDATA/MRCONFIGID) {} that \
                     is not the digest of this sandbox's init data ({}); refusing to attest",
                    hex::encode(&launch),
                    hex::encode(ours)
                )));
            }
        }
        let att = kbs_types::Attestation {
            init_data: init_data.map(|body| kbs_types::InitData {
                format: "toml".into(),
                body: body.to_string(),
            }),
            runtime_data: kbs_types::RuntimeData {
                nonce: challenge.nonce,
                tee_pubkey,
            },
            tee_evidence: kbs_types::CompositeEvidence {
                primary_evidence: evidence,
                additional_evidence,
            },
        };
        let body = serde_json::to_vec(&att).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = self
            .send(http::Method::POST, "/kbs/v0/attest", body, false)
            .await?;
        let v: serde_json::Value = serde_json::from_slice(resp.body())
            .map_err(|e| ClientError::Protocol(format!("attest reply: {e}")))?;
        let token = v
            .get("token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| ClientError::Protocol("attest reply without a token".into()))?
            .to_string();
        self.key = Some(key);
        self.token = Some(token.clone());
        self.veil_broker = binds_init_data;
        Ok(token)
    }

    /// Fetch `repo/type/tag` and decrypt it with the ephemeral key. Takes `&self`, so several
    /// resources can be fetched concurrently once attested.
    pub async fn get_resource(&self, path: &str) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        if self.key.is_none() {
            return Err(ClientError::NotAttested);
        }
        let p = parse::parse_resource_path(path).map_err(|e| ClientError::Protocol(e.detail))?;
        let resp = self
            .exchange(
                http::Method::GET,
                &format!("/kbs/v0/resource/{p}"),
                Vec::new(),
                true,
            )
            .await?;
        if !resp.status().is_success() {
            return Err(refused(&resp));
        }
        let key = self.key.as_ref().ok_or(ClientError::NotAttested)?;
        Ok(key.decrypt_resource(resp.body(), &p.to_string(), self.veil_broker)?)
    }
}
