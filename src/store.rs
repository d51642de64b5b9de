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

/// containerd's content store, `<root>/io.containerd.content.v1.content`.
#[derive(Clone, Debug)]
pub struct ContentStore {
    root: PathBuf,
}

impl ContentStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// Opens a committed blob; `NotFound` when containerd does not have it (or GC removed it).
    /// An fd stays valid after GC unlinks the file, so a response in flight always completes.
    pub fn open(&self, digest: &Digest) -> io::Result<(File, u64)> {
        let file = File::open(self.blob_path(digest))?;
        let len = file.metadata()?.len();
        Ok((file, len))
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
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
