//! Who may use the admin API and the local image store.
//!
//! Two kinds of caller, each with a bearer token (`Authorization: Bearer <token>`, or HTTP
//! Basic with the token as the password, for registry clients such as skopeo):
//! * the **operator**: one token created at first start in `<state>/auth/operator.token`
//!   (0600), as the key broker creates its admin key. It may do everything, and create and
//!   revoke tenant tokens;
//! * a **tenant**: tokens the operator creates (`POST /v1/tokens`). A tenant deploys, lists,
//!   reads the logs of and deletes only its own functions, and pushes and pulls only its own
//!   local-store repositories (a repository belongs to the tenant that first pushed to it).
//!
//! Only hashes of tenant tokens are stored (`<state>/auth/tokens.json`). Invocations
//! (`/f/…`) are not authenticated here: functions are public endpoints. `/healthz` and
//! `/metrics` are open to loopback peers only.

use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Most local-store repositories one tenant may own (each claim is a record in the token
/// store, so they are bounded like everything else a tenant can create).
pub const MAX_REPOSITORIES_PER_TENANT: usize = 1000;

/// Where the operator token lives, relative to the state directory.
pub const OPERATOR_TOKEN_FILE: &str = "auth/operator.token";

/// Errors of the token store.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Reading or writing the token files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A token file is not what veil wrote.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator: may do everything.
    Operator,
    /// A tenant: may act on its own functions and repositories only.
    Tenant(String),
}

impl Caller {
    /// Whether this caller may act for `tenant`.
    pub fn may_act_for(&self, tenant: &str) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Tenant(t) => t == tenant,
        }
    }

    /// The tenant, or `None` for the operator.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Operator => None,
            Caller::Tenant(t) => Some(t),
        }
    }
}

/// A tenant token as listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenInfo {
    /// Identifier, for revoking.
    pub id: String,
    /// The tenant it authenticates.
    pub tenant: String,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// A freshly created token: the only time its value is shown.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// What it is.
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The bearer token.
    pub token: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredToken {
    #[serde(flatten)]
    info: TokenInfo,
    /// SHA-256 of the token, hex.
    sha256: String,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    tokens: Vec<StoredToken>,
    /// Local-store repository → owning tenant.
    repositories: BTreeMap<String, String>,
}

/// Why a request is not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No or an unknown token (401).
    Unauthenticated(&'static str),
    /// Authenticated, but not allowed (403).
    Forbidden(String),
    /// A repository no one owns yet: to a tenant it does not exist (404), which is also what
    /// a registry client expects before its first push.
    Unknown(String),
}

impl Denied {
    /// The reason, for an error body.
    pub fn message(&self) -> String {
        match self {
            Denied::Unauthenticated(m) => m.to_string(),
            Denied::Forbidden(m) | Denied::Unknown(m) => m.clone(),
        }
    }
}

