//! Pulling the assigned image over the channel: manifest, config and layers, each checked
//! against its digest, layers streamed straight into the unpacker.
//!
//! The node is untrusted. The agent asks it for the manifest *by digest* (the digest comes with
//! the assignment and, for confidential functions, is part of what the sandbox attests to),
//! then for the config and every layer by the digests that manifest lists. Each blob is hashed
//! as it streams; a mismatch fails the whole assignment, and the half-unpacked root is never
//! used (the node destroys the sandbox).

use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{BodyDataStream, Empty};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio_util::io::{StreamReader, SyncIoBridge};
use veil_image::digest::VerifyingReader;
use veil_image::manifest::{self, Manifest, RunConfig};
use veil_image::unpack::{self, UnpackOptions};
use veil_image::{signature, Digest};

use crate::attest::{ImagePolicy, Released};
use veil_proto::mux::{read_body_limited, MuxHandle};
use veil_proto::{Assignment, ErrorBody, PhaseTimings, StreamKind};

/// Largest manifest or config blob accepted.
const MAX_JSON_BLOB: usize = 4 << 20;

/// A failed pull, naming the image, the blob and the reason.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The node could not be asked or did not answer.
    #[error("image {image}: fetching {what} {digest} over the sandbox channel failed: {reason}")]
    Channel {
        /// Image reference.
        image: String,
        /// manifest / config / layer.
        what: &'static str,
        /// Blob digest.
        digest: String,
        /// Why.
        reason: String,
    },
    /// The node answered with an error.
    #[error("image {image}: the node refused {what} {digest}: {reason}")]
    Refused {
        /// Image reference.
        image: String,
        /// manifest / config / layer.
        what: &'static str,
        /// Blob digest.
        digest: String,
        /// The node's message.
        reason: String,
    },
    /// The tenant's signature policy does not accept the image.
    #[error("image {image}: manifest {digest} is refused by the tenant's signature policy ({policy}): {reason}")]
    Rejected {
        /// Image reference.
        image: String,
        /// Manifest digest.
        digest: String,
        /// Broker resource of the policy.
        policy: String,
        /// Why.
        reason: String,
    },
    /// A blob did not match its digest, or was malformed, or could not be unpacked.
    #[error("image {image}: {what} {digest}: {reason}")]
    Invalid {
        /// Image reference.
        image: String,
        /// manifest / config / layer.
        what: &'static str,
        /// Blob digest.
        digest: String,
        /// Why.
        reason: String,
    },
}

/// The result of a pull.
pub struct Pulled {
    /// What to run.
    pub config: RunConfig,
    /// Phase timings (manifest, layers).
    pub timings: PhaseTimings,
}

/// A [`PullError::Invalid`] for `a`'s image.
fn invalid(a: &Assignment, what: &'static str, digest: &str, reason: String) -> PullError {
    PullError::Invalid {
        image: a.image.clone(),
        what,
        digest: digest.to_string(),
        reason,
    }
}

async fn get(
    mux: &MuxHandle,
    a: &Assignment,
    what: &'static str,
    kind: &str,
    digest: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, PullError> {
    let path = format!("/v2/{}/{}/{}", a.repository, kind, digest);
    let req = hyper::Request::get(path)
        .header(http::header::HOST, "node")
        .body(Empty::<Bytes>::new())
        .map_err(|e| PullError::Channel {
            image: a.image.clone(),
            what,
            digest: digest.into(),
            reason: e.to_string(),
        })?;
    let resp = mux
        .request(StreamKind::Registry, req)
        .await
        .map_err(|e| PullError::Channel {
            image: a.image.clone(),
            what,
            digest: digest.into(),
            reason: e.to_string(),
        })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = read_body_limited(resp.into_body(), 64 << 10)
            .await
            .unwrap_or_default();
        let reason = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| format!("{} ({})", e.message, e.code))
            .unwrap_or_else(|_| format!("HTTP {status}"));
        return Err(PullError::Refused {
            image: a.image.clone(),
            what,
            digest: digest.into(),
            reason,
        });
    }
    Ok(resp)
}

