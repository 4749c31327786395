//! Against a real registry (Debian's docker-registry, the CNCF distribution
//! server) and skopeo for interoperability.

use bytes::Bytes;
use futures::StreamExt;
use veil_image::manifest::{self, Manifest};
use veil_image::{Digest, Reference};
use veil_registry::{Error, RegistryClient, RegistryConfig};
use veil_testkit::{skopeo, TestRegistry};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

struct Image {
    config: Bytes,
    layer: Bytes,
    manifest: Bytes,
}

impl Image {
    fn digest(&self) -> Digest {
        Digest::sha256(&self.manifest)
    }
}

fn layer_tar(content: &str) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let data = content.as_bytes();
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, "hello.txt", data)?;
    Ok(b.into_inner()?)
}

fn build_image(arch: &str, content: &str) -> anyhow::Result<Image> {
    let layer = layer_tar(content)?;
    let layer_digest = Digest::sha256(&layer);
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","config":{{"Cmd":["/hello"]}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":{}}},"layers":[{{"mediaType":"{OCI_LAYER}","digest":"{layer_digest}","size":{}}}]}}"#,
        Digest::sha256(config.as_bytes()),
        config.len(),
        layer.len()
    );
    Ok(Image {
        config: Bytes::from(config),
        layer: Bytes::from(layer),
        manifest: Bytes::from(manifest),
    })
}

async fn push_image(c: &RegistryClient, r: &Reference, img: &Image) -> anyhow::Result<Digest> {
    c.push_blob(r, &Digest::sha256(&img.config), img.config.clone())
        .await?;
    c.push_blob(r, &Digest::sha256(&img.layer), img.layer.clone())
        .await?;
    Ok(c.push_manifest(r, OCI_MANIFEST, img.manifest.clone())
        .await?)
}

fn client() -> RegistryClient {
    RegistryClient::new(RegistryConfig::default()).expect("client")
}

fn parse_ref(s: &str) -> Reference {
    s.parse().expect("valid reference")
}

async fn read_blob(c: &RegistryClient, r: &Reference, d: &Digest) -> Result<Vec<u8>, Error> {
    let mut bs = c.get_blob(r, d).await?;
    let mut out = Vec::new();
    while let Some(chunk) = bs.stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    if let Some(size) = bs.size {
        assert_eq!(size, out.len() as u64);
    }
    Ok(out)
}

#[tokio::test]
async fn push_then_pull_roundtrip() -> anyhow::Result<()> {
    let reg = TestRegistry::start()?;
    let c = client();
    let img = build_image("amd64", "hello from veil\n")?;
    let r = parse_ref(&format!("{}/veil/app:v1", reg.host()));

    let layer_digest = Digest::sha256(&img.layer);
    assert!(!c.blob_exists(&r, &layer_digest).await?);
    let pushed = push_image(&c, &r, &img).await?;
    assert_eq!(pushed, img.digest());
    assert!(c.blob_exists(&r, &layer_digest).await?);
    assert!(!c.blob_exists(&r, &Digest::sha256(b"absent")).await?);
    // Pushing again is a no-op (the blob exists).
    c.push_blob(&r, &layer_digest, img.layer.clone()).await?;

    // By tag.
    let m = c.get_manifest(&r).await?;
    assert_eq!(m.digest, img.digest());
    assert_eq!(m.media_type, OCI_MANIFEST);
    assert_eq!(m.bytes, img.manifest);
    // By digest.
    let by_digest = parse_ref(&format!("{}/veil/app@{}", reg.host(), img.digest()));
    let m2 = c.get_manifest(&by_digest).await?;
    assert_eq!(m2.bytes, img.manifest);
    // resolve_image of a plain manifest is the manifest itself.
    let resolved = c.resolve_image_full(&r).await?;
    assert_eq!(resolved.manifest.digest, img.digest());
    assert_eq!(resolved.top_digest, img.digest());
    assert_eq!(c.resolve_image(&r).await?.bytes, img.manifest);

    // Blobs stream back exactly.
    assert_eq!(read_blob(&c, &r, &layer_digest).await?, img.layer.to_vec());
    assert_eq!(
        read_blob(&c, &r, &Digest::sha256(&img.config)).await?,
        img.config.to_vec()
    );
    Ok(())
}

