//! The software TEE: **insecure**, for development and tests only.
//!
//! On the wire it is Confidential Containers' *sample* TEE (`"tee": "sample"`): the evidence is
//! trustee's sample evidence `{"svn", "report_data"}` (report data in base64, exactly as bound,
//! not padded), so trustee's KBS accepts it where its policy allows sample evidence, extended
//! with veil's part under `veil`: a self-declared measurement (by default the SHA-384 of the
//! running agent binary) and the endorsement below. No hardware signs it, so it proves nothing
//! about the sandbox's memory; that is why the claims are marked `insecure` and a key broker
//! accepts them only when its policy explicitly allows the software TEE.
//!
//! It must not turn a broker into an open store either, so the evidence is **endorsed by the
//! host** that started the sandbox: when a node assigns a sandbox to a tenant's function, it
//! generates a fresh Ed25519 key for that sandbox, signs an [`Endorsement`] naming the sandbox,
//! the tenant, the function and that key with its long-lived *host key*, and hands both to the
//! sandbox over its private channel. The agent signs its evidence with the sandbox key; a
//! verifier accepts only evidence whose endorsement verifies with a host key it was told to
//! trust, is within its validity, and whose evidence signature verifies with the endorsed key.
//! The broker then requires the endorsed tenant and function to be the ones the sandbox asks
//! for. A local process without the host key cannot produce acceptable evidence.
//!
//! Plain sample evidence without veil's part (what trustee's client sends) is refused, unless
//! the verifier is told to accept it ([`SoftwareVerifier::accepting_unendorsed`]): then it
//! proves nothing at all, which its claims say.
//!
//! What this still trusts is exactly **the host**: whoever holds the host key (the node's
//! operator, or anyone who can read the node's state directory or its memory) can endorse
//! anything, and can read the sandbox's memory anyway. Only SEV-SNP or TDX evidence protects a
//! function from the host.

use crate::{check_report_data, Attester, Claims, Error, TeeKind, Verifier, REPORT_DATA_LEN};
use base64::engine::general_purpose::{STANDARD as STD_B64, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Marker every software evidence carries, so no one mistakes it for hardware evidence.
pub const WARNING: &str = "INSECURE software TEE: this evidence proves nothing; development only";

/// What an endorsement trusts, for logs and documentation.
pub const TRUSTS: &str = "the software TEE trusts the host: evidence is accepted only from \
sandboxes a trusted node started and endorsed for the tenant, but that node (and anyone holding \
its host key) can read the sandbox and endorse anything";

/// Domain separation of the two signed messages.
const EVIDENCE_CONTEXT: &[u8] = b"veil software-TEE evidence v2\0";
const ENDORSEMENT_CONTEXT: &[u8] = b"veil software-TEE endorsement v1\0";

/// Largest endorsement the verifier parses (it is a few hundred bytes).
const MAX_ENDORSEMENT: usize = 4096;

/// The evidence on the wire: the *sample* evidence of Confidential Containers (`svn` and the
/// base64 `report_data`, what trustee's client sends and trustee's KBS accepts), extended with
/// veil's host endorsement under `veil`. Trustee ignores the extension; veil's broker requires
/// it unless its operator accepts unendorsed sample evidence from anyone.
#[derive(Debug, Serialize, Deserialize)]
struct Evidence {
    svn: String,
    #[serde(default)]
    report_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    veil: Option<Endorsed>,
}

/// veil's extension of sample evidence.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Endorsed {
    warning: String,
    measurement: String,
    #[serde(default)]
    init_data: String,
    /// The host's endorsement of the sandbox key (`<payload>.<signature>`, base64url).
    endorsement: String,
    /// The sandbox key's signature over the evidence (base64url).
    signature: String,
}

/// The `svn` veil's software attester declares (trustee's sample attester declares the same).
pub const SAMPLE_SVN: &str = "1";

/// What unendorsed sample evidence trusts.
pub const UNENDORSED_TRUSTS: &str =
    "nothing: unendorsed sample evidence can be made up by anyone who can reach the broker";