async fn get_json_blob(
    mux: &MuxHandle,
    a: &Assignment,
    what: &'static str,
    kind: &str,
    digest: &Digest,
) -> Result<Bytes, PullError> {
    get_limited_blob(mux, a, what, kind, digest, MAX_JSON_BLOB).await
}

async fn get_limited_blob(
    mux: &MuxHandle,
    a: &Assignment,
    what: &'static str,
    kind: &str,
    digest: &Digest,
    limit: usize,
) -> Result<Bytes, PullError> {
    let resp = get(mux, a, what, kind, digest.as_str()).await?;
    let invalid = |reason| invalid(a, what, digest.as_str(), reason);
    let body = read_body_limited(resp.into_body(), limit)
        .await
        .map_err(|e| {
            invalid(format!(
                "reading it failed or it exceeds {limit} bytes: {e}"
            ))
        })?;
    let actual = Digest::sha256(&body);
    if &actual != digest {
        return Err(invalid(format!(
            "digest mismatch: received bytes hash to {actual}"
        )));
    }
    Ok(body)
}

/// Fetch the signatures the node offered (each signature manifest and payload checked against
/// its digest). Independent of attestation, so it runs while the agent attests.
pub async fn fetch_signatures(
    mux: &MuxHandle,
    a: &Assignment,
) -> Result<Vec<signature::SigstoreSignature>, PullError> {
    let invalid = |what, digest: &str, reason| invalid(a, what, digest, reason);
    let mut sigs = Vec::new();
    for sd in a.signatures.iter().take(signature::MAX_SIGNATURES) {
        let sd: Digest = sd
            .parse()
            .map_err(|e: veil_image::Error| invalid("signature manifest", sd, e.to_string()))?;
        let bytes = get_json_blob(mux, a, "signature manifest", "manifests", &sd).await?;
        let sm = match manifest::parse_manifest(&bytes, None)
            .map_err(|e| invalid("signature manifest", sd.as_str(), e.to_string()))?
        {
            Manifest::Image(m) => m,
            Manifest::Index(_) => {
                return Err(invalid(
                    "signature manifest",
                    sd.as_str(),
                    "is an index".into(),
                ))
            }
        };
        for (desc, sig) in signature::signature_layers(&sm) {
            if desc.size > signature::MAX_PAYLOAD_BYTES as u64 {
                return Err(invalid(
                    "signature payload",
                    desc.digest.as_str(),
                    format!("exceeds {} bytes", signature::MAX_PAYLOAD_BYTES),
                ));
            }
            if sigs.len() >= signature::MAX_SIGNATURES {
                tracing::warn!(
                    image = %a.image,
                    "more than {} signatures offered; the rest are ignored",
                    signature::MAX_SIGNATURES
                );
                break;
            }
            let payload = get_limited_blob(
                mux,
                a,
                "signature payload",
                "blobs",
                &desc.digest,
                signature::MAX_PAYLOAD_BYTES,
            )
            .await?;
            sigs.push(signature::SigstoreSignature {
                payload: payload.to_vec(),
                signature: sig,
            });
        }
    }
    Ok(sigs)
}

