//! The `containers-policy.json(5)` document and its evaluation for `docker` references.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use super::{Payload, SignatureError, SigstoreSignature, VerificationKey};
use crate::{Digest, Reference};

/// Largest policy document accepted.
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// A parsed containers-policy.json.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Requirements when no transport scope matches.
    default: Vec<Requirement>,
    /// Transport name → scope → requirements.
    #[serde(default)]
    transports: UniqueMap<UniqueMap<Vec<Requirement>>>,
}

/// A JSON object whose keys must be unique: with duplicate scopes, which one applies would be
/// the parser's choice, so such a policy is refused (as containers/image does).
#[derive(Debug, Clone)]
struct UniqueMap<V>(BTreeMap<String, V>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = m.next_entry::<String, V>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// One policy requirement. Every requirement of the selected scope must hold.
// A policy holds a handful of these; boxing the large variant would only complicate serde.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Requirement {
    /// Accept the image without any check.
    #[serde(rename = "insecureAcceptAnything")]
    InsecureAcceptAnything,
    /// Refuse the image.
    #[serde(rename = "reject")]
    Reject,
    /// GPG "simple signing" signatures: parsed, never satisfied (not supported).
    #[serde(rename = "signedBy", rename_all = "camelCase")]
    SignedBy {
        /// `GPGKeys`, `signedByGPGKeys`, …
        key_type: String,
        /// Keyring path.
        #[serde(default)]
        key_path: Option<String>,
        /// Keyring paths.
        #[serde(default)]
        key_paths: Option<Vec<String>>,
        /// Inline keyring (base64).
        #[serde(default)]
        key_data: Option<String>,
        /// Identity rule.
        #[serde(default)]
        signed_identity: Option<SignedIdentity>,
    },
    /// A cosign/sigstore signature by one of the given public keys.
    #[serde(rename = "sigstoreSigned", rename_all = "camelCase")]
    SigstoreSigned {
        /// Public key location (a `kbs:///…` resource inside a sandbox, a file for the CLI).
        #[serde(default)]
        key_path: Option<String>,
        /// Several public key locations; any of them may have signed.
        #[serde(default)]
        key_paths: Option<Vec<String>>,
        /// Inline public key (base64 of the PEM).
        #[serde(default)]
        key_data: Option<String>,
        /// Several inline public keys.
        #[serde(default)]
        key_datas: Option<Vec<String>>,
        /// Keyless (Fulcio certificate) rules: not supported.
        #[serde(default)]
        fulcio: Option<serde_json::Value>,
        /// Private PKI rules: not supported.
        #[serde(default)]
        pki: Option<serde_json::Value>,
        /// Rekor key (path): not supported.
        #[serde(default)]
        rekor_public_key_path: Option<String>,
        /// Rekor keys (paths): not supported.
        #[serde(default)]
        rekor_public_key_paths: Option<Vec<String>>,
        /// Rekor key (inline): not supported.
        #[serde(default)]
        rekor_public_key_data: Option<String>,
        /// Rekor keys (inline): not supported.
        #[serde(default)]
        rekor_public_key_datas: Option<Vec<String>>,
        /// Identity rule (default `matchRepoDigestOrExact`).
        #[serde(default)]
        signed_identity: Option<SignedIdentity>,
    },
}

/// How a signature's claimed identity must relate to the image reference.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum SignedIdentity {
    /// Identity equals the reference exactly.
    #[serde(rename = "matchExact")]
    MatchExact,
    /// Digest references: same repository; tagged references: exact.
    #[serde(rename = "matchRepoDigestOrExact")]
    MatchRepoDigestOrExact,
    /// Same repository, any tag.
    #[serde(rename = "matchRepository")]
    MatchRepository,
    /// Identity equals this reference, whatever the image reference.
    #[serde(rename = "exactReference", rename_all = "camelCase")]
    ExactReference {
        /// The required identity.
        docker_reference: String,
    },
    /// Identity is in this repository.
    #[serde(rename = "exactRepository", rename_all = "camelCase")]
    ExactRepository {
        /// The required repository.
        docker_repository: String,
    },
    /// Rewrite the image reference's `prefix` to `signedPrefix`, then
    /// `matchRepoDigestOrExact`.
    #[serde(rename = "remapIdentity", rename_all = "camelCase")]
    RemapIdentity {
        /// Prefix of the image reference.
        prefix: String,
        /// What the signer called it.
        signed_prefix: String,
    },
}

