//! Blobs: existence checks, monolithic pushes and resumable downloads with an overall
//! deadline.

use super::*;

/// A blob download. The stream resumes transparently (with `Range`
/// requests) if the connection breaks; the caller verifies the digest.
pub struct BlobStream {
    /// Size announced by the registry, if any.
    pub size: Option<u64>,
    /// The blob's bytes.
    pub stream: BoxStream<'static, Result<Bytes, Error>>,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    // ---- blobs ------------------------------------------------------------

    fn blob_what(r: &Reference, digest: &Digest) -> String {
        format!("blob {}/{}@{}", r.registry, r.repository, digest)
    }

    /// `HEAD /v2/<repo>/blobs/<digest>` on the registry itself (mirrors are
    /// not consulted: this serves pushes).
    pub async fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<bool, Error> {
        self.blob_exists_as(r, digest, Access::Pull).await
    }

    async fn blob_exists_as(
        &self,
        r: &Reference,
        digest: &Digest,
        access: Access,
    ) -> Result<bool, Error> {
        Self::not_local(r)?;
        let ep = self.registry_endpoint(r);
        let what = Self::blob_what(r, digest);
        let url = self.url(&ep, &format!("/v2/{}/blobs/{}", r.repository, digest))?;
        let req = Req::new(Method::HEAD, url);
        let resp = self
            .send(&ep, &scope(&r.repository, access), &what, &req)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        check(resp, &ep, &what).await?;
        Ok(true)
    }

    /// Uploads a blob monolithically (`POST …/blobs/uploads/` then
    /// `PUT <Location>?digest=…`), unless the registry already has it.
    /// `data` must hash to `digest`.
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        data: Bytes,
    ) -> Result<(), Error> {
        let what = Self::blob_what(r, digest);
        expect_digest(&what, Some(digest), &Digest::sha256(&data))?;
        if self.blob_exists_as(r, digest, Access::Push).await? {
            debug!(%digest, "blob already present, skipping upload");
            return Ok(());
        }
        let ep = self.registry_endpoint(r);
        let scope = scope(&r.repository, Access::Push);
        let url = self.url(&ep, &format!("/v2/{}/blobs/uploads/", r.repository))?;
        let mut req = Req::new(Method::POST, url);
        req.body = Some(Bytes::new());
        let resp = self.send(&ep, &scope, &what, &req).await?;
        let resp = check(resp, &ep, &what).await?;
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Protocol {
                registry: ep.registry.clone(),
                detail: format!("upload of {what} started without a Location header"),
            })?;
        let mut put_url = resp.url().join(location).map_err(|e| Error::Protocol {
            registry: ep.registry.clone(),
            detail: format!("invalid upload Location {location:?}: {e}"),
        })?;
        put_url
            .query_pairs_mut()
            .append_pair("digest", digest.as_str());
        drop(resp);
        let mut req = Req::new(Method::PUT, put_url);
        req.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        req.body = Some(data);
        let resp = self.send(&ep, &scope, &what, &req).await?;
        check(resp, &ep, &what).await?;
        Ok(())
    }

    /// `GET /v2/<repo>/blobs/<digest>`, following redirects, as a stream.
    /// Mirrors are tried first. A connection that breaks mid-body is resumed
    /// with a `Range` request (at most 3 times) inside the stream. The
    /// caller verifies the digest. The response headers must arrive within
    /// [`RegistryConfig::blob_deadline_base`] and the whole body within
    /// [`RegistryConfig::blob_deadline`] of the announced size, else the
    /// stream ends with [`Error::Deadline`].
    pub async fn get_blob(&self, r: &Reference, digest: &Digest) -> Result<BlobStream, Error> {
        Self::not_local(r)?;
        let what = Self::blob_what(r, digest);
        let scope = scope(&r.repository, Access::Pull);
        let path = format!("/v2/{}/blobs/{}", r.repository, digest);
        let base = self.inner.config.blob_deadline_base;
        let (ep, url, resp, started) = self
            .on_endpoints(self.read_endpoints(r), |ep| {
                let (what, scope, path) = (&what, &scope, &path);
                async move {
                    let started = tokio::time::Instant::now();
                    let url = self.url(&ep, path)?;
                    let req = Req::new(Method::GET, url.clone());
                    let attempt = async {
                        let resp = self.send(&ep, scope, what, &req).await?;
                        check(resp, &ep, what).await
                    };
                    let resp = tokio::time::timeout(base, attempt)
                        .await
                        .unwrap_or_else(|_| {
                            Err(Error::Deadline {
                                what: format!("{what} (response headers from {})", ep.host),
                                limit: base,
                            })
                        })?;
                    Ok((ep, url, resp, started))
                }
            })
            .await?;
        let size = resp.content_length();
        let limit = self.inner.config.blob_deadline(size);
        let download = BlobDownload {
            client: self.clone(),
            ep,
            url,
            scope,
            what,
            offset: 0,
            size,
            skip: 0,
            body: Some(resp.bytes_stream().boxed()),
            resumes: 0,
            done: false,
            deadline: started + limit,
            limit,
        };
        Ok(BlobStream {
            size,
            stream: download.into_stream(),
        })
    }
}