/// What a host vouches for: a sandbox it started, the tenant and function it assigned it to,
/// and the key that sandbox signs its evidence with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endorsement {
    /// The host key that signed this (Ed25519, hex).
    pub host: String,
    /// The sandbox's id on that host.
    pub sandbox: String,
    /// The tenant the sandbox was assigned to.
    pub tenant: String,
    /// The function the sandbox was assigned to.
    pub function: String,
    /// The sandbox's evidence-signing key (Ed25519, hex).
    pub key: String,
    /// Valid from (seconds since the epoch).
    pub not_before: u64,
    /// Valid until (seconds since the epoch).
    pub not_after: u64,
}

/// What a sandbox receives from its host: its evidence-signing key and the host's endorsement.
pub struct Credential {
    /// The sandbox's Ed25519 signing key (32-byte seed, hex).
    pub signing_key: String,
    /// The endorsement (`<payload>.<signature>`, base64url).
    pub endorsement: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("signing_key", &"<redacted>")
            .field("endorsement", &self.endorsement)
            .finish()
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_seed() -> [u8; 32] {
    rand::random()
}

/// A host's long-lived endorsement key. Keep it readable by the node only: it is what a
/// broker that accepts the software TEE trusts.
pub struct HostKey {
    key: SigningKey,
}

impl HostKey {
    /// A fresh key (tests).
    pub fn generate() -> Self {
        Self {
            key: SigningKey::from_bytes(&random_seed()),
        }
    }

    /// Load the key from `path` (hex seed), creating it (mode 0600) with its public key beside
    /// it (`<path>.pub`) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, Error> {
        let io =
            |e: std::io::Error| Error::Io(format!("software-TEE host key {}: {e}", path.display()));
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        Error::Io(format!(
                            "software-TEE host key {} is not a 32-byte hex seed",
                            path.display()
                        ))
                    })?;
                Ok(Self {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let me = Self::generate();
                let tmp = path.with_extension("tmp");
                {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let _ = std::fs::remove_file(&tmp);
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)
                        .map_err(io)?;
                    f.write_all(hex::encode(me.key.to_bytes()).as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(io)?;
                }
                std::fs::rename(&tmp, path).map_err(io)?;
                std::fs::write(Self::public_path(path), me.public_hex()).map_err(io)?;
                Ok(me)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Where [`HostKey::load_or_create`] writes the public key of the key at `path`.
    pub fn public_path(path: &Path) -> std::path::PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".pub");
        p.into()
    }

    /// The public key (hex), what a broker is told to trust.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// Endorse a fresh key for `sandbox`, assigned to `tenant`'s `function`, valid for `ttl`
    /// from `now`.
    pub fn endorse(
        &self,
        sandbox: &str,
        tenant: &str,
        function: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Credential {
        let sandbox_key = SigningKey::from_bytes(&random_seed());
        let e = Endorsement {
            host: self.public_hex(),
            sandbox: sandbox.to_string(),
            tenant: tenant.to_string(),
            function: function.to_string(),
            key: hex::encode(sandbox_key.verifying_key().as_bytes()),
            not_before: secs(now).saturating_sub(60),
            not_after: secs(now + ttl),
        };
        // Serialising a struct of strings and integers cannot fail.
        let payload = serde_json::to_vec(&e).unwrap_or_default();
        let sig = self
            .key
            .sign(&[ENDORSEMENT_CONTEXT, payload.as_slice()].concat());
        Credential {
            signing_key: hex::encode(sandbox_key.to_bytes()),
            endorsement: format!("{}.{}", B64.encode(&payload), B64.encode(sig.to_bytes())),
        }
    }
}

fn evidence_message(svn: &str, report_data: &str, measurement: &str, init_data: &str) -> Vec<u8> {
    let mut m = EVIDENCE_CONTEXT.to_vec();
    for part in [svn, report_data, measurement, init_data] {
        m.extend_from_slice(&(part.len() as u32).to_be_bytes());
        m.extend_from_slice(part.as_bytes());
    }
    m
}

