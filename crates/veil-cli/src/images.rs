//! `veil image …`: build images from a directory, push them to a registry or to the local
//! store of a running veil, inspect them.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use veil_image::build::{BuildSpec, BuiltImage};
use veil_image::layout::OciLayout;
use veil_image::manifest::{self, Manifest};
use veil_image::{Digest, Reference};
use veil_registry::{RegistryClient, RegistryConfig};

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

/// Push a built image to `target` (already mapped by [`push_target`]).
pub async fn push(
    client: &RegistryClient,
    image: &BuiltImage,
    target: &Reference,
) -> Result<Digest> {
    for blob in image.layers.iter().chain(std::iter::once(&image.config)) {
        client
            .push_blob(target, &blob.digest, Bytes::from(blob.data.clone()))
            .await
            .with_context(|| format!("push blob {} to {target}", blob.digest))?;
    }
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

/// Human-readable description of an image in a registry.
pub async fn inspect(client: &RegistryClient, target: &Reference) -> Result<String> {
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
            let enc = if l.media_type.ends_with("+encrypted") {
                "encrypted"
            } else {
                "plain"
            };
            let _ = writeln!(
                out,
                "layer {i}:   {} {} bytes {} [{enc}]",
                l.digest, l.size, l.media_type
            );
        }
    }
    Ok(out)
}

/// Fetch a whole (single-platform) image from a registry, every blob checked against its digest.
pub async fn pull_image(client: &RegistryClient, target: &Reference) -> Result<BuiltImage> {
    use futures::StreamExt;
    let fetched = client.resolve_image(target).await?;
    let m = match manifest::parse_manifest(&fetched.bytes, Some(&fetched.media_type))? {
        Manifest::Image(m) => m,
        Manifest::Index(_) => bail!("{target} resolved to an index"),
    };
    let get = |d: veil_image::manifest::Descriptor| {
        let client = client.clone();
        let target = target.clone();
        async move {
            let mut s = client.get_blob(&target, &d.digest).await?;
            let mut data = Vec::new();
            while let Some(chunk) = s.stream.next().await {
                data.extend_from_slice(&chunk?);
            }
            let actual = Digest::sha256(&data);
            if actual != d.digest {
                bail!("{target}: blob {} arrived as {actual}", d.digest);
            }
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
