//! Image references: `[registry/]repository[:tag][@digest]`.

use std::fmt;
use std::str::FromStr;

use crate::{Digest, Error};

/// The default registry for references without an explicit registry.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The pseudo-registry naming veil's node-local image store.
pub const LOCAL_REGISTRY: &str = "local";
/// The tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed image reference: `[registry/]repository[:tag][@digest]`.
///
/// * The first path component is a registry if it contains `.` or `:` or is
///   `localhost`; otherwise the registry is `docker.io`, and a
///   single-component repository gets the `library/` prefix.
/// * A first component of exactly `local` (e.g. `local/hello:v1`) names
///   veil's node-local image store: registry `local`, repository `hello`.
/// * The tag defaults to `latest` when neither tag nor digest is given.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host (with optional port), `docker.io`, or `local`.
    pub registry: String,
    /// Repository path, e.g. `library/alpine`.
    pub repository: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest, if any.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Whether this reference names veil's node-local image store.
    pub fn is_local(&self) -> bool {
        self.registry == LOCAL_REGISTRY
    }

    /// The string to put in a registry `/manifests/<reference>` URL: the
    /// digest if set, else the tag (or `latest`).
    pub fn reference_str(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// A copy of this reference pinned to `d` (the tag is kept).
    pub fn with_digest(&self, d: Digest) -> Reference {
        Reference {
            digest: Some(d),
            ..self.clone()
        }
    }
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| Error::InvalidReference {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(err("the reference is empty".into()));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(
                "the reference contains whitespace or control characters".into(),
            ));
        }

        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let digest = d.parse::<Digest>().map_err(|e| err(e.to_string()))?;
                (rest, Some(digest))
            }
            None => (s, None),
        };

        // A tag separator is a ':' after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&rest[..i], Some(rest[i + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            validate_tag(t).map_err(err)?;
        }
        if name.is_empty() {
            return Err(err("the repository name is empty".into()));
        }

        let (registry, repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                validate_registry(first).map_err(err)?;
                let repo = if first == DEFAULT_REGISTRY && !remainder.contains('/') {
                    format!("library/{remainder}")
                } else {
                    remainder.to_string()
                };
                (first.to_string(), repo)
            }
            Some((first, remainder)) if first == LOCAL_REGISTRY => {
                (LOCAL_REGISTRY.to_string(), remainder.to_string())
            }
            Some(_) => (DEFAULT_REGISTRY.to_string(), name.to_string()),
            None => (DEFAULT_REGISTRY.to_string(), format!("library/{name}")),
        };
        validate_repository(&repository).map_err(err)?;

        let tag = if tag.is_none() && digest.is_none() {
            Some(DEFAULT_TAG.to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

pub(crate) fn validate_tag(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("the tag after ':' is empty".into());
    }
    if t.len() > MAX_TAG_LEN {
        return Err(format!("the tag is longer than {MAX_TAG_LEN} characters"));
    }
    let mut bytes = t.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !first_ok || !rest_ok {
        return Err(format!(
            "the tag {t:?} is invalid: it must match [A-Za-z0-9_][A-Za-z0-9_.-]*"
        ));
    }
    Ok(())
}

fn validate_registry(r: &str) -> Result<(), String> {
    let ok = !r.is_empty()
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !ok {
        return Err(format!(
            "the registry {r:?} is invalid: it must be a host name or address with an optional port"
        ));
    }
    if let Some((_, port)) = r.rsplit_once(':') {
        if !r.ends_with(']') && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit())) {
            return Err(format!("the registry {r:?} has an invalid port"));
        }
    }
    Ok(())
}

fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.len() > MAX_NAME_LEN {
        return Err(format!(
            "the repository name is longer than {MAX_NAME_LEN} characters"
        ));
    }
    for comp in repo.split('/') {
        if !valid_component(comp) {
            return Err(format!(
                "the repository component {comp:?} is invalid: components must be lowercase \
                 letters and digits, optionally separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // One run of alphanumerics.
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // One separator.
        let sep_start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[sep_start..i];
        let sep_ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !sep_ok {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse_table() {
        let cases: &[(&str, &str, &str, Option<&str>, bool)] = &[
            (
                "alpine",
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
            ),
            (
                "alpine:3.19",
                "docker.io",
                "library/alpine",
                Some("3.19"),
                false,
            ),
            ("user/app", "docker.io", "user/app", Some("latest"), false),
            (
                "docker.io/alpine",
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
            ),
            (
                "docker.io/library/alpine:3",
                "docker.io",
                "library/alpine",
                Some("3"),
                false,
            ),
            ("localhost/a", "localhost", "a", Some("latest"), false),
            (
                "localhost:5000/a/b:t",
                "localhost:5000",
                "a/b",
                Some("t"),
                false,
            ),
            ("127.0.0.1:5000/x@", "127.0.0.1:5000", "x", None, true),
            (
                "ghcr.io/o/r/s:v1.2-rc_3",
                "ghcr.io",
                "o/r/s",
                Some("v1.2-rc_3"),
                false,
            ),
            ("local/hello:v1", "local", "hello", Some("v1"), false),
            ("local/a/b", "local", "a/b", Some("latest"), false),
            (
                "a__b/c-d--e/f.g_h",
                "docker.io",
                "a__b/c-d--e/f.g_h",
                Some("latest"),
                false,
            ),
        ];
        for (input, reg, repo, tag, with_digest) in cases {
            let input = if *with_digest {
                format!("{input}{D}")
            } else {
                input.to_string()
            };
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry, *reg, "{input}");
            assert_eq!(r.repository, *repo, "{input}");
            assert_eq!(r.tag.as_deref(), *tag, "{input}");
            assert_eq!(r.digest.is_some(), *with_digest, "{input}");
            // Display round-trips.
            let again: Reference = r.to_string().parse().unwrap();
            assert_eq!(again, r, "{input} -> {r}");
        }
    }

    #[test]
    fn digest_and_tag() {
        let r: Reference = format!("localhost:5000/x:t@{D}").parse().unwrap();
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.digest.as_ref().unwrap().as_str(), D);
        assert_eq!(r.reference_str(), D);
        assert_eq!(r.to_string(), format!("localhost:5000/x:t@{D}"));

        let r: Reference = "127.0.0.1:5000/x".parse().unwrap();
        assert_eq!(r.reference_str(), "latest");
        let pinned = r.with_digest(D.parse().unwrap());
        assert_eq!(pinned.reference_str(), D);
        assert_eq!(pinned.tag.as_deref(), Some("latest"));
    }

    #[test]
    fn local_refs() {
        let r: Reference = "local/hello:v1".parse().unwrap();
        assert!(r.is_local());
        assert_eq!(r.to_string(), "local/hello:v1");
        let r: Reference = "hello:v1".parse().unwrap();
        assert!(!r.is_local());
        assert_eq!(r.to_string(), "docker.io/library/hello:v1");
    }

    #[test]
    fn invalid_refs() {
        for bad in [
            "",
            "Alpine",
            "docker.io/Foo/bar",
            "alpine:",
            "alpine:-bad",
            "alpine:bad!tag",
            &format!("alpine:{}", "a".repeat(129)),
            "alpine@sha256:1234",
            "alpine@md5:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "a//b",
            "/a",
            "a/",
            "a..b",
            "a_-b",
            "-a",
            "a b",
            "localhost:port/x",
            "local/",
            "docker.io/",
            &"a".repeat(300),
        ] {
            let e = bad.parse::<Reference>().unwrap_err();
            assert!(matches!(e, Error::InvalidReference { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("invalid image reference"));
        }
    }
}
