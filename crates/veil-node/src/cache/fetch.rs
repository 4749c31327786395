//! One download from an upstream source into the store: streamed to a temporary file on a
//! blocking thread, verified, published, and only then recorded as coming from that source.

use crate::store::{BlobStore, Source};
use crate::NodeError;
use futures::StreamExt;
use std::sync::Arc;
use veil_image::{Digest, Reference};
use veil_registry::RegistryClient;

/// What to fetch and where from.
pub(super) struct Job {
    pub store: Arc<BlobStore>,
    pub client: RegistryClient,
    /// The digest in the source's repository.
    pub origin: Reference,
    /// The image as the user wrote it (for messages).
    pub reference: String,
    pub source: Source,
    pub digest: Digest,
    /// A manifest (from the `manifests` endpoint; never evicted) rather than a blob.
    pub manifest: bool,
}

impl Job {
    pub async fn run(self) -> Result<(), NodeError> {
        if self.manifest {
            self.manifest().await
        } else {
            self.blob().await
        }
    }

    /// A manifest by digest (the client refuses bytes that do not hash to it).
    async fn manifest(self) -> Result<(), NodeError> {
        let Job {
            store,
            client,
            origin,
            reference,
            source,
            digest,
            ..
        } = self;
        let m = client
            .get_manifest(&origin)
            .await
            .map_err(|e| NodeError::upstream(format!("{reference}: manifest {digest}"), e))?;
        tokio::task::spawn_blocking(move || {
            store.put(&m.bytes, Some(&digest))?;
            store.record_source(&source, &digest)?;
            tracing::debug!(manifest = %digest, %source, "cached manifest from upstream");
            Ok(())
        })
        .await
        .map_err(|e| NodeError::Storage(format!("manifest writer task: {e}")))?
    }

    async fn blob(self) -> Result<(), NodeError> {
        let Job {
            store,
            client,
            origin,
            reference,
            source,
            digest: d,
            ..
        } = self;
        let mut blob = client
            .get_blob(&origin, &d)
            .await
            .map_err(|e| NodeError::upstream(format!("{reference}: blob {d}"), e))?;
        // Write on a blocking thread through a channel so disk I/O never stalls the runtime.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let (d2, source2) = (d.clone(), source.clone());
        let writer = tokio::task::spawn_blocking(move || -> Result<Digest, NodeError> {
            let mut w = store.writer()?;
            while let Some(chunk) = rx.blocking_recv() {
                w.write(&chunk)?;
            }
            let d = w.commit(Some(&d2))?;
            store.mark_cached(&d);
            // Only now, verified and published, does the blob count as this source's.
            store.record_source(&source2, &d)?;
            Ok(d)
        });
        let mut stream_err = None;
        while let Some(chunk) = blob.stream.next().await {
            match chunk {
                Ok(c) => {
                    if tx.send(c).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    stream_err = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| NodeError::Storage(format!("blob writer task: {e}")))?;
        if let Some(e) = stream_err {
            return Err(NodeError::upstream(
                format!("{reference}: blob {d}: download failed"),
                e,
            ));
        }
        match written {
            Ok(_) => {
                tracing::debug!(blob = %d, %source, "cached blob from upstream");
                Ok(())
            }
            Err(NodeError::DigestMismatch { expected, actual }) => {
                Err(NodeError::Tampered(format!(
                    "{reference}: blob {expected} from {} hashes to {actual}; it was not cached",
                    origin.registry
                )))
            }
            Err(e) => Err(e),
        }
    }
}
