//! Darkroom's object storage: the `object_store` crate over a local folder (the default) or any S3-compatible
//! store, with what the gateway builds fal's upload flows from.
//!
//! - [`Storage`]: streamed puts with a size limit, ranged gets, parts kept as temporary objects and joined at
//!   completion, deletes. Object keys are made by Darkroom (`objects/{id}`, `parts/{id}/{n}`), never from names
//!   users send, so no name or key can reach outside the store.
//! - [`Signer`]: capabilities for file URLs (`{id}.{exp}.{sig}`, HMAC-SHA256 with a key derived from the server
//!   secret), checked in constant time, and short-lived upload tokens.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

pub mod sign;
pub mod testing;

pub use sign::{Op, SignError, Signer, TokenClaims};

/// Where objects live.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageConfig {
    /// A folder on this machine.
    Local(PathBuf),
    /// An S3-compatible bucket. Credentials come from the standard `AWS_*` variables unless given in the URL's
    /// query (`access_key_id`, `secret_access_key`).
    S3 { url: String, endpoint: Option<String>, region: Option<String>, options: Vec<(String, String)> },
    /// Process memory (tests only).
    Memory,
}

impl StorageConfig {
    /// Parses `--storage`: a folder path, `file:///path`, `s3://bucket?endpoint=http://…&region=…`, or `memory:`.
    pub fn parse(s: &str) -> Result<StorageConfig, String> {
        if s == "memory:" {
            return Ok(StorageConfig::Memory);
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let u = url::Url::parse(s).map_err(|e| format!("bad storage URL '{s}': {e}"))?;
            let bucket = rest.split(['/', '?']).next().unwrap_or("");
            if bucket.is_empty() {
                return Err("an s3:// storage URL needs a bucket: s3://BUCKET?endpoint=…".into());
            }
            let mut endpoint = None;
            let mut region = None;
            let mut options = vec![];
            for (k, v) in u.query_pairs() {
                match k.as_ref() {
                    "endpoint" => endpoint = Some(v.to_string()),
                    "region" => region = Some(v.to_string()),
                    _ => options.push((k.to_string(), v.to_string())),
                }
            }
            return Ok(StorageConfig::S3 { url: format!("s3://{bucket}"), endpoint, region, options });
        }
        if let Some(p) = s.strip_prefix("file://") {
            return Ok(StorageConfig::Local(PathBuf::from(p)));
        }
        if s.contains("://") {
            return Err(format!(
                "unsupported storage '{s}': use a folder path, file:///path or s3://bucket?endpoint=…"
            ));
        }
        Ok(StorageConfig::Local(PathBuf::from(s)))
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object not found")]
    NotFound,
    #[error("larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the requested range is not satisfiable")]
    BadRange,
    #[error("reading the upload failed: {0}")]
    Body(String),
    #[error("storage: {0}")]
    Backend(String),
}

impl From<object_store::Error> for StorageError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound,
            e => StorageError::Backend(e.to_string()),
        }
    }
}

/// What a put wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    /// The backend's entity tag, unquoted.
    pub etag: String,
}

/// An object being read.
pub struct Reading {
    /// The object's whole size.
    pub size: u64,
    /// The byte range being sent.
    pub range: Range<u64>,
    pub stream: BoxStream<'static, Result<Bytes, StorageError>>,
}

/// Below this, an upload is buffered and written with one put; above, it goes out in parts as it arrives.
const SINGLE_PUT_MAX: usize = 8 * 1024 * 1024;

/// An object store and the operations Darkroom needs from it.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    describe: String,
    /// Whether objects are files on this machine (runners on it may read them without HTTP).
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// An object's key.
pub fn object_key(id: &str) -> String {
    format!("objects/{id}")
}

/// A multipart upload's part key.
pub fn part_key(id: &str, n: u32) -> String {
    format!("parts/{id}/{n:05}")
}

fn path(key: &str) -> ObjPath {
    ObjPath::from(key)
}

fn normalize_etag(e: Option<String>) -> String {
    e.unwrap_or_default().trim_matches('"').to_string()
}

