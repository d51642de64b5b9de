//! The node's own content: blobs read straight from containerd's content directory, and the
//! image names (tags) containerd holds, kept current by the control thread.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::oci::Digest;

/// Manifests and indexes larger than this are refused: real ones are a few KiB.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// The node's blobs: containerd's content store (`<root>/io.containerd.content.v1.content`),
/// then peerd's own cache of blobs it pulled through from upstream (`<data-dir>/cache`).
#[derive(Clone, Debug)]
pub struct ContentStore {
    root: PathBuf,
    cache: Option<PathBuf>,
}

impl ContentStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), cache: None }
    }

    /// Also serves (and announces) the verified blobs under `cache/sha256/<hex>`.
    pub fn with_cache(mut self, cache: impl Into<PathBuf>) -> Self {
        self.cache = Some(cache.into());
        self
    }

    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.cache.as_ref().map(|c| c.join("sha256"))
    }

    /// Where containerd keeps `digest`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// Where peerd's cache keeps `digest` once verified.
    pub fn cache_path(&self, digest: &Digest) -> Option<PathBuf> {
        self.cache_dir().map(|c| c.join(digest.hex()))
    }

    /// The file behind `digest` now: containerd's copy first, else the cache's.
    fn existing_path(&self, digest: &Digest) -> Option<PathBuf> {
        let p = self.blob_path(digest);
        if p.is_file() {
            return Some(p);
        }
        self.cache_path(digest).filter(|c| c.is_file())
    }

    /// Opens a committed blob; `NotFound` when neither containerd nor the cache has it (or GC
    /// removed it). An fd stays valid after GC unlinks the file, so a response in flight always
    /// completes.
    pub fn open(&self, digest: &Digest) -> io::Result<(File, u64)> {
        let file = match File::open(self.blob_path(digest)) {
            Ok(f) => f,
            Err(e) => match self.cache_path(digest) {
                Some(c) => File::open(c)?,
                None => return Err(e),
            },
        };
        let len = file.metadata()?.len();
        Ok((file, len))
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.existing_path(digest).is_some()
    }

    /// Reads a small blob (a manifest, index or config) whole.
    pub fn read_small(&self, digest: &Digest) -> io::Result<Vec<u8>> {
        let (file, len) = self.open(digest)?;
        if len > MAX_MANIFEST_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "manifest too large"));
        }
        let mut buf = Vec::with_capacity(len as usize);
        file.take(MAX_MANIFEST_BYTES).read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// Hashes a blob whole and compares it with its name. Slow (a full read): done once per
    /// blob, before it is announced, never on a shard.
    pub fn verify(&self, digest: &Digest) -> io::Result<bool> {
        use sha2::Digest as _;
        let (mut file, _) = self.open(digest)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(Digest::from_sha256(hasher.finalize().into()) == *digest)
    }

    /// Identifies the file now behind `digest`, so that a verification can be reused until the
    /// file changes.
    pub fn stamp(&self, digest: &Digest) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.existing_path(digest)?).ok()?;
        Some(FileStamp { ino: m.ino(), len: m.len(), mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec() })
    }
}

/// Inode, length and modification time of a blob file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i64,
}

/// Blobs already hashed and found correct, by the file they were in.
pub type VerifiedBlobs = HashMap<Digest, FileStamp>;

/// Keeps in `index` only the blobs whose bytes match their digest (hashing each new file once),
/// and only the tags whose manifest survived. Returns the digests that did not match.
pub fn keep_verified(store: &ContentStore, index: &mut LocalIndex, verified: &mut VerifiedBlobs) -> Vec<Digest> {
    let mut bad = Vec::new();
    let mut still = VerifiedBlobs::new();
    index.digests.retain(|d| {
        let Some(stamp) = store.stamp(d) else { return false };
        if verified.get(d) == Some(&stamp) {
            still.insert(d.clone(), stamp);
            return true;
        }
        match store.verify(d) {
            Ok(true) => {
                still.insert(d.clone(), stamp);
                true
            }
            // Not readable now (out of fds, an I/O error): not announced this round, not
            // judged either; the next scan hashes it again.
            Err(e) => {
                tracing::debug!(digest = %d, error = %e, "could not hash a blob; announcing it later");
                false
            }
            Ok(false) => {
                // A torn or damaged pull-through copy would be served to this node's containerd and
                // kept forever (a cached blob is never fetched again): drop it.
                if !store.blob_path(d).is_file() {
                    if let Some(c) = store.cache_path(d) {
                        let _ = std::fs::remove_file(c);
                    }
                }
                bad.push(d.clone());
                false
            }
        }
    });
    *verified = still;
    let digests = &index.digests;
    index.tags.retain(|_, t| digests.contains(&t.digest));
    bad
}

/// What an image name points to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// The image names containerd holds in our namespace (`registry/name:tag` → target), and every
/// digest that is really on disk and reachable from them. Replaced whole on each change.
#[derive(Debug, Default)]
pub struct LocalIndex {
    pub tags: HashMap<String, Target>,
    pub digests: HashSet<Digest>,
}

impl LocalIndex {
    /// Every DHT key this node should announce.
    pub fn keys(&self) -> HashSet<String> {
        self.tags.keys().cloned().chain(self.digests.iter().map(|d| d.to_string())).collect()
    }
}

/// Read by shards without locks, written by the control thread.
pub type SharedIndex = Arc<ArcSwap<LocalIndex>>;