/// Check `sigs` (from [`fetch_signatures`]) against the tenant's policy.
async fn check_signatures(
    mux: &MuxHandle,
    a: &Assignment,
    manifest_digest: &Digest,
    policy: &ImagePolicy,
    sigs: Vec<signature::SigstoreSignature>,
) -> Result<String, PullError> {
    let invalid = |what, digest: &str, reason| invalid(a, what, digest, reason);
    let reference: veil_image::Reference = a.image.parse().map_err(|e: veil_image::Error| {
        invalid("manifest", manifest_digest.as_str(), e.to_string())
    })?;
    let rejected = |reason: String| PullError::Rejected {
        image: a.image.clone(),
        digest: manifest_digest.to_string(),
        policy: policy.source.clone(),
        reason,
    };
    let evaluate = |digest: &Digest| {
        let subject = signature::Subject {
            reference: &reference,
            manifest_digest: digest,
            signatures: &sigs,
        };
        policy
            .policy
            .evaluate(&subject, &policy.keys)
            .map_err(|e| match e {
                signature::SignatureError::Rejected { reason, .. } => reason,
                other => other.to_string(),
            })
    };
    let platform_reason = match evaluate(manifest_digest) {
        Ok(how) => return Ok(how),
        Err(reason) => reason,
    };
    // A multi-platform image may be signed at the index: that signature covers this manifest
    // only if the (digest-checked) index lists it.
    let Some(ix) = &a.index_digest else {
        return Err(rejected(platform_reason));
    };
    let ix: Digest = ix
        .parse()
        .map_err(|e: veil_image::Error| invalid("index", ix, e.to_string()))?;
    let bytes = get_json_blob(mux, a, "index", "manifests", &ix).await?;
    index_selects(&bytes, manifest_digest).map_err(|e| invalid("index", ix.as_str(), e))?;
    evaluate(&ix)
        .map(|how| format!("{how} (signed index {ix})"))
        .map_err(|index_reason| {
            rejected(format!(
                "for the manifest: {platform_reason}; for its index {ix}: {index_reason}"
            ))
        })
}