fn name(r: &Reference) -> String {
    format!("{}/{}", r.registry, r.repository)
}

/// Whether a reference string names a tag or digest itself (the parser would otherwise add
/// `:latest`, and an identity without a tag must not stand for `latest`).
fn has_tag_or_digest(s: &str) -> bool {
    s.contains('@')
        || (s.contains('/') && s.rsplit('/').next().is_some_and(|l| l.contains(':')))
        || (!s.contains('/') && s.contains(':'))
}

fn untagged_identity(identity: &str) -> String {
    format!(
        "the signed identity {identity} names no tag or digest (cosign signs the repository \
         alone): the policy needs matchRepository or exactRepository for it"
    )
}

fn parse_ref(s: &str, what: &str) -> Result<Reference, String> {
    s.parse::<Reference>()
        .map_err(|e| format!("{what} {s:?} is not an image reference: {e}"))
}

/// The image reference as `signedIdentity` rules see it: `name:tag` for tagged references,
/// `name@digest` for digest-only ones.
fn without_digest_if_tagged(r: &Reference) -> Reference {
    if r.tag.is_some() {
        Reference {
            digest: None,
            ..r.clone()
        }
    } else {
        r.clone()
    }
}

impl SignedIdentity {
    /// Whether a signature claiming `identity` is acceptable for an image deployed as `image`.
    fn accepts(&self, image: &Reference, identity: &str) -> Result<(), String> {
        let sig = parse_ref(identity, "the signed identity")?;
        let sig_tagged = has_tag_or_digest(identity);
        let image_t = without_digest_if_tagged(image);
        // The signature's identity is compared whole (a digest it names must match too).
        let sig_t = sig.clone();
        let repo_digest_or_exact = |img: &Reference| -> Result<(), String> {
            if img.tag.is_none() && img.digest.is_some() {
                if name(img) == name(&sig) {
                    return Ok(());
                }
                return Err(format!(
                    "signed for repository {}, not {}",
                    name(&sig),
                    name(img)
                ));
            }
            if !sig_tagged {
                return Err(untagged_identity(identity));
            }
            if without_digest_if_tagged(img) == sig_t {
                Ok(())
            } else {
                Err(format!(
                    "signed for {sig_t}, not {}",
                    without_digest_if_tagged(img)
                ))
            }
        };
        match self {
            SignedIdentity::MatchExact => {
                if !sig_tagged {
                    return Err(untagged_identity(identity));
                }
                if image_t == sig_t {
                    Ok(())
                } else {
                    Err(format!("signed for {sig_t}, not exactly {image_t}"))
                }
            }
            SignedIdentity::MatchRepoDigestOrExact => repo_digest_or_exact(image),
            SignedIdentity::MatchRepository => {
                if name(image) == name(&sig) {
                    Ok(())
                } else {
                    Err(format!(
                        "signed for repository {}, not {}",
                        name(&sig),
                        name(image)
                    ))
                }
            }
            SignedIdentity::ExactReference { docker_reference } => {
                let want = parse_ref(docker_reference, "exactReference dockerReference")?;
                if !sig_tagged {
                    return Err(untagged_identity(identity));
                }
                if want == sig_t {
                    Ok(())
                } else {
                    Err(format!("signed for {sig_t}, the policy requires {want}"))
                }
            }
            SignedIdentity::ExactRepository { docker_repository } => {
                let want = parse_ref(docker_repository, "exactRepository dockerRepository")?;
                if name(&want) == name(&sig) {
                    Ok(())
                } else {
                    Err(format!(
                        "signed for repository {}, the policy requires {}",
                        name(&sig),
                        name(&want)
                    ))
                }
            }
            SignedIdentity::RemapIdentity {
                prefix,
                signed_prefix,
            } => {
                // The prefix matches the image's name (registry/repository) exactly or up to
                // a `/`; tag and digest are kept.
                let full_name = name(image);
                let remapped = match full_name.strip_prefix(prefix.as_str()) {
                    Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                        let mut r =
                            parse_ref(&format!("{signed_prefix}{rest}"), "the remapped reference")?;
                        r.tag = image.tag.clone();
                        r.digest = image.digest.clone();
                        r
                    }
                    _ => image.clone(),
                };
                repo_digest_or_exact(&remapped)
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            SignedIdentity::ExactReference { docker_reference } => {
                parse_ref(docker_reference, "exactReference dockerReference")?;
                if !has_tag_or_digest(docker_reference) {
                    return Err(format!(
                        "exactReference dockerReference {docker_reference:?} needs a tag or digest"
                    ));
                }
                Ok(())
            }
            SignedIdentity::ExactRepository { docker_repository } => {
                parse_ref(docker_repository, "exactRepository dockerRepository").map(|_| ())
            }
            SignedIdentity::RemapIdentity {
                prefix,
                signed_prefix,
            } => {
                for (what, p) in [("prefix", prefix), ("signedPrefix", signed_prefix)] {
                    if p.is_empty()
                        || p.contains(['@', '*'])
                        || p.ends_with('/')
                        || (p.contains('/') && has_tag_or_digest(p))
                    {
                        return Err(format!(
                            "remapIdentity {what} {p:?} must be a host[:port] or a repository \
                             name, without tag, digest or wildcard"
                        ));
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Wildcard and namespace scopes of a `docker` reference, most specific first (after the
/// full reference itself).
fn docker_scopes(r: &Reference) -> Vec<String> {
    let mut out = Vec::new();
    let full = without_digest_if_tagged(r).to_string();
    out.push(full);
    let mut ns = name(r);
    loop {
        out.push(ns.clone());
        match ns.rfind('/') {
            Some(i) => ns.truncate(i),
            None => break,
        }
    }
    // *.example.com wildcards for the registry host (without port).
    let host = r.registry.split(':').next().unwrap_or_default();
    let mut rest = host;
    while let Some((_, tail)) = rest.split_once('.') {
        out.push(format!("*.{tail}"));
        rest = tail;
    }
    out
}

/// Inputs for evaluating the policy for one image.
pub struct Subject<'a> {
    /// The image reference as deployed.
    pub reference: &'a Reference,
    /// The manifest digest being run.
    pub manifest_digest: &'a Digest,
    /// The signatures found for that digest.
    pub signatures: &'a [SigstoreSignature],
}

impl Policy {
    /// Parse and validate a policy document.
    pub fn parse(bytes: &[u8]) -> Result<Policy, SignatureError> {
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(SignatureError::InvalidPolicy(format!(
                "the document exceeds {MAX_POLICY_BYTES} bytes"
            )));
        }
        let p: Policy = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's messages quote the offending values; the document may not even be a
            // policy (the host chose which broker resource to name), so only say where and what
            // kind of problem it is, never what the bytes were.
            use serde_json::error::Category;
            let what = match e.classify() {
                Category::Syntax => "malformed JSON",
                Category::Eof => "truncated JSON",
                Category::Io => "unreadable",
                Category::Data if e.to_string().starts_with("missing field `default`") => {
                    "the required `default` requirement list is missing"
                }
                Category::Data => {
                    "not the containers-policy.json structure (unknown or misspelt requirement \
                     type, field or identity rule, a duplicate key, or a value of the wrong type)"
                }
            };
            SignatureError::InvalidPolicy(format!(
                "{what} at line {}, column {}",
                e.line(),
                e.column()
            ))
        })?;
        p.validate().map_err(SignatureError::InvalidPolicy)?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), String> {
        let check = |reqs: &[Requirement], where_: &str| -> Result<(), String> {
            if reqs.is_empty() {
                return Err(format!(
                    "{where_}: an empty requirement list is not allowed"
                ));
            }
            for r in reqs {
                match r {
                    Requirement::SigstoreSigned {
                        key_path,
                        key_paths,
                        key_data,
                        key_datas,
                        fulcio,
                        pki,
                        signed_identity,
                        ..
                    } => {
                        let sources = [
                            key_path.is_some(),
                            key_paths.is_some(),
                            key_data.is_some(),
                            key_datas.is_some(),
                            fulcio.is_some(),
                            pki.is_some(),
                        ]
                        .iter()
                        .filter(|b| **b)
                        .count();
                        if sources != 1 {
                            return Err(format!(
                                "{where_}: sigstoreSigned needs exactly one of keyPath, keyPaths, \
                                 keyData, keyDatas, fulcio or pki"
                            ));
                        }
                        if matches!(key_paths, Some(v) if v.is_empty())
                            || matches!(key_datas, Some(v) if v.is_empty())
                        {
                            return Err(format!("{where_}: sigstoreSigned has an empty key list"));
                        }
                        if let Some(id) = signed_identity {
                            id.validate().map_err(|e| format!("{where_}: {e}"))?;
                        }
                    }
                    Requirement::SignedBy {
                        signed_identity: Some(id),
                        ..
                    } => id.validate().map_err(|e| format!("{where_}: {e}"))?,
                    _ => {}
                }
            }
            Ok(())
        };
        check(&self.default, "default")?;
        for (transport, scopes) in &self.transports.0 {
            for (scope, reqs) in &scopes.0 {
                check(reqs, &format!("transports.{transport}[{scope:?}]"))?;
            }
        }
        Ok(())
    }

    /// The requirements for a `docker` image reference, and the scope that selected them.
    pub fn requirements_for(&self, r: &Reference) -> (&[Requirement], String) {
        if let Some(scopes) = self.transports.0.get("docker") {
            for s in docker_scopes(r) {
                if let Some(reqs) = scopes.0.get(&s) {
                    return (reqs, format!("docker scope {s:?}"));
                }
            }
            if let Some(reqs) = scopes.0.get("") {
                return (reqs, "the docker transport default".into());
            }
        }
        (&self.default, "the policy default".into())
    }

    /// Every key location (`keyPath`/`keyPaths`) the requirements for `r` name; the caller
    /// fetches them and passes them to [`Policy::evaluate`].
    pub fn key_paths_for(&self, r: &Reference) -> Vec<String> {
        let mut out = Vec::new();
        for req in self.requirements_for(r).0 {
            if let Requirement::SigstoreSigned {
                key_path,
                key_paths,
                ..
            } = req
            {
                out.extend(key_path.iter().cloned());
                out.extend(key_paths.iter().flatten().cloned());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether the policy accepts `subject`. `keys` maps every location from
    /// [`Policy::key_paths_for`] to the PEM bytes found there. On success, says which scope
    /// decided and how (for logs).
    pub fn evaluate(
        &self,
        subject: &Subject<'_>,
        keys: &BTreeMap<String, Vec<u8>>,
    ) -> Result<String, SignatureError> {
        let image = subject.reference.to_string();
        let reject = |reason: String| SignatureError::Rejected {
            image: image.clone(),
            reason,
        };
        let (reqs, scope) = self.requirements_for(subject.reference);
        let mut how = Vec::new();
        for req in reqs {
            match req {
                Requirement::InsecureAcceptAnything => how.push("insecureAcceptAnything"),
                Requirement::Reject => {
                    return Err(reject(format!("{scope} says reject")));
                }
                Requirement::SignedBy { .. } => {
                    return Err(reject(format!(
                        "{scope} requires a GPG signature (signedBy), which veil does not \
                         verify; use sigstoreSigned"
                    )));
                }
                Requirement::SigstoreSigned {
                    key_path,
                    key_paths,
                    key_data,
                    key_datas,
                    fulcio,
                    pki,
                    rekor_public_key_path,
                    rekor_public_key_paths,
                    rekor_public_key_data,
                    rekor_public_key_datas,
                    signed_identity,
                } => {
                    if fulcio.is_some() || pki.is_some() {
                        return Err(reject(format!(
                            "{scope} requires keyless (Fulcio/PKI) signatures, which veil does \
                             not verify; use public keys"
                        )));
                    }
                    if rekor_public_key_path.is_some()
                        || rekor_public_key_paths.is_some()
                        || rekor_public_key_data.is_some()
                        || rekor_public_key_datas.is_some()
                    {
                        return Err(reject(format!(
                            "{scope} requires Rekor transparency-log proofs, which veil does not \
                             verify"
                        )));
                    }
                    let mut vkeys = Vec::new();
                    for p in key_path.iter().chain(key_paths.iter().flatten()) {
                        let pem = keys.get(p).ok_or_else(|| {
                            reject(format!("{scope}: public key {p} was not provided"))
                        })?;
                        vkeys.push(
                            VerificationKey::from_pem(pem, p.clone())
                                .map_err(|e| reject(format!("{scope}: {e}")))?,
                        );
                    }
                    for (i, d) in key_data
                        .iter()
                        .chain(key_datas.iter().flatten())
                        .enumerate()
                    {
                        let which = format!("keyData #{}", i + 1);
                        let pem = STANDARD
                            .decode(d.trim())
                            .map_err(|e| reject(format!("{scope}: {which} is not base64: {e}")))?;
                        vkeys.push(
                            VerificationKey::from_pem(&pem, which)
                                .map_err(|e| reject(format!("{scope}: {e}")))?,
                        );
                    }
                    let rule = signed_identity
                        .clone()
                        .unwrap_or(SignedIdentity::MatchRepoDigestOrExact);
                    check_sigstore(subject, &vkeys, &rule)
                        .map_err(|e| reject(format!("{scope}: {e}")))?;
                    how.push("sigstoreSigned");
                }
            }
        }
        Ok(format!("{scope}: {}", how.join(", ")))
    }
}

/// At least one signature must verify under one of `keys`, name the manifest digest, and carry
/// an identity `rule` accepts.
fn check_sigstore(
    subject: &Subject<'_>,
    keys: &[VerificationKey],
    rule: &SignedIdentity,
) -> Result<(), String> {
    if subject.signatures.is_empty() {
        return Err(format!(
            "no sigstore signature was found for {}",
            subject.manifest_digest
        ));
    }
    let mut why = Vec::new();
    for (i, sig) in subject
        .signatures
        .iter()
        .take(super::MAX_SIGNATURES)
        .enumerate()
    {
        let n = i + 1;
        let Some(_key) = keys
            .iter()
            .find(|k| k.verifies(&sig.payload, &sig.signature))
        else {
            why.push(format!(
                "signature {n} does not verify with any accepted key"
            ));
            continue;
        };
        let payload = match Payload::parse(&sig.payload) {
            Ok(p) => p,
            Err(e) => {
                why.push(format!("signature {n}: {e}"));
                continue;
            }
        };
        if &payload.manifest_digest != subject.manifest_digest {
            why.push(format!(
                "signature {n} signs {}, not the image's manifest {}",
                payload.manifest_digest, subject.manifest_digest
            ));
            continue;
        }
        match rule.accepts(subject.reference, &payload.identity) {
            Ok(()) => return Ok(()),
            Err(e) => why.push(format!("signature {n}: {e}")),
        }
    }
    Err(why.join("; "))
}
