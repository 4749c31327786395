//! Sessions between `/auth`, `/attest` and `/resource`.

use crate::error::ProtocolError;
use crate::token::TokenClaims;
use kbs_types::HashAlgorithm;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use veil_attest::TeeKind;

/// Most sessions kept at once; beyond, new `/auth` requests are refused (503) until old ones
/// expire.
pub(crate) const MAX_SESSIONS: usize = 65_536;

pub(crate) struct Session {
    pub(crate) tee: TeeKind,
    /// The hash algorithm of the runtime-data binding, chosen at `/auth`.
    pub(crate) alg: HashAlgorithm,
    pub(crate) nonce: String,
    nonce_issued: Instant,
    nonce_used: bool,
    expires: Instant,
    pub(crate) attested: Option<TokenClaims>,
}

#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn unauthorized(kind: &'static str, detail: &str) -> ProtocolError {
    ProtocolError::unauthorized(kind, detail)
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a session; returns its id.
    pub(crate) fn create(
        &self,
        tee: TeeKind,
        alg: HashAlgorithm,
        nonce: String,
        ttl: Duration,
    ) -> Result<String, ProtocolError> {
        let id = hex::encode(crate::jwe::random_bytes::<16>());
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS / 2 {
            map.retain(|_, s| s.expires > now);
        }
        if map.len() >= MAX_SESSIONS {
            return Err(ProtocolError::new(
                503,
                "TooManySessions",
                "too many open sessions; try again later",
            ));
        }
        map.insert(
            id.clone(),
            Session {
                tee,
                alg,
                nonce,
                nonce_issued: now,
                nonce_used: false,
                expires: now + ttl,
                attested: None,
            },
        );
        Ok(id)
    }

    /// Consume the session's nonce: it must equal `nonce`, be unused and younger than
    /// `nonce_ttl`. Returns the session's TEE and hash algorithm.
    pub(crate) fn take_nonce(
        &self,
        id: &str,
        nonce: &str,
        nonce_ttl: Duration,
    ) -> Result<(TeeKind, HashAlgorithm), ProtocolError> {
        let now = Instant::now();
        let mut map = self.lock();
        let s = map
            .get_mut(id)
            .ok_or_else(|| unauthorized("InvalidCookie", "unknown session: call /auth first"))?;
        if s.expires <= now {
            map.remove(id);
            return Err(unauthorized(
                "ExpiredCookie",
                "the session has expired: call /auth again",
            ));
        }
        if s.nonce_used {
            return Err(unauthorized(
                "NonceReused",
                "the challenge nonce was already used: call /auth again",
            ));
        }
        if s.nonce != nonce {
            return Err(unauthorized(
                "NonceMismatch",
                "the nonce does not match the session's challenge",
            ));
        }
        // Single use, whatever the outcome of this attempt.
        s.nonce_used = true;
        if now.duration_since(s.nonce_issued) > nonce_ttl {
            return Err(unauthorized(
                "NonceExpired",
                "the challenge nonce has expired: call /auth again",
            ));
        }
        Ok((s.tee, s.alg))
    }

    pub(crate) fn set_attested(&self, id: &str, claims: TokenClaims) {
        if let Some(s) = self.lock().get_mut(id) {
            s.attested = Some(claims);
        }
    }

    /// The claims of an attested, unexpired session.
    pub(crate) fn attested(&self, id: &str) -> Result<TokenClaims, ProtocolError> {
        let now = Instant::now();
        let mut map = self.lock();
        let s = map
            .get(id)
            .ok_or_else(|| unauthorized("InvalidCookie", "unknown session"))?;
        if s.expires <= now {
            map.remove(id);
            return Err(unauthorized("ExpiredCookie", "the session has expired"));
        }
        let claims = s
            .attested
            .clone()
            .ok_or_else(|| unauthorized("UnAuthenticatedCookie", "the session is not attested"))?;
        if crate::token::now_secs() >= claims.exp {
            return Err(unauthorized(
                "TokenExpired",
                "the session's token has expired",
            ));
        }
        Ok(claims)
    }
}