impl Storage {
    pub fn open(cfg: &StorageConfig) -> Result<Storage, String> {
        match cfg {
            StorageConfig::Memory => Ok(Storage {
                store: Arc::new(object_store::memory::InMemory::new()),
                describe: "memory".into(),
                local_root: None,
            }),
            StorageConfig::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
                // Reads in 1 MiB chunks rather than the crate's default 8 KiB: fewer syscalls and frames.
                let fs = object_store::chunked::ChunkedStore::new(Arc::new(fs), 1 << 20);
                Ok(Storage {
                    store: Arc::new(fs),
                    describe: format!("local folder {}", dir.display()),
                    local_root: Some(dir),
                })
            }
            StorageConfig::S3 { url, endpoint, region, options } => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url.clone());
                if let Some(e) = endpoint {
                    b = b
                        .with_endpoint(e.clone())
                        .with_allow_http(e.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                b = b.with_region(region.clone().unwrap_or_else(|| "us-east-1".into()));
                for (k, v) in options {
                    let key = k.parse().map_err(|e| format!("storage option '{k}': {e}"))?;
                    b = b.with_config(key, v.clone());
                }
                let s3 = b.build().map_err(|e| format!("S3 storage: {e}"))?;
                Ok(Storage {
                    store: Arc::new(s3),
                    describe: format!("S3 {url} at {}", endpoint.as_deref().unwrap_or("AWS")),
                    local_root: None,
                })
            }
        }
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The folder objects live in, when they are files on this machine.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local_root.as_deref()
    }

    /// Writes a stream as `key`, refusing more than `limit` bytes (nothing is left behind when refused).
    pub async fn put_stream<S, E>(&self, key: &str, body: S, limit: u64) -> Result<Written, StorageError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let mut body = std::pin::pin!(body);
        let mut buf = BytesMut::new();
        let mut size: u64 = 0;
        // Small bodies: one put.
        loop {
            match body.next().await {
                None => {
                    let r = self.store.put(&path(key), PutPayload::from_bytes(buf.freeze())).await?;
                    return Ok(Written { size, etag: normalize_etag(r.e_tag) });
                }
                Some(Err(e)) => return Err(StorageError::Body(e.to_string())),
                Some(Ok(chunk)) => {
                    size += chunk.len() as u64;
                    if size > limit {
                        return Err(StorageError::TooLarge(limit));
                    }
                    buf.extend_from_slice(&chunk);
                    if buf.len() > SINGLE_PUT_MAX {
                        break;
                    }
                }
            }
        }
        // Large bodies: in parts, as they arrive.
        let upload = self.store.put_multipart(&path(key)).await?;
        let mut w = WriteMultipart::new(upload);
        w.write(&buf);
        drop(buf);
        let res: Result<(), StorageError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| StorageError::Body(e.to_string()))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(StorageError::TooLarge(limit));
                }
                w.wait_for_capacity(4).await?;
                w.write(&chunk);
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                let r = w.finish().await?;
                Ok(Written { size, etag: normalize_etag(r.e_tag) })
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }

    /// Writes bytes as `key`.
    pub async fn put_bytes(&self, key: &str, data: Bytes) -> Result<Written, StorageError> {
        let size = data.len() as u64;
        let r = self.store.put(&path(key), PutPayload::from_bytes(data)).await?;
        Ok(Written { size, etag: normalize_etag(r.e_tag) })
    }

    /// Size and entity tag of an object.
    pub async fn head(&self, key: &str) -> Result<Written, StorageError> {
        let m = self.store.head(&path(key)).await?;
        Ok(Written { size: m.size, etag: normalize_etag(m.e_tag) })
    }

    /// Reads an object, or the byte range `start..end` of it (`end` exclusive, `None` to the end).
    pub async fn get(&self, key: &str, range: Option<(u64, Option<u64>)>) -> Result<Reading, StorageError> {
        let mut opts = GetOptions::default();
        if let Some((start, end)) = range {
            opts.range = Some(match end {
                Some(end) if end <= start => return Err(StorageError::BadRange),
                Some(end) => GetRange::Bounded(start..end),
                None => GetRange::Offset(start),
            });
        }
        let r = match self.store.get_opts(&path(key), opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(StorageError::NotFound),
            Err(e) if range.is_some() && e.to_string().to_ascii_lowercase().contains("range") => {
                return Err(StorageError::BadRange);
            }
            Err(e) => return Err(e.into()),
        };
        let size = r.meta.size;
        let range = r.range.clone();
        let stream = r.into_stream().map_err(StorageError::from).boxed();
        Ok(Reading { size, range, stream })
    }

    /// Reads a whole object into memory, refusing more than `limit` bytes.
    pub async fn read_all(&self, key: &str, limit: u64) -> Result<Bytes, StorageError> {
        let r = self.get(key, None).await?;
        if r.size > limit {
            return Err(StorageError::TooLarge(limit));
        }
        let mut out = BytesMut::with_capacity(r.size as usize);
        let mut s = r.stream;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out.freeze())
    }

    /// Deletes an object; a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object under a prefix (`parts/{id}`).
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let keys: Vec<ObjPath> = self.store.list(Some(&path(prefix))).map_ok(|m| m.location).try_collect().await?;
        let n = keys.len() as u64;
        for k in keys {
            match self.store.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }

    /// The part numbers stored for an upload, with their sizes and tags.
    pub async fn parts(&self, id: &str) -> Result<Vec<(u32, Written)>, StorageError> {
        let prefix = format!("parts/{id}");
        let mut out: Vec<(u32, Written)> = self
            .store
            .list(Some(&path(&prefix)))
            .map_ok(|m| {
                let n = m.location.filename().and_then(|f| f.parse::<u32>().ok());
                (n, Written { size: m.size, etag: normalize_etag(m.e_tag) })
            })
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .filter_map(|(n, w)| n.map(|n| (n, w)))
            .collect();
        out.sort_by_key(|(n, _)| *n);
        Ok(out)
    }

    /// Joins objects, in order, into `dest` (streamed part by part, never whole in memory).
    pub async fn concat(&self, sources: &[String], dest: &str) -> Result<Written, StorageError> {
        let upload = self.store.put_multipart(&path(dest)).await?;
        let mut w = WriteMultipart::new(upload);
        let mut size = 0u64;
        let res: Result<(), StorageError> = async {
            for k in sources {
                let mut s = self.store.get(&path(k)).await?.into_stream();
                while let Some(c) = s.next().await {
                    let c = c?;
                    size += c.len() as u64;
                    w.wait_for_capacity(4).await?;
                    w.write(&c);
                }
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                let r = w.finish().await?;
                Ok(Written { size, etag: normalize_etag(r.e_tag) })
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }
}