#[tokio::test]
async fn missing_things_are_not_found_with_registry_codes() -> anyhow::Result<()> {
    let reg = TestRegistry::start()?;
    let c = client();
    let img = build_image("amd64", "x")?;
    let r = parse_ref(&format!("{}/veil/app:v1", reg.host()));
    push_image(&c, &r, &img).await?;

    let missing = parse_ref(&format!("{}/veil/app:nope", reg.host()));
    let err = c.get_manifest(&missing).await.expect_err("missing tag");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("MANIFEST_UNKNOWN"), "{msg}");
    assert!(msg.contains("veil/app:nope"), "{msg}");

    let err = c
        .get_blob(&r, &Digest::sha256(b"absent"))
        .await
        .expect_err("missing blob");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("BLOB_UNKNOWN"), "{err}");

    let other_repo = parse_ref(&format!("{}/veil/nothing:v1", reg.host()));
    let err = c.get_manifest(&other_repo).await.expect_err("missing repo");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn tampered_manifest_is_a_digest_mismatch() -> anyhow::Result<()> {
    let reg = TestRegistry::start()?;
    let c = client();
    let img = build_image("amd64", "x")?;
    let r = parse_ref(&format!("{}/veil/app:v1", reg.host()));
    let digest = push_image(&c, &r, &img).await?;

    // Rewrite the manifest in the registry's storage: by tag, the client
    // just sees new content with a new digest; pinned to the original
    // digest, the mismatch is detected.
    let path = reg.blob_data_path(digest.as_str());
    let tampered = String::from_utf8(img.manifest.to_vec())?.replace("\"size\"", " \"size\"");
    std::fs::write(&path, &tampered)?;
    let pinned = r.with_digest(digest.clone());
    let err = c.get_manifest(&pinned).await.expect_err("tampered");
    match &err {
        Error::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &digest);
            assert_eq!(actual, &Digest::sha256(tampered.as_bytes()));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains(digest.as_str()), "{err}");

    // A reference whose digest names other content than what is pushed.
    let bad = r.with_digest(Digest::sha256(b"something else"));
    assert!(matches!(
        c.push_manifest(&bad, OCI_MANIFEST, img.manifest.clone())
            .await,
        Err(Error::DigestMismatch { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn index_resolves_to_linux_amd64() -> anyhow::Result<()> {
    let reg = TestRegistry::start()?;
    let c = client();
    let amd64 = build_image("amd64", "amd64 layer")?;
    let arm64 = build_image("arm64", "arm64 layer")?;
    let repo = format!("{}/veil/multi", reg.host());
    for img in [&arm64, &amd64] {
        let r = parse_ref(&format!("{repo}@{}", img.digest()));
        push_image(&c, &r, img).await?;
    }
    let entry = |img: &Image, arch: &str| {
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"os":"linux","architecture":"{arch}"}}}}"#,
            img.digest(),
            img.manifest.len()
        )
    };
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{},{}]}}"#,
        entry(&arm64, "arm64"),
        entry(&amd64, "amd64")
    );
    let r = parse_ref(&format!("{repo}:latest"));
    let index_digest = c
        .push_manifest(&r, OCI_INDEX, Bytes::from(index.clone()))
        .await?;

    let top = c.get_manifest(&r).await?;
    assert_eq!(top.digest, index_digest);
    assert_eq!(top.media_type, OCI_INDEX);

    let resolved = c.resolve_image_full(&r).await?;
    assert_eq!(resolved.top_digest, index_digest);
    assert_eq!(resolved.manifest.digest, amd64.digest());
    assert_eq!(resolved.manifest.bytes, amd64.manifest);
    assert_eq!(c.resolve_image(&r).await?.digest, amd64.digest());
    Ok(())
}