/// State of a resumable blob download.
struct BlobDownload {
    client: RegistryClient,
    ep: Endpoint,
    url: Url,
    scope: String,
    what: String,
    /// Bytes delivered so far.
    offset: u64,
    size: Option<u64>,
    /// Bytes to drop from the current body (a server that ignored `Range`).
    skip: u64,
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    resumes: u32,
    done: bool,
    /// When the whole download (resumptions included) must be complete.
    deadline: tokio::time::Instant,
    /// The allowance `deadline` was computed from, for the error message.
    limit: Duration,
}

impl BlobDownload {
    fn into_stream(self) -> BoxStream<'static, Result<Bytes, Error>> {
        futures::stream::unfold(self, |mut st| async move {
            if st.done {
                return None;
            }
            match st.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), st)),
                Ok(None) => None,
                Err(e) => {
                    st.done = true;
                    Some((Err(e), st))
                }
            }
        })
        .boxed()
    }

    /// The next chunk, or [`Error::Deadline`] once the download's overall deadline passed.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, Error> {
        let deadline = self.deadline;
        match tokio::time::timeout_at(deadline, self.next_chunk_inner()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Deadline {
                what: format!(
                    "{} ({} of {} bytes received)",
                    self.what,
                    self.offset,
                    self.size
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "an unknown number of".into())
                ),
                limit: self.limit,
            }),
        }
    }

    async fn next_chunk_inner(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            let Some(body) = self.body.as_mut() else {
                self.reopen().await?;
                continue;
            };
            match body.next().await {
                Some(Ok(mut chunk)) => {
                    if self.skip > 0 {
                        let n = self.skip.min(chunk.len() as u64);
                        chunk = chunk.slice(n as usize..);
                        self.skip -= n;
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    self.offset += chunk.len() as u64;
                    if self.size.is_some_and(|s| self.offset > s) {
                        return Err(Error::Protocol {
                            registry: self.ep.registry.clone(),
                            detail: format!("{} is longer than announced", self.what),
                        });
                    }
                    return Ok(Some(chunk));
                }
                Some(Err(e)) => {
                    self.body = None;
                    self.note_break(format!(
                        "reading {} at byte {}: {}",
                        self.what,
                        self.offset,
                        error_chain(&e.without_url())
                    ))?;
                }
                None => {
                    self.body = None;
                    match self.size {
                        Some(s) if self.offset < s => {
                            self.note_break(format!(
                                "{} ended at byte {} of {s}",
                                self.what, self.offset
                            ))?;
                        }
                        _ => return Ok(None),
                    }
                }
            }
        }
    }

    /// Records a broken body; fails once the resumptions are used up.
    fn note_break(&mut self, why: String) -> Result<(), Error> {
        if self.resumes >= MAX_RETRIES {
            return Err(Error::Transport(format!(
                "{why} (gave up after {} resumptions)",
                self.resumes
            )));
        }
        self.resumes += 1;
        debug!(reason = %why, attempt = self.resumes, "blob download broke, resuming");
        Ok(())
    }

    /// Re-requests the rest of the blob with a `Range` header.
    async fn reopen(&mut self) -> Result<(), Error> {
        tokio::time::sleep(backoff(self.resumes) / 2).await;
        let mut req = Req::new(Method::GET, self.url.clone());
        if self.offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={}-", self.offset))
                .map_err(|e| Error::Config(e.to_string()))?;
            req.headers.insert(header::RANGE, range);
        }
        let resp = match self
            .client
            .send(&self.ep, &self.scope, &self.what, &req)
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_transport() => {
                self.note_break(e.to_string())?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let resp = check(resp, &self.ep, &self.what).await?;
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            // `Content-Range: bytes <start>-<end>/<total>` must start where
            // we are.
            if let Some(cr) = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
            {
                let start = cr
                    .trim()
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if start != Some(self.offset) {
                    return Err(Error::Protocol {
                        registry: self.ep.registry.clone(),
                        detail: format!(
                            "resuming {} at byte {} got Content-Range {cr:?}",
                            self.what, self.offset
                        ),
                    });
                }
                if self.size.is_none() {
                    self.size = cr
                        .rsplit('/')
                        .next()
                        .and_then(|t| t.trim().parse::<u64>().ok());
                }
            }
            self.skip = 0;
        } else {
            // The server ignored the range and sends the whole blob again.
            self.skip = self.offset;
        }
        self.body = Some(resp.bytes_stream().boxed());
        Ok(())
    }
}