/// The software attester.
pub struct SoftwareAttester {
    measurement: String,
    init_data: String,
    key: SigningKey,
    endorsement: String,
}

impl SoftwareAttester {
    /// An attester declaring `measurement` (hex) and `init_data` (hex), signing with the
    /// credential its host gave it.
    pub fn new(measurement: &str, init_data: &str, credential: &Credential) -> Result<Self, Error> {
        tracing::warn!("{WARNING}");
        let seed: [u8; 32] = hex::decode(&credential.signing_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| malformed("the host's sandbox signing key is not a 32-byte hex seed"))?;
        Ok(Self {
            measurement: measurement.to_string(),
            init_data: init_data.to_string(),
            key: SigningKey::from_bytes(&seed),
            endorsement: credential.endorsement.clone(),
        })
    }
}

impl Attester for SoftwareAttester {
    fn tee(&self) -> TeeKind {
        TeeKind::Software
    }

    /// Sample evidence carrying `report_data` as given (not padded: trustee's sample verifier
    /// compares it byte for byte with its binding), signed and endorsed.
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, Error> {
        if report_data.len() > REPORT_DATA_LEN {
            return Err(malformed(format!(
                "report data is {} bytes, at most {REPORT_DATA_LEN}",
                report_data.len()
            )));
        }
        let rd = STD_B64.encode(report_data);
        let sig = self.key.sign(&evidence_message(
            SAMPLE_SVN,
            &rd,
            &self.measurement,
            &self.init_data,
        ));
        serde_json::to_value(Evidence {
            svn: SAMPLE_SVN.into(),
            report_data: rd,
            veil: Some(Endorsed {
                warning: WARNING.into(),
                measurement: self.measurement.clone(),
                init_data: self.init_data.clone(),
                endorsement: self.endorsement.clone(),
                signature: B64.encode(sig.to_bytes()),
            }),
        })
        .map_err(|e| Error::Io(e.to_string()))
    }
}

/// The software verifier: checks the host's endorsement and the evidence signature, the
/// binding, and marks the claims insecure. With no trusted host keys it accepts nothing, unless
/// told to accept unendorsed sample evidence ([`SoftwareVerifier::accepting_unendorsed`]).
#[derive(Default)]
pub struct SoftwareVerifier {
    hosts: Vec<VerifyingKey>,
    accept_unendorsed: bool,
}

