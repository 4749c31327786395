//! The broker's memory of its verdicts on assignment statements (`crate::statement`).

/// The attestation policy's verdicts on statements, so that the resource requests of one start
/// (its secrets, image keys and signature policy, sent together) pay for the statement's check
/// once. A verdict is keyed by the session's credential (its token or cookie) and the statement,
/// lives no longer than the token, and is forgotten whenever the policy or the reference values
/// change ([`DecisionCache::invalidate`]): it is exactly the decision the policy would take again.
#[derive(Default)]
pub(crate) struct DecisionCache {
    inner: std::sync::Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    generation: u64,
    map: std::collections::HashMap<[u8; 32], Verdict>,
}

/// What an allowed statement established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) function: String,
    pub(crate) image_digest: String,
    /// Unix seconds after which it is not used (the token's expiry).
    pub(crate) expires_at: u64,
}

/// Verdicts kept at most; beyond, expired ones go and then all of them.
const CACHE_CAPACITY: usize = 4096;

impl DecisionCache {
    /// The key of `statement` sent with `credential`.
    pub(crate) fn key(credential: &str, statement: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((credential.len() as u64).to_be_bytes());
        h.update(credential.as_bytes());
        h.update(statement.as_bytes());
        h.finalize().into()
    }

    /// The generation verdicts are taken under (pass it back to [`DecisionCache::put`]).
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// A verdict still valid at `now` (Unix seconds).
    pub(crate) fn get(&self, key: &[u8; 32], now: u64) -> Option<Verdict> {
        self.lock()
            .map
            .get(key)
            .filter(|v| v.expires_at > now)
            .cloned()
    }

    /// Remember a verdict taken under `generation` (dropped if the policy changed meanwhile).
    pub(crate) fn put(&self, key: [u8; 32], v: Verdict, generation: u64, now: u64) {
        let mut c = self.lock();
        if c.generation != generation {
            return;
        }
        if c.map.len() >= CACHE_CAPACITY {
            c.map.retain(|_, v| v.expires_at > now);
            if c.map.len() >= CACHE_CAPACITY {
                c.map.clear();
            }
        }
        c.map.insert(key, v);
    }

    /// Forget every verdict: the policy or the reference values changed.
    pub(crate) fn invalidate(&self) {
        let mut c = self.lock();
        c.generation += 1;
        c.map.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_expire_are_invalidated_and_bounded() {
        let c = DecisionCache::default();
        let v = Verdict {
            function: "f".into(),
            image_digest: "sha256:00".into(),
            expires_at: 100,
        };
        let k = DecisionCache::key("token", "st");
        // Another credential or statement is another key.
        assert_ne!(k, DecisionCache::key("token", "st2"));
        assert_ne!(k, DecisionCache::key("tokens", "t"));
        let g = c.generation();
        c.put(k, v.clone(), g, 10);
        assert_eq!(c.get(&k, 50), Some(v.clone()));
        assert_eq!(c.get(&k, 100), None, "expired with its token");
        c.invalidate();
        assert_eq!(c.get(&k, 50), None, "forgotten when the policy changes");
        // A verdict taken before a change is not stored after it.
        c.put(k, v.clone(), g, 10);
        assert_eq!(c.get(&k, 50), None);
        let g = c.generation();
        for i in 0..CACHE_CAPACITY + 10 {
            c.put(DecisionCache::key("t", &i.to_string()), v.clone(), g, 10);
        }
        assert!(c.lock().map.len() <= CACHE_CAPACITY);
    }
}
