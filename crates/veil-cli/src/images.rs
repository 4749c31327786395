//! `veil image …`: build images from a directory, push them to a registry or to the local
//! store of a running veil, encrypt, sign and inspect them.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use veil_image::build::{BuildSpec, BuiltImage};
use veil_image::layout::OciLayout;
use veil_image::manifest::{self, Descriptor, ImageManifest, Manifest};
use veil_image::signature::{self, SignatureManifest, SigningKey, SigstoreSignature};
use veil_image::{Digest, Reference};
use veil_registry::{RegistryClient, RegistryConfig};

/// A byte-count progress bar on stderr; invisible when stderr is not a terminal.
pub fn progress(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>10} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Write the example function into `dir` as `dir/hello` (mode 0755).
pub fn write_example(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("hello");
    std::fs::write(&p, crate::HELLO_BINARY).with_context(|| format!("write {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The build spec of the example function in `dir`.
pub fn example_spec(dir: &Path) -> BuildSpec {
    BuildSpec {
        context: dir.to_path_buf(),
        entrypoint: vec!["/hello".into()],
        cmd: Vec::new(),
        env: vec!["PATH=/".into()],
        working_dir: Some("/".into()),
        user: None,
    }
}

/// Where a reference is pushed: `local/<repo>` goes to the running veil's `/v2/` endpoint.
pub fn push_target(r: &Reference, server: &str) -> Result<Reference> {
    let mut t = r.clone();
    if r.is_local() {
        let host = server
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        if host.is_empty() {
            bail!("no veil server address to push local/ images to");
        }
        t.registry = host.to_string();
    }
    Ok(t)
}

/// A registry client that treats `extra_insecure` hosts as plain HTTP.
pub fn registry_client(extra_insecure: &[String]) -> Result<RegistryClient> {
    let cfg = RegistryConfig {
        insecure: extra_insecure.to_vec(),
        ..RegistryConfig::default()
    };
    Ok(RegistryClient::new(cfg)?)
}

/// Like [`registry_client`], authenticating to veil's local store at `server` with `token`
/// (sent as the password of HTTP Basic credentials when the store asks for them).
pub fn registry_client_with_token(
    extra_insecure: &[String],
    server: &str,
    token: &str,
) -> Result<RegistryClient> {
    let host = server
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let mut cfg = RegistryConfig {
        insecure: extra_insecure.to_vec(),
        ..RegistryConfig::default()
    };
    cfg.credentials
        .insert(host, ("veil".to_string(), token.to_string()));
    Ok(RegistryClient::new(cfg)?)
}

/// Push a built image to `target` (already mapped by [`push_target`]).
pub async fn push(
    client: &RegistryClient,
    image: &BuiltImage,
    target: &Reference,
) -> Result<Digest> {
    let blobs: Vec<_> = image
        .layers
        .iter()
        .chain(std::iter::once(&image.config))
        .collect();
    let pb = progress(blobs.iter().map(|b| b.data.len() as u64).sum(), "push");
    for blob in blobs {
        client
            .push_blob(target, &blob.digest, Bytes::from(blob.data.clone()))
            .await
            .with_context(|| format!("push blob {} to {target}", blob.digest))?;
        pb.inc(blob.data.len() as u64);
    }
    pb.finish_and_clear();
    let d = client
        .push_manifest(
            target,
            &image.manifest.media_type,
            Bytes::from(image.manifest.data.clone()),
        )
        .await
        .with_context(|| format!("push manifest to {target}"))?;
    Ok(d)
}

/// Read an image back from an OCI layout (for `veil image push <layout>:<tag>`).
pub fn read_layout(dir: &Path, tag: &str) -> Result<BuiltImage> {
    let layout = OciLayout::open(dir)?;
    let desc = layout.resolve(tag)?;
    let mbytes = layout.read_blob(&desc.digest)?;
    let m = match manifest::parse_manifest(&mbytes, Some(&desc.media_type))? {
        Manifest::Image(m) => m,
        Manifest::Index(_) => bail!(
            "{}:{tag} is an index; push a single-platform image",
            dir.display()
        ),
    };
    let blob = |d: &veil_image::manifest::Descriptor| -> Result<veil_image::build::Blob> {
        Ok(veil_image::build::Blob {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            data: layout.read_blob(&d.digest)?,
        })
    };
    Ok(BuiltImage {
        manifest: veil_image::build::Blob {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            data: mbytes.clone(),
        },
        config: blob(&m.config)?,
        layers: m.layers.iter().map(blob).collect::<Result<_>>()?,
    })
}

/// Human-readable description of an image in a registry: layers (encrypted or plain) and the
/// signatures found, each marked verified if one of `keys` (PEM public keys) made it.
pub async fn inspect(
    client: &RegistryClient,
    target: &Reference,
    keys: &[signature::VerificationKey],
) -> Result<String> {
    let resolved = client.resolve_image_full(target).await?;
    let mut out = String::new();
    use std::fmt::Write;
    let _ = writeln!(out, "image:     {target}");
    let _ = writeln!(out, "resolved:  {}", resolved.top_digest);
    let _ = writeln!(
        out,
        "manifest:  {} ({})",
        resolved.manifest.digest, resolved.manifest.media_type
    );
    if let Manifest::Image(m) = manifest::parse_manifest(
        &resolved.manifest.bytes,
        Some(&resolved.manifest.media_type),
    )? {
        let _ = writeln!(
            out,
            "config:    {} ({} bytes)",
            m.config.digest, m.config.size
        );
        for (i, l) in m.layers.iter().enumerate() {
            let enc = if veil_image::crypt::is_encrypted(l) {
                // Which key-wrapping schemes the layer carries (no key material is shown).
                let mut how = Vec::new();
                if l.annotations
                    .contains_key(veil_image::crypt::ANNOTATION_KEYS_JWE)
                {
                    how.push("jwe".to_string());
                }
                match veil_image::crypt::coco_key_ids(l) {
                    Ok(kids) if !kids.is_empty() => how.push(format!("coco {}", kids.join(" "))),
                    Ok(_) => {}
                    Err(_) => how.push("coco (unreadable)".into()),
                }
                format!("encrypted: {}", how.join(", "))
            } else {
                "plain".to_string()
            };
            let _ = writeln!(
                out,
                "layer {i}:   {} {} bytes {} [{enc}]",
                l.digest, l.size, l.media_type
            );
        }
    }
    let mut digests = vec![resolved.manifest.digest.clone()];
    if resolved.top_digest != resolved.manifest.digest {
        digests.push(resolved.top_digest.clone());
    }
    for d in &digests {
        let sigs = fetch_signatures(client, target, d).await?;
        if sigs.is_empty() {
            let _ = writeln!(out, "signatures of {d}: none");
        }
        for (i, s) in sigs.iter().enumerate() {
            let claim = match signature::Payload::parse(&s.payload) {
                Ok(p) if &p.manifest_digest == d => format!("identity {}", p.identity),
                Ok(p) => format!(
                    "identity {}, but signs another manifest {}",
                    p.identity, p.manifest_digest
                ),
                Err(e) => format!("unreadable payload: {e}"),
            };
            let verdict = match keys.iter().find(|k| k.verifies(&s.payload, &s.signature)) {
                Some(k) => format!("verified by {}", k.source),
                None if keys.is_empty() => "not checked (pass --key to verify)".into(),
                None => "NOT made by any given key".into(),
            };
            let _ = writeln!(out, "signature {i} of {d}: sigstore, {claim} [{verdict}]");
        }
    }
    Ok(out)
}

/// Fetch one blob, checked against its digest and size (and at most `limit` bytes).
async fn fetch_blob(
    client: &RegistryClient,
    target: &Reference,
    d: &Descriptor,
    limit: Option<u64>,
) -> Result<Vec<u8>> {
    use futures::StreamExt;
    let cap = limit.unwrap_or(u64::MAX).min(d.size);
    let mut s = client.get_blob(target, &d.digest).await?;
    let mut data = Vec::new();
    while let Some(chunk) = s.stream.next().await {
        data.extend_from_slice(&chunk?);
        if data.len() as u64 > cap {
            bail!("{target}: blob {} is larger than {cap} bytes", d.digest);
        }
    }
    let actual = Digest::sha256(&data);
    if actual != d.digest {
        bail!("{target}: blob {} arrived as {actual}", d.digest);
    }
    Ok(data)
}

/// The signature manifest stored for manifest `d` in `target`'s repository (the sigstore
/// attachment tag), if the image is signed.
async fn fetch_signature_manifest(
    client: &RegistryClient,
    target: &Reference,
    d: &Digest,
) -> Result<Option<ImageManifest>> {
    let sig_ref = signature::signature_reference(target, d);
    let fetched = match client.get_manifest(&sig_ref).await {
        Ok(f) => f,
        Err(veil_registry::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("look up signatures of {target}")),
    };
    match manifest::parse_manifest(&fetched.bytes, Some(&fetched.media_type))
        .with_context(|| format!("signature manifest {sig_ref}"))?
    {
        Manifest::Image(m) => Ok(Some(m)),
        Manifest::Index(_) => bail!("signature manifest {sig_ref} is an index"),
    }
}

/// The signatures stored for manifest `d` in `target`'s repository, each payload fetched and
/// checked against its digest. Nothing signed → no signatures.
pub async fn fetch_signatures(
    client: &RegistryClient,
    target: &Reference,
    d: &Digest,
) -> Result<Vec<SigstoreSignature>> {
    let Some(m) = fetch_signature_manifest(client, target, d).await? else {
        return Ok(Vec::new());
    };
    let mut sigs = Vec::new();
    for (desc, sig) in signature::signature_layers(&m) {
        let payload = fetch_blob(
            client,
            target,
            &desc,
            Some(signature::MAX_PAYLOAD_BYTES as u64),
        )
        .await?;
        sigs.push(SigstoreSignature {
            payload,
            signature: sig,
        });
    }
    Ok(sigs)
}

/// Sign the manifest `target` resolves to at the top level (the index of a multi-platform
/// image, which covers every platform, as cosign does), as `identity`, and push the signature
/// (added to any already there). Returns the signed digest and the signature manifest's digest.
pub async fn sign_image(
    client: &RegistryClient,
    target: &Reference,
    identity: &Reference,
    key: &SigningKey,
) -> Result<(Digest, Digest)> {
    let resolved = client
        .resolve_image_full(target)
        .await
        .with_context(|| format!("resolve {target}"))?;
    let d = resolved.top_digest;
    let sig = signature::sign(key, identity, &d)?;
    // The existing signatures' payloads are already in the registry; only the manifest is
    // extended.
    let existing = fetch_signature_manifest(client, target, &d).await?;
    let sm = SignatureManifest::with_signature(existing, &sig);
    for (bd, data) in &sm.blobs {
        client
            .push_blob(target, bd, Bytes::from(data.clone()))
            .await
            .with_context(|| format!("push signature blob {bd} to {target}"))?;
    }
    let sig_ref = signature::signature_reference(target, &d);
    let sd = client
        .push_manifest(
            &sig_ref,
            manifest::OCI_MANIFEST,
            Bytes::from(sm.manifest_json()),
        )
        .await
        .with_context(|| format!("push signature manifest {sig_ref}"))?;
    Ok((d, sd))
}

/// Fetch a whole (single-platform) image from a registry, every blob checked against its digest.
pub async fn pull_image(client: &RegistryClient, target: &Reference) -> Result<BuiltImage> {
    let fetched = client.resolve_image(target).await?;
    let m = match manifest::parse_manifest(&fetched.bytes, Some(&fetched.media_type))? {
        Manifest::Image(m) => m,
        Manifest::Index(_) => bail!("{target} resolved to an index"),
    };
    let pb = progress(
        m.layers.iter().map(|l| l.size).sum::<u64>() + m.config.size,
        "pull",
    );
    let get = |d: Descriptor| {
        let pb = pb.clone();
        async move {
            let data = fetch_blob(client, target, &d, None).await?;
            pb.inc(d.size);
            Ok::<_, anyhow::Error>(veil_image::build::Blob {
                media_type: d.media_type.clone(),
                digest: d.digest.clone(),
                data,
            })
        }
    };
    let config = get(m.config.clone()).await?;
    let mut layers = Vec::new();
    for l in &m.layers {
        layers.push(get(l.clone()).await?);
    }
    pb.finish_and_clear();
    Ok(BuiltImage {
        manifest: veil_image::build::Blob {
            media_type: fetched.media_type.clone(),
            digest: fetched.digest.clone(),
            data: fetched.bytes.to_vec(),
        },
        config,
        layers,
    })
}