/// Pull the assigned image into `rootfs`: manifest, then (with a policy) its signatures, then
/// every layer, decrypting encrypted layers with the keys the broker released (fetching the
/// key-encryption keys that key-provider layers name from the attested session).
///
/// `prefetched`: the result of [`fetch_signatures`] if the caller already ran it (concurrently
/// with attestation).
pub async fn pull(
    mux: &MuxHandle,
    a: &Assignment,
    rootfs: &Path,
    released: &mut Released,
    prefetched: Option<Result<Vec<signature::SigstoreSignature>, PullError>>,
) -> Result<Pulled, PullError> {
    let mut timings = PhaseTimings::default();
    let t0 = Instant::now();
    let invalid = |what, digest: &str, reason| invalid(a, what, digest, reason);
    let manifest_digest: Digest = a
        .manifest_digest
        .parse()
        .map_err(|e: veil_image::Error| invalid("manifest", &a.manifest_digest, e.to_string()))?;
    pinned_digest_matches(&a.image, &manifest_digest, a.index_digest.as_deref())
        .map_err(|e| invalid("manifest", manifest_digest.as_str(), e))?;
    let mbytes = get_json_blob(mux, a, "manifest", "manifests", &manifest_digest).await?;
    let image = match manifest::parse_manifest(&mbytes, None)
        .map_err(|e| invalid("manifest", manifest_digest.as_str(), e.to_string()))?
    {
        Manifest::Image(m) => m,
        Manifest::Index(_) => {
            return Err(invalid(
                "manifest",
                manifest_digest.as_str(),
                "is an index; the node must assign a platform manifest".into(),
            ))
        }
    };
    // Nothing the manifest names is used before the tenant's policy accepts the manifest.
    if let Some(policy) = &released.policy {
        let t = Instant::now();
        let sigs = match prefetched {
            Some(sigs) => sigs?,
            None => fetch_signatures(mux, a).await?,
        };
        let how = check_signatures(mux, a, &manifest_digest, policy, sigs).await?;
        timings.signature_ms = ms(t);
        tracing::info!(image = %a.image, digest = %manifest_digest, "signature policy accepts the image: {how}");
    }
    // Key-encryption keys named by key-provider layers come from the attested broker.
    for layer in image
        .layers
        .iter()
        .filter(|l| veil_image::crypt::is_encrypted(l))
    {
        let kids = veil_image::crypt::coco_key_ids(layer)
            .map_err(|e| invalid("layer", layer.digest.as_str(), e.to_string()))?;
        for kid in kids {
            if let Err(e) = released.fetch_layer_kek(&kid).await {
                // A layer may also carry a JWE recipient the deployment has a key for.
                if released.keys.private_keys.is_empty() {
                    return Err(invalid("layer", layer.digest.as_str(), e));
                }
                tracing::warn!(layer = %layer.digest, "{e}");
            }
        }
    }
    let keys = &released.keys;
    let cbytes = get_json_blob(mux, a, "config", "blobs", &image.config.digest).await?;
    let config = manifest::parse_config(&cbytes)
        .map_err(|e| invalid("config", image.config.digest.as_str(), e.to_string()))?;
    // The signature check is reported on its own.
    timings.manifest_ms = ms(t0) - timings.signature_ms;

    let t1 = Instant::now();
    // Ask for every layer at once: the node streams them concurrently while the layers are
    // applied in order (whiteouts depend on order). Each substream's flow-control window
    // bounds what waits in memory for its turn.
    let responses = futures::future::join_all(
        image
            .layers
            .iter()
            .map(|l| get(mux, a, "layer", "blobs", l.digest.as_str())),
    )
    .await;
    for (layer, resp) in image.layers.iter().zip(responses) {
        let digest = layer.digest.clone();
        // Encrypted layers (ocicrypt): the node serves ciphertext; the layer key is unwrapped
        // here with a private key the tenant's broker released to this sandbox.
        let layer_key = if veil_image::crypt::is_encrypted(layer) {
            if keys.is_empty() {
                return Err(invalid(
                    "layer",
                    digest.as_str(),
                    "is encrypted, but the deployment names no decryption key".into(),
                ));
            }
            Some(
                veil_image::crypt::unwrap_layer_key_with(layer, keys)
                    .map_err(|e| invalid("layer", digest.as_str(), e.to_string()))?,
            )
        } else {
            None
        };
        let compression = match &layer_key {
            Some(k) => k.compression(),
            None => manifest::layer_compression(&layer.media_type),
        }
        .map_err(|e| invalid("layer", digest.as_str(), e.to_string()))?;
        let resp = resp?;
        let stream = BodyDataStream::new(resp.into_body()).map_err(std::io::Error::other);
        let bridge = SyncIoBridge::new(StreamReader::new(stream));
        let root: PathBuf = rootfs.to_path_buf();
        let size = layer.size;
        let d2 = digest.clone();
        let res = tokio::task::spawn_blocking(move || {
            // Never read more than the manifest promised (+1 to notice an overlong blob): a
            // hostile node cannot keep the pull streaming forever.
            let mut vr = VerifyingReader::new(std::io::Read::take(bridge, size.saturating_add(1)));
            let opts = UnpackOptions {
                preserve_owner: true,
                ..UnpackOptions::default()
            };
            // Ciphertext digest (what the manifest names) → decryption with HMAC and plaintext
            // digest checked at EOF → decompression → untar, all in one stream.
            let unpacked = match &layer_key {
                Some(k) => {
                    let mut dr = k.decrypt(&mut vr);
                    let r = unpack::unpack_layer(&mut dr, compression, &root, &opts);
                    // Drain so the decryptor reaches EOF and checks the HMAC and digest.
                    let drained = std::io::copy(&mut dr, &mut std::io::sink());
                    match (r, drained) {
                        (Ok(_), Err(e)) => Err(veil_image::Error::CorruptLayer { source: e }),
                        (r, _) => r,
                    }
                }
                None => unpack::unpack_layer(&mut vr, compression, &root, &opts),
            };
            // The digest verdict comes first: a tampered blob is reported as tampered even if
            // the tampering also broke the tar stream.
            let verified = if unpacked.is_ok() {
                vr.verify(&d2, Some(size))
            } else {
                // Drain what is left so the digest covers the whole blob.
                let _ = std::io::copy(&mut vr, &mut std::io::sink());
                vr.verify(&d2, Some(size))
            };
            let n = vr.bytes_read();
            (unpacked, verified, n)
        })
        .await
        .map_err(|e| invalid("layer", digest.as_str(), format!("unpack task failed: {e}")))?;
        let (unpacked, verified, n) = res;
        verified.map_err(|e| invalid("layer", digest.as_str(), e.to_string()))?;
        unpacked.map_err(|e| invalid("layer", digest.as_str(), e.to_string()))?;
        timings.layer_bytes += n;
    }
    timings.layers_ms = ms(t1);
    Ok(Pulled { config, timings })
}