impl SoftwareVerifier {
    /// A verifier trusting the endorsements of these host keys (Ed25519, hex).
    pub fn trusting(hosts: &[String]) -> Result<Self, Error> {
        let hosts = hosts
            .iter()
            .map(|h| {
                parse_key(h).ok_or_else(|| {
                    Error::Io(format!(
                        "software-TEE host key {h:?} is not a 32-byte Ed25519 public key in hex"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            hosts,
            accept_unendorsed: false,
        })
    }

    /// Also accept sample evidence that carries no endorsement (what trustee's sample attester
    /// sends), with claims that say it is unendorsed. It proves nothing, and anyone can make it
    /// up: the equivalent of trustee's KBS accepting sample evidence. Evidence that carries an
    /// endorsement must still verify: a bad endorsement is never downgraded to none. (Anyone
    /// relaying the evidence can still remove the endorsement; the result is unendorsed
    /// evidence, which names no tenant.)
    pub fn accepting_unendorsed(mut self, yes: bool) -> Self {
        self.accept_unendorsed = yes;
        self
    }
}

fn parse_key(hex_key: &str) -> Option<VerifyingKey> {
    let b: [u8; 32] = hex::decode(hex_key.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&b).ok()
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        tee: TeeKind::Software,
        reason: reason.into(),
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Invalid {
        tee: TeeKind::Software,
        reason: reason.into(),
    }
}

fn hex_field(name: &str, v: &str, max: usize) -> Result<Vec<u8>, Error> {
    let b = hex::decode(v).map_err(|e| malformed(format!("{name} is not hex: {e}")))?;
    if b.len() > max {
        return Err(malformed(format!("{name} is longer than {max} bytes")));
    }
    Ok(b)
}

fn signature(b64: &str, what: &str) -> Result<Signature, Error> {
    let b: [u8; 64] = B64
        .decode(b64)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed(format!("{what} is not a base64url Ed25519 signature")))?;
    Ok(Signature::from_bytes(&b))
}

impl SoftwareVerifier {
    /// Check an endorsement (`<payload>.<signature>`) against the trusted hosts and `now`.
    pub fn check_endorsement(
        &self,
        endorsement: &str,
        now: SystemTime,
    ) -> Result<Endorsement, Error> {
        if endorsement.len() > MAX_ENDORSEMENT {
            return Err(malformed("endorsement is too long"));
        }
        let (payload, sig) = endorsement
            .split_once('.')
            .ok_or_else(|| malformed("endorsement is not <payload>.<signature>"))?;
        let payload = B64
            .decode(payload)
            .map_err(|_| malformed("endorsement payload is not base64url"))?;
        let sig = signature(sig, "endorsement signature")?;
        let e: Endorsement = serde_json::from_slice(&payload)
            .map_err(|err| malformed(format!("endorsement payload: {err}")))?;
        let host = self
            .hosts
            .iter()
            .find(|k| parse_key(&e.host).as_ref() == Some(*k))
            .ok_or_else(|| {
                invalid(format!(
                    "not endorsed by a host this broker trusts (endorsing host key {:?}); \
                     software evidence is accepted only from sandboxes a trusted node started",
                    e.host.chars().take(64).collect::<String>()
                ))
            })?;
        host.verify(&[ENDORSEMENT_CONTEXT, payload.as_slice()].concat(), &sig)
            .map_err(|_| invalid("the host's endorsement signature does not verify"))?;
        let t = secs(now);
        if t < e.not_before || t > e.not_after {
            return Err(invalid(format!(
                "the host's endorsement is valid from {} to {} (now {t})",
                e.not_before, e.not_after
            )));
        }
        Ok(e)
    }
}

impl Verifier for SoftwareVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Software
    }

    fn verify(
        &self,
        evidence: &serde_json::Value,
        expected_report_data: &[u8; REPORT_DATA_LEN],
        now: SystemTime,
    ) -> Result<Claims, Error> {
        let ev: Evidence =
            serde_json::from_value(evidence.clone()).map_err(|e| malformed(e.to_string()))?;
        if ev.svn.len() > 64 {
            return Err(malformed("svn is longer than 64 characters"));
        }
        let rd = STD_B64
            .decode(ev.report_data.trim())
            .map_err(|e| malformed(format!("report_data is not base64: {e}")))?;
        if rd.len() > REPORT_DATA_LEN {
            return Err(malformed(format!(
                "report_data is longer than {REPORT_DATA_LEN} bytes"
            )));
        }
        let Some(veil) = ev.veil else {
            if !self.accept_unendorsed {
                return Err(invalid(
                    "sample evidence without a host endorsement: anyone can make it up, and this \
                     broker accepts software evidence only from sandboxes a trusted node \
                     started and endorsed",
                ));
            }
            check_report_data(
                TeeKind::Software,
                &crate::pad_report_data(TeeKind::Software, &rd)?,
                expected_report_data,
            )?;
            return Ok(Claims {
                tee: TeeKind::Software,
                insecure: true,
                measurement: String::new(),
                report_data: hex::encode(&rd),
                init_data: String::new(),
                debug: false,
                details: serde_json::json!({
                    "warning": WARNING,
                    "trusts": UNENDORSED_TRUSTS,
                    "svn": ev.svn,
                    "endorsement": null,
                }),
            });
        };
        if veil.warning != WARNING {
            return Err(malformed("missing the insecure-TEE warning"));
        }
        hex_field("measurement", &veil.measurement, 64)?;
        hex_field("init_data", &veil.init_data, 64)?;
        let endorsement = self.check_endorsement(&veil.endorsement, now)?;
        let key = parse_key(&endorsement.key)
            .ok_or_else(|| malformed("the endorsed sandbox key is not an Ed25519 public key"))?;
        key.verify(
            &evidence_message(&ev.svn, &ev.report_data, &veil.measurement, &veil.init_data),
            &signature(&veil.signature, "evidence signature")?,
        )
        .map_err(|_| invalid("the evidence is not signed by the endorsed sandbox key"))?;
        check_report_data(
            TeeKind::Software,
            &crate::pad_report_data(TeeKind::Software, &rd)?,
            expected_report_data,
        )?;
        Ok(Claims {
            tee: TeeKind::Software,
            insecure: true,
            measurement: veil.measurement.to_lowercase(),
            report_data: hex::encode(&rd),
            init_data: veil.init_data.to_lowercase(),
            debug: false,
            details: serde_json::json!({
                "warning": WARNING,
                "trusts": TRUSTS,
                "svn": ev.svn,
                "endorsement": {
                    "host": endorsement.host,
                    "sandbox": endorsement.sandbox,
                    "tenant": endorsement.tenant,
                    "function": endorsement.function,
                },
            }),
        })
    }
}

/// The tenant and function a verified software claim was endorsed for, if `claims` are
/// software claims from [`SoftwareVerifier`].
pub fn endorsed_for(claims: &Claims) -> Option<(&str, &str)> {
    if claims.tee != TeeKind::Software {
        return None;
    }
    let e = claims.details.get("endorsement")?;
    Some((e.get("tenant")?.as_str()?, e.get("function")?.as_str()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::now()
    }

    fn setup() -> (HostKey, SoftwareVerifier) {
        let host = HostKey::generate();
        let v = SoftwareVerifier::trusting(&[host.public_hex()]).unwrap();
        (host, v)
    }

    fn attester(host: &HostKey) -> SoftwareAttester {
        let c = host.endorse("sb-1", "acme", "hello", now(), Duration::from_secs(600));
        SoftwareAttester::new("ab", "cd", &c).unwrap()
    }

    #[test]
    fn round_trip_and_binding() {
        let (host, v) = setup();
        let a = attester(&host);
        let rd = [7u8; 64];
        let ev = a.evidence(&rd).unwrap();
        let c = v.verify(&ev, &rd, now()).unwrap();
        assert!(c.insecure);
        assert_eq!(c.measurement, "ab");
        assert_eq!(c.init_data, "cd");
        assert_eq!(endorsed_for(&c), Some(("acme", "hello")));
        let e = v.verify(&ev, &[8u8; 64], now()).unwrap_err();
        assert!(matches!(e, Error::ReportDataMismatch { .. }), "{e}");
        assert!(e.to_string().contains("INSECURE"), "{e}");
    }

    /// Evidence made up by a process that has no host key: unsigned, self-endorsed, or with a
    /// tampered field. None passes.
    #[test]
    fn forged_evidence_is_refused() {
        let (host, v) = setup();
        let rd = [1u8; 64];
        let good = attester(&host).evidence(&rd).unwrap();

        // A verifier that trusts no host accepts nothing, not even genuine evidence.
        let e = SoftwareVerifier::default()
            .verify(&good, &rd, now())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("not endorsed by a host this broker trusts"),
            "{e}"
        );

        // Plain sample evidence (what trustee's sample attester sends): refused unless the
        // verifier accepts unendorsed evidence, and then marked as such.
        let unsigned = serde_json::json!({"svn": "1", "report_data": STD_B64.encode(&rd[..48])});
        let e = v.verify(&unsigned, &rd, now()).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("without a host endorsement"), "{e}");
        let open = SoftwareVerifier::default().accepting_unendorsed(true);
        let mut padded = [0u8; 64];
        padded[..48].copy_from_slice(&rd[..48]);
        let c = open.verify(&unsigned, &padded, now()).unwrap();
        assert!(c.insecure && endorsed_for(&c).is_none());
        assert_eq!(c.details["trusts"], UNENDORSED_TRUSTS);
        // ... but a bad endorsement is never downgraded to "unendorsed".
        let forged_for_open = attester(&HostKey::generate()).evidence(&rd).unwrap();
        assert!(open.verify(&forged_for_open, &rd, now()).is_err());

        // A self-made host key endorsing itself.
        let rogue = HostKey::generate();
        let forged = attester(&rogue).evidence(&rd).unwrap();
        let e = v.verify(&forged, &rd, now()).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e}");