/// The token store and the local store's repository owners.
pub struct Auth {
    dir: PathBuf,
    operator: [u8; 32],
    state: Mutex<State>,
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn new_token() -> String {
    format!("veil_{}", hex::encode(rand::random::<[u8; 32]>()))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write `data` to `path` with mode 0600 through a temporary file, synced, then renamed.
fn write_private(path: &Path, data: &[u8]) -> Result<(), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Auth {
    /// Open the store under `state_dir/auth`, creating the operator token on first start.
    pub fn open(state_dir: &Path) -> Result<Self, AuthError> {
        let dir = state_dir.join("auth");
        std::fs::create_dir_all(&dir).map_err(|source| AuthError::Io {
            path: dir.clone(),
            source,
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| AuthError::Io {
                    path: dir.clone(),
                    source,
                },
            )?;
        }
        let op_path = state_dir.join(OPERATOR_TOKEN_FILE);
        let operator = match std::fs::read_to_string(&op_path) {
            Ok(t) if t.trim().starts_with("veil_") => sha256(t.trim()),
            Ok(_) => {
                return Err(AuthError::Corrupt {
                    path: op_path,
                    reason: "not a veil token".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let t = new_token();
                write_private(&op_path, format!("{t}\n").as_bytes())?;
                tracing::info!(file = %op_path.display(), "created the operator token");
                sha256(&t)
            }
            Err(source) => {
                return Err(AuthError::Io {
                    path: op_path,
                    source,
                })
            }
        };
        let state_path = dir.join("tokens.json");
        let state = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AuthError::Corrupt {
                path: state_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => {
                return Err(AuthError::Io {
                    path: state_path,
                    source,
                })
            }
        };
        Ok(Self {
            dir,
            operator,
            state: Mutex::new(state),
        })
    }

    fn persist(&self, state: &State) -> Result<(), AuthError> {
        let path = self.dir.join("tokens.json");
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| AuthError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_private(&path, &bytes)
    }

    /// The caller a token authenticates, if any.
    pub fn caller(&self, token: &str) -> Option<Caller> {
        // Every veil token has this prefix: anything else (a function's own clients send their
        // bearer tokens through the invocation path) is not hashed or looked up at all.
        if !token.starts_with("veil_") {
            return None;
        }
        let h = sha256(token);
        if h == self.operator {
            return Some(Caller::Operator);
        }
        let hex_h = hex::encode(h);
        lock(&self.state)
            .tokens
            .iter()
            .find(|t| t.sha256 == hex_h)
            .map(|t| Caller::Tenant(t.info.tenant.clone()))
    }

    /// Authenticate a request by its `Authorization` header (Bearer, or Basic with the token
    /// as the password).
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Caller, Denied> {
        let Some(v) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Denied::Unauthenticated("this endpoint needs a token"));
        };
        let v = v
            .to_str()
            .map_err(|_| Denied::Unauthenticated("malformed Authorization header"))?;
        let token = if let Some(t) = v.strip_prefix("Bearer ") {
            t.trim().to_string()
        } else if let Some(b) = v.strip_prefix("Basic ") {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|_| Denied::Unauthenticated("malformed Basic credentials"))?;
            let raw = String::from_utf8(raw)
                .map_err(|_| Denied::Unauthenticated("malformed Basic credentials"))?;
            match raw.split_once(':') {
                Some((_, pw)) => pw.to_string(),
                None => return Err(Denied::Unauthenticated("malformed Basic credentials")),
            }
        } else {
            return Err(Denied::Unauthenticated(
                "the Authorization header must be Bearer <token> or Basic",
            ));
        };
        self.caller(&token)
            .ok_or(Denied::Unauthenticated("unknown or revoked token"))
    }

    /// Create a token for `tenant` (already validated as a name).
    pub fn create_token(&self, tenant: &str) -> Result<NewToken, AuthError> {
        let token = new_token();
        let info = TokenInfo {
            id: hex::encode(rand::random::<[u8; 8]>()),
            tenant: tenant.to_string(),
            created: now_secs(),
        };
        let mut state = lock(&self.state);
        state.tokens.push(StoredToken {
            info: info.clone(),
            sha256: hex::encode(sha256(&token)),
        });
        if let Err(e) = self.persist(&state) {
            state.tokens.pop();
            return Err(e);
        }
        Ok(NewToken { info, token })
    }

    /// All tenant tokens (without their values).
    pub fn tokens(&self) -> Vec<TokenInfo> {
        lock(&self.state)
            .tokens
            .iter()
            .map(|t| t.info.clone())
            .collect()
    }

    /// Revoke a token by id; false if there is none.
    pub fn revoke(&self, id: &str) -> Result<bool, AuthError> {
        let mut state = lock(&self.state);
        let Some(pos) = state.tokens.iter().position(|t| t.info.id == id) else {
            return Ok(false);
        };
        let removed = state.tokens.remove(pos);
        if let Err(e) = self.persist(&state) {
            state.tokens.insert(pos, removed);
            return Err(e);
        }
        Ok(true)
    }

    /// Revoke every token of `tenant`; how many there were.
    pub fn revoke_tenant(&self, tenant: &str) -> Result<usize, AuthError> {
        let mut state = lock(&self.state);
        let before = state.tokens.clone();
        state.tokens.retain(|t| t.info.tenant != tenant);
        let revoked = before.len() - state.tokens.len();
        if revoked > 0 {
            if let Err(e) = self.persist(&state) {
                state.tokens = before;
                return Err(e);
            }
        }
        Ok(revoked)
    }

    /// Whether any token authenticates `tenant`.
    pub fn tenant_has_tokens(&self, tenant: &str) -> bool {
        lock(&self.state)
            .tokens
            .iter()
            .any(|t| t.info.tenant == tenant)
    }

    /// Local-store repositories and the tenants that own them.
    pub fn repositories(&self) -> BTreeMap<String, String> {
        lock(&self.state).repositories.clone()
    }

    /// The tenant that owns local-store repository `repo`, if any.
    pub fn repository_owner(&self, repo: &str) -> Option<String> {
        lock(&self.state).repositories.get(repo).cloned()
    }

    /// May `caller` read (or, with `write`, push to) local-store repository `repo`? A tenant's
    /// first push to a repository nobody owns makes it that tenant's.
    pub fn repository_access(
        &self,
        caller: &Caller,
        repo: &str,
        write: bool,
    ) -> Result<(), Denied> {
        // The operator reads every repository; it writes as tenant `default` (the operator's
        // own deployments), so it cannot overwrite, by accident or otherwise, a repository a
        // tenant owns — and what it creates no tenant can claim later.
        let tenant = match caller {
            Caller::Operator if !write => return Ok(()),
            Caller::Operator => "default",
            Caller::Tenant(t) => t.as_str(),
        };
        let mut state = lock(&self.state);
        match state.repositories.get(repo) {
            Some(owner) if owner == tenant => Ok(()),
            Some(owner) if *caller == Caller::Operator => Err(Denied::Forbidden(format!(
                "repository {repo:?} belongs to tenant {owner:?}: the operator's pushes go to \
                 tenant default's repositories; push with that tenant's token or pick another name"
            ))),
            // Another tenant's repository does not exist to this one (as its functions do
            // not), so tenants cannot probe each other's names.
            Some(_) => Err(Denied::Unknown(format!(
                "repository {repo:?} does not belong to tenant {tenant:?}"
            ))),
            None if write => {
                let owned = state.repositories.values().filter(|o| *o == tenant).count();
                if owned >= MAX_REPOSITORIES_PER_TENANT {
                    return Err(Denied::Forbidden(format!(
                        "tenant {tenant:?} already owns {owned} repositories, the most allowed"
                    )));
                }
                state
                    .repositories
                    .insert(repo.to_string(), tenant.to_string());
                if let Err(e) = self.persist(&state) {
                    state.repositories.remove(repo);
                    tracing::error!(error = %e, "cannot record the repository's owner");
                    return Err(Denied::Forbidden(
                        "cannot record the repository's owner".into(),
                    ));
                }
                tracing::info!(repository = repo, tenant, "repository claimed");
                Ok(())
            }
            None => Err(Denied::Unknown(format!(
                "repository {repo:?} does not belong to tenant {tenant:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn operator_and_tenant_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::open(dir.path()).unwrap();
        let op = std::fs::read_to_string(dir.path().join(OPERATOR_TOKEN_FILE)).unwrap();
        assert_eq!(auth.authenticate(&bearer(op.trim())), Ok(Caller::Operator));
        let t = auth.create_token("acme").unwrap();
        assert_eq!(
            auth.authenticate(&bearer(&t.token)),
            Ok(Caller::Tenant("acme".into()))
        );
        // Basic with the token as password (what registry clients send).
        use base64::Engine;
        let mut h = http::HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("x:{}", t.token));
        h.insert(
            http::header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        assert_eq!(auth.authenticate(&h), Ok(Caller::Tenant("acme".into())));
        for bad in [
            http::HeaderMap::new(),
            bearer("veil_nope"),
            bearer(""),
            bearer(&t.token[..t.token.len() - 1]),
        ] {
            assert!(matches!(
                auth.authenticate(&bad),
                Err(Denied::Unauthenticated(_))
            ));
        }
        // Survives a restart; only the hash is stored; revocation takes effect.
        drop(auth);
        let stored = std::fs::read_to_string(dir.path().join("auth/tokens.json")).unwrap();
        assert!(!stored.contains(&t.token));
        let auth = Auth::open(dir.path()).unwrap();
        assert_eq!(auth.caller(&t.token), Some(Caller::Tenant("acme".into())));
        assert!(auth.revoke(&t.info.id).unwrap());
        assert!(!auth.revoke(&t.info.id).unwrap());
        assert_eq!(auth.caller(&t.token), None);
        use std::os::unix::fs::PermissionsExt;
        for f in [OPERATOR_TOKEN_FILE, "auth/tokens.json"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn repositories_belong_to_their_first_pusher() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::open(dir.path()).unwrap();
        let a = Caller::Tenant("a".into());
        let b = Caller::Tenant("b".into());
        assert!(matches!(
            auth.repository_access(&a, "app", false),
            Err(Denied::Unknown(_))
        ));
        auth.repository_access(&a, "app", true).unwrap();
        auth.repository_access(&a, "app", false).unwrap();
        assert!(matches!(
            auth.repository_access(&b, "app", false),
            Err(Denied::Unknown(_))
        ));
        assert!(auth.repository_access(&b, "app", true).is_err());
        // The operator reads a tenant's repository but does not write into it.
        auth.repository_access(&Caller::Operator, "app", false)
            .unwrap();
        let e = auth
            .repository_access(&Caller::Operator, "app", true)
            .unwrap_err();
        assert!(e.message().contains("belongs to tenant \"a\""), "{e:?}");
        assert_eq!(auth.repository_owner("app").as_deref(), Some("a"));
        // What the operator pushes first belongs to tenant default.
        auth.repository_access(&Caller::Operator, "ops", true)
            .unwrap();
        assert!(auth.repository_access(&b, "ops", true).is_err());
        auth.repository_access(&Caller::Tenant("default".into()), "ops", false)
            .unwrap();
        drop(auth);
        let auth = Auth::open(dir.path()).unwrap();
        assert!(auth.repository_access(&b, "app", false).is_err());
    }
}