/// A digest reference pins what the tenant deployed: the node must assign that digest, or a
/// manifest of the index with that digest.
fn pinned_digest_matches(
    image: &str,
    manifest_digest: &Digest,
    index_digest: Option<&str>,
) -> Result<(), String> {
    let Ok(r) = image.parse::<veil_image::Reference>() else {
        return Ok(());
    };
    match &r.digest {
        Some(pinned) if pinned != manifest_digest && index_digest != Some(pinned.as_str()) => Err(
            format!("the image reference pins {pinned}, not this manifest or its index"),
        ),
        _ => Ok(()),
    }
}

/// The index (already digest-checked) must select exactly `manifest_digest` for linux/amd64:
/// listing it is not enough, since an index may also list other platforms, attestations or
/// unrelated images that its signature was never meant to vouch for as this function.
fn index_selects(index: &[u8], manifest_digest: &Digest) -> Result<(), String> {
    let selected = match manifest::parse_manifest(index, None).map_err(|e| e.to_string())? {
        Manifest::Index(entries) => manifest::select_platform(&entries, "linux", "amd64")
            .map(|d| d.digest)
            .ok(),
        Manifest::Image(_) => None,
    };
    if selected.as_ref() == Some(manifest_digest) {
        Ok(())
    } else {
        Err(format!(
            "does not select the assigned manifest {manifest_digest} for linux/amd64"
        ))
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_image::manifest::{index_json, Descriptor, Platform, OCI_MANIFEST};

    fn d(n: u8) -> Digest {
        Digest::sha256(&[n])
    }

    #[test]
    fn a_digest_reference_pins_the_manifest_or_its_index() {
        let m = d(1);
        let ix = d(2);
        let other = d(3);
        assert!(pinned_digest_matches("reg.example/app:v1", &m, None).is_ok());
        assert!(pinned_digest_matches(&format!("reg.example/app@{m}"), &m, None).is_ok());
        assert!(
            pinned_digest_matches(&format!("reg.example/app@{ix}"), &m, Some(ix.as_str())).is_ok()
        );
        // A node that assigns another manifest than the one the reference pins.
        let e = pinned_digest_matches(&format!("reg.example/app@{other}"), &m, Some(ix.as_str()))
            .unwrap_err();
        assert!(e.contains(other.as_str()), "{e}");
    }

    fn entry(digest: Digest, arch: &str) -> Descriptor {
        let mut e = Descriptor::new(OCI_MANIFEST, digest, 100);
        e.platform = Some(Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        });
        e
    }

    #[test]
    fn an_index_signature_covers_only_the_manifest_it_selects() {
        let amd64 = d(1);
        let arm64 = d(2);
        let index = index_json(&[entry(amd64.clone(), "amd64"), entry(arm64.clone(), "arm64")]);
        assert!(index_selects(&index, &amd64).is_ok());
        // Listed, but not what the index selects for this platform.
        let e = index_selects(&index, &arm64).unwrap_err();
        assert!(e.contains("does not select"), "{e}");
        // Not listed at all, or not an index.
        assert!(index_selects(&index, &d(9)).is_err());
        assert!(index_selects(b"{}", &amd64).is_err());
        assert!(index_selects(b"not json", &amd64).is_err());
    }
}