#[tokio::test]
async fn skopeo_interop() -> anyhow::Result<()> {
    let reg = TestRegistry::start()?;
    let c = client();
    let img = build_image("amd64", "interop\n")?;
    let host = reg.host();
    let r = parse_ref(&format!("{host}/veil/a:t"));
    push_image(&c, &r, &img).await?;

    // skopeo sees exactly what veil pushed.
    let raw = tokio::task::spawn_blocking({
        let src = format!("docker://{host}/veil/a:t");
        move || skopeo(&["inspect", "--raw", "--tls-verify=false", &src])
    })
    .await??;
    assert_eq!(raw.trim().as_bytes(), &img.manifest[..]);

    // Round trip through an OCI layout and back into another repository
    // with skopeo; veil fetches the copy.
    let dir = tempfile::tempdir()?;
    let layout = format!("oci:{}:t", dir.path().join("layout").display());
    let (src, dst) = (
        format!("docker://{host}/veil/a:t"),
        format!("docker://{host}/veil/copied:t2"),
    );
    tokio::task::spawn_blocking({
        let layout = layout.clone();
        move || -> anyhow::Result<()> {
            skopeo(&["copy", "--src-tls-verify=false", &src, &layout])?;
            skopeo(&["copy", "--dest-tls-verify=false", &layout, &dst])?;
            Ok(())
        }
    })
    .await??;

    let copied = parse_ref(&format!("{host}/veil/copied:t2"));
    let m = c.resolve_image(&copied).await?;
    let Manifest::Image(im) = manifest::parse_manifest(&m.bytes, Some(&m.media_type))? else {
        panic!("expected an image manifest, got {}", m.media_type);
    };
    assert_eq!(im.layers.len(), 1);
    for d in std::iter::once(&im.config).chain(im.layers.iter()) {
        let bytes = read_blob(&c, &copied, &d.digest).await?;
        assert_eq!(Digest::sha256(&bytes), d.digest);
        assert_eq!(bytes.len() as u64, d.size);
    }
    let layer = read_blob(&c, &copied, &im.layers[0].digest).await?;
    assert_eq!(layer, img.layer.to_vec());
    Ok(())
}

/// A TCP proxy in front of the real registry that cuts the first
/// non-ranged blob download after `cut_after` response bytes, so the
/// client has to resume with a `Range` request that the real registry
/// answers.
async fn cutting_proxy(
    upstream: String,
    cut_after: usize,
) -> anyhow::Result<(String, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cut_done = Arc::new(AtomicBool::new(false));
    let ranged = Arc::new(AtomicUsize::new(0));
    let ranged_out = ranged.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            let (cut_done, ranged) = (cut_done.clone(), ranged.clone());
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let cut_this = Arc::new(AtomicBool::new(false));
                let cut_flag = cut_this.clone();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                        if text.starts_with("get /v2/") && text.contains("/blobs/sha256:") {
                            if text.contains("\r\nrange:") {
                                ranged.fetch_add(1, Ordering::SeqCst);
                            } else if !cut_done.swap(true, Ordering::SeqCst) {
                                cut_flag.store(true, Ordering::SeqCst);
                            }
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 16 * 1024];
                let mut sent_after_cut = 0usize;
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut n = n;
                    if cut_this.load(Ordering::SeqCst) {
                        n = n.min(cut_after.saturating_sub(sent_after_cut));
                        sent_after_cut += n;
                    }
                    if n > 0 && cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if cut_this.load(Ordering::SeqCst) && sent_after_cut >= cut_after {
                        break;
                    }
                }
                up.abort();
                let _ = cw.shutdown().await;
            });
        }
    });
    Ok((addr.to_string(), ranged_out))
}

#[tokio::test]
async fn broken_download_resumes_against_real_registry() -> anyhow::Result<()> {
    let reg = TestRegistry::start()?;
    let c = client();
    // A layer large enough to be cut in the middle.
    let content: String = (0..40_000).map(|i| format!("{i:06}\n")).collect();
    let img = build_image("amd64", &content)?;
    let r = parse_ref(&format!("{}/veil/big:v1", reg.host()));
    push_image(&c, &r, &img).await?;

    let (proxy, ranged) = cutting_proxy(reg.host(), 64 * 1024).await?;
    let via_proxy = parse_ref(&format!("{proxy}/veil/big:v1"));
    let layer_digest = Digest::sha256(&img.layer);
    let bytes = read_blob(&c, &via_proxy, &layer_digest).await?;
    assert_eq!(bytes.len(), img.layer.len());
    assert_eq!(Digest::sha256(&bytes), layer_digest);
    assert_eq!(
        ranged.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "exactly one Range request resumed the download"
    );
    Ok(())
}
