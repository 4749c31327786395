//! Authentication: basic credentials and bearer tokens (cached per host and scope).

use super::*;

impl RegistryClient {
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

    pub(super) fn forget_token(&self, host: &str, scope: &str) {
        if let Ok(mut tokens) = self.inner.tokens.lock() {
            tokens.remove(&(host.to_string(), scope.to_string()));
        }
    }

    /// The `Authorization` header to send up front, based on what the host
    /// asked for before (fetching a fresh token if needed).
    pub(super) async fn auth_header(
        &self,
        ep: &Endpoint,
        scope: &str,
    ) -> Result<Option<HeaderValue>, Error> {
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
    pub(super) async fn authenticate(
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
}