        // A genuine endorsement whose payload names another tenant (signature then fails).
        let mut ev = good.clone();
        let endorsement = ev["veil"]["endorsement"].as_str().unwrap().to_string();
        let (p, s) = endorsement.split_once('.').unwrap();
        let mut payload: Endorsement = serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
        payload.tenant = "victim".into();
        let p2 = B64.encode(serde_json::to_vec(&payload).unwrap());
        ev["veil"]["endorsement"] = format!("{p2}.{s}").into();
        let e = v.verify(&ev, &rd, now()).unwrap_err();
        assert!(
            e.to_string()
                .contains("endorsement signature does not verify"),
            "{e}"
        );

        // A genuine endorsement with evidence signed by another key.
        let mut ev = forged.clone();
        ev["veil"]["endorsement"] = good["veil"]["endorsement"].clone();
        let e = v.verify(&ev, &rd, now()).unwrap_err();
        assert!(
            e.to_string()
                .contains("not signed by the endorsed sandbox key"),
            "{e}"
        );

        // A tampered measurement.
        let mut ev = good.clone();
        ev["veil"]["measurement"] = "cd".into();
        assert!(matches!(
            v.verify(&ev, &rd, now()),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn endorsements_expire() {
        let (host, v) = setup();
        let rd = [2u8; 64];
        let ev = attester(&host).evidence(&rd).unwrap();
        let later = now() + Duration::from_secs(3600);
        let e = v.verify(&ev, &rd, later).unwrap_err();
        assert!(e.to_string().contains("endorsement is valid from"), "{e}");
    }

    #[test]
    fn host_key_persists_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node/host.key");
        let a = HostKey::load_or_create(&path).unwrap();
        let b = HostKey::load_or_create(&path).unwrap();
        assert_eq!(a.public_hex(), b.public_hex());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_to_string(HostKey::public_path(&path)).unwrap(),
            a.public_hex()
        );
        std::fs::write(&path, "zz").unwrap();
        assert!(HostKey::load_or_create(&path).is_err());
    }

    #[test]
    fn credential_debug_hides_the_key() {
        let c = HostKey::generate().endorse("s", "t", "f", now(), Duration::from_secs(1));
        let shown = format!("{c:?}");
        assert!(!shown.contains(&c.signing_key), "{shown}");
    }

    #[test]
    fn malformed_evidence() {
        let (_, v) = setup();
        let rd = [0u8; 64];
        let veil = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"warning": WARNING, "measurement": "",
                "endorsement": "a.b", "signature": ""});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            serde_json::json!({"svn": "1", "report_data": "", "veil": v})
        };
        for bad in [
            serde_json::json!({}),
            serde_json::json!("x"),
            serde_json::json!({"svn": "1", "report_data": "not base64!"}),
            serde_json::json!({"svn": "1", "report_data": STD_B64.encode([0u8; 65])}),
            veil(serde_json::json!({"warning": "hi"})),
            veil(serde_json::json!({"measurement": "zz"})),
            veil(serde_json::json!({"extra": 1})),
            veil(serde_json::json!({"endorsement": "no-dot"})),
        ] {
            assert!(
                matches!(v.verify(&bad, &rd, now()), Err(Error::Malformed { .. })),
                "{bad}"
            );
        }
    }
}
