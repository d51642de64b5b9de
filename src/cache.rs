//! Pull-through: blobs this node fetches from the upstream registry, shared while they arrive.
//!
//! One upstream fetch per digest per node: the first request that misses everywhere starts a
//! [`Transfer`], and every later request for the same digest (on any shard, or from a peer) reads
//! the same growing file with `sendfile` as the bytes land. The bytes are hashed as they arrive,
//! and readers hold back the last byte of what they send until the whole blob checked out, so a
//! client never sees the end of a wrong body. A verified blob is renamed into the cache, where
//! the store serves it and the control thread announces it like containerd's content.

use std::collections::HashMap;
use std::fs::File;
use std::future::poll_fn;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use crate::oci::Digest;

/// Readers are woken when this many new bytes arrived, or this long after the last wake (a slow
/// upstream still trickles through), or at the end -- not on every write.
const WAKE_EVERY: u64 = 256 * 1024;
const WAKE_AFTER: Duration = Duration::from_millis(10);

/// Where a transfer stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for upstream's response head; the size is not known yet.
    Connecting,
    /// The body is arriving.
    Receiving,
    /// Every byte arrived and matched the digest.
    Verified,
    /// Upstream refused, failed, or sent bytes that did not match. `before_body`: nothing of the
    /// body was promised yet, so a client can be told 404 and go to the registry itself.
    Failed { reason: String, before_body: bool },
}

struct Progress {
    state: State,
    size: u64,
    written: u64,
    woken_at: u64,
    woken: Instant,
    wakers: Vec<Waker>,
}

/// One upstream fetch in flight, read by any number of clients.
pub struct Transfer {
    pub digest: Digest,
    /// The growing file, opened for reading (`sendfile` takes explicit offsets, so one fd serves
    /// every reader).
    pub file: File,
    partial: PathBuf,
    progress: Mutex<Progress>,
}

/// What a reader sees when it wakes.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub state: State,
    pub size: u64,
    pub written: u64,
}

impl Transfer {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready` holds for the progress, and returns it.
    pub async fn wait(&self, ready: impl Fn(&Snapshot) -> bool) -> Snapshot {
        poll_fn(|cx| {
            let mut p = self.lock();
            let snap = Snapshot { state: p.state.clone(), size: p.size, written: p.written };
            if ready(&snap) || matches!(snap.state, State::Failed { .. }) {
                return Poll::Ready(snap);
            }
            if !p.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                p.wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Waits for the size (upstream's response head) or a failure.
    pub async fn wait_head(&self) -> Snapshot {
        self.wait(|s| s.state != State::Connecting).await
    }

    /// How far a reader may send, given it wants bytes up to `end` (exclusive): everything
    /// written, except that the final byte of its window waits for verification.
    pub fn sendable(snap: &Snapshot, end: u64) -> u64 {
        match snap.state {
            State::Verified => end,
            _ => snap.written.min(end.saturating_sub(1)),
        }
    }

    // ---- the writer's side (the upstream thread) ----

    pub fn set_size(&self, size: u64) {
        let mut p = self.lock();
        p.size = size;
        p.state = State::Receiving;
        wake_all(&mut p);
    }

    pub fn advance(&self, n: u64) {
        let mut p = self.lock();
        p.written += n;
        if p.written - p.woken_at >= WAKE_EVERY || p.woken.elapsed() >= WAKE_AFTER {
            p.woken_at = p.written;
            p.woken = Instant::now();
            wake_all(&mut p);
        }
    }

    fn finish(&self, state: State) {
        let mut p = self.lock();
        // Verified is final: readers may already have sent their last byte.
        if p.state != State::Verified {
            p.state = state;
        }
        wake_all(&mut p);
    }

    /// Every byte arrived and matched: readers may send their last byte now, while the writer
    /// still makes the copy durable before it moves into the cache.
    pub fn mark_verified(&self) {
        self.finish(State::Verified);
    }

    /// The body started: a client may have been promised it.
    pub fn is_started(&self) -> bool {
        self.lock().state != State::Connecting
    }
}

fn wake_all(p: &mut Progress) {
    for w in p.wakers.drain(..) {
        w.wake();
    }
}

/// The outcome of asking the cache for a digest.
pub enum Begin {
    /// Someone is already fetching it: read along.
    Joined(Arc<Transfer>),
    /// This request started the fetch: hand the writer to the upstream thread, then read along.
    Started(Arc<Transfer>, File),
    /// It finished in the meantime: the store serves it.
    Cached,
}

/// The node's pull-through cache: `<dir>/sha256/<hex>`, plus the transfers in flight.
pub struct BlobCache {
    dir: PathBuf,
    inflight: Mutex<HashMap<Digest, Arc<Transfer>>>,
    /// Bytes promised to transfers in flight that are not on disk yet: a free-space check must
    /// count them, or transfers started together each see the same free space.
    reserved: Arc<AtomicU64>,
}

/// Disk space held for one transfer until it ends.
pub struct Reservation {
    bytes: u64,
    reserved: Arc<AtomicU64>,
}

impl Reservation {
    /// `n` of the held bytes are on disk now: the filesystem's free space counts them from here.
    pub fn written(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.reserved.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl BlobCache {
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into().join("sha256");
        std::fs::create_dir_all(&dir)?;
        // Leftovers of a previous run were never verified.
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self { dir, inflight: Mutex::new(HashMap::new()), reserved: Arc::default() })
    }

    /// Holds `size` bytes for a transfer if the filesystem has room for them, beyond what other
    /// transfers hold and `keep_free`. `free` is the filesystem's free space now.
    pub fn reserve(&self, size: u64, free: u64, keep_free: u64) -> Result<Reservation, u64> {
        let mut held = self.reserved.load(Ordering::Relaxed);
        loop {
            let available = free.saturating_sub(held);
            if available < size.saturating_add(keep_free) {
                return Err(available);
            }
            match self.reserved.compare_exchange_weak(held, held + size, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(Reservation { bytes: size, reserved: self.reserved.clone() }),
                Err(now) => held = now,
            }
        }
    }

    fn final_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Digest, Arc<Transfer>>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transfer of `digest` if one is in flight.
    pub fn joined(&self, digest: &Digest) -> Option<Arc<Transfer>> {
        self.map().get(digest).cloned()
    }

    /// Joins the fetch of `digest`, or starts one. The map lock is held across the check of the
    /// final file so that a fetch finishing concurrently is seen either in flight or in the cache.
    pub fn begin(&self, digest: &Digest) -> io::Result<Begin> {
        let mut map = self.map();
        if let Some(t) = map.get(digest) {
            return Ok(Begin::Joined(t.clone()));
        }
        if self.final_path(digest).is_file() {
            return Ok(Begin::Cached);
        }
        let partial = self.dir.join(format!("{}.partial", digest.hex()));
        let writer = File::create(&partial)?;
        let file = File::open(&partial)?;
        let t = Arc::new(Transfer {
            digest: digest.clone(),
            file,
            partial,
            progress: Mutex::new(Progress {
                state: State::Connecting,
                size: 0,
                written: 0,
                woken_at: 0,
                woken: Instant::now(),
                wakers: Vec::new(),
            }),
        });
        map.insert(digest.clone(), t.clone());
        Ok(Begin::Started(t, writer))
    }

    /// Ends a transfer: a verified blob moves into the cache, anything else is deleted. Readers
    /// that hold the transfer keep reading its fd either way.
    pub fn finish(&self, t: &Transfer, result: Result<(), (String, bool)>) {
        let mut map = self.map();
        let state = match result {
            Ok(()) => match std::fs::rename(&t.partial, self.final_path(&t.digest)) {
                Ok(()) => State::Verified,
                Err(e) => {
                    // The bytes are right and readers have them; only the cache copy is lost.
                    tracing::warn!(digest = %t.digest, error = %e, "could not keep a pulled-through blob");
                    let _ = std::fs::remove_file(&t.partial);
                    State::Verified
                }
            },
            Err((reason, before_body)) => {
                let _ = std::fs::remove_file(&t.partial);
                State::Failed { reason, before_body }
            }
        };
        t.finish(state);
        map.remove(&t.digest);
    }

    /// Ends a verified transfer without keeping its copy; readers keep reading its fd.
    pub fn discard(&self, t: &Transfer) {
        let mut map = self.map();
        let _ = std::fs::remove_file(&t.partial);
        t.finish(State::Verified);
        map.remove(&t.digest);
    }
}

/// Keeps the cache under `max_bytes`: drops the copies containerd now holds itself (the store
/// serves containerd's), then the oldest. Returns how many files were removed. Runs on the
/// control thread's blocking pool, never on a shard.
pub fn trim(store: &crate::store::ContentStore, max_bytes: u64) -> usize {
    let Some(dir) = store.cache_dir() else { return 0 };
    let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
    let mut kept: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".partial") {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        let in_containerd = Digest::parse(&format!("sha256:{name}")).is_ok_and(|d| store.blob_path(&d).is_file());
        if in_containerd {
            if std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
            continue;
        }
        kept.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), e.path()));
    }
    let mut total: u64 = kept.iter().map(|k| k.1).sum();
    // Oldest first; but a blob larger than the whole cache goes before any other, or keeping it
    // in size would empty the cache and then drop that blob too.
    kept.sort_by_key(|(modified, len, _)| (*len <= max_bytes, *modified));
    for (_, len, path) in kept {
        if total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            removed += 1;
        }
    }
    removed
}

/// The verified blobs in the cache.
pub fn cached_digests(store: &crate::store::ContentStore) -> Vec<Digest> {
    let Some(dir) = store.cache_dir() else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            if name.ends_with(".partial") {
                return None;
            }
            Digest::parse(&format!("sha256:{name}")).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_hold_back_the_last_byte_until_verified() {
        let s = |state, written| Snapshot { state, size: 10, written };
        assert_eq!(Transfer::sendable(&s(State::Receiving, 4), 10), 4);
        assert_eq!(Transfer::sendable(&s(State::Receiving, 10), 10), 9);
        assert_eq!(Transfer::sendable(&s(State::Verified, 10), 10), 10);
        // A window that ends early also waits for its own last byte.
        assert_eq!(Transfer::sendable(&s(State::Receiving, 8), 5), 4);
    }

    #[test]
    fn transfers_started_together_share_the_free_space() {
        let dir = std::env::temp_dir().join(format!("peerd-cache-reserve-{}", std::process::id()));
        let cache = BlobCache::new(&dir).unwrap();
        let a = cache.reserve(600, 1000, 100).expect("room for the first");
        assert_eq!(cache.reserve(600, 1000, 100).err(), Some(400), "the second must see the first's share");
        let b = cache.reserve(300, 1000, 100).expect("room for a smaller one");
        drop(a);
        let mut c = cache.reserve(500, 1000, 100).expect("an ended transfer gives its share back");
        // c wrote 400 of its 500 bytes: the filesystem now shows 600 free, of which only 100 are
        // still c's; b holds 300.
        c.written(400);
        assert!(cache.reserve(100, 600, 100).is_ok(), "written bytes are not counted twice");
        assert_eq!(cache.reserve(101, 600, 100).err(), Some(200));
        drop(c);
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn trim_drops_a_blob_larger_than_the_cache_first() {
        let dir = std::env::temp_dir().join(format!("peerd-cache-trim-{}", std::process::id()));
        let store = crate::store::ContentStore::new(dir.join("content")).with_cache(dir.join("cache"));
        let cache = store.cache_dir().unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        let put = |name: &str, len: usize| std::fs::write(cache.join(name), vec![0u8; len]).unwrap();
        put(&"a".repeat(64), 100); // oldest
        std::thread::sleep(Duration::from_millis(20));
        put(&"b".repeat(64), 100);
        std::thread::sleep(Duration::from_millis(20));
        put(&"c".repeat(64), 1000); // newest, larger than the whole cache
        put(&format!("{}.partial", "d".repeat(64)), 50); // in flight: never trimmed
        assert_eq!(trim(&store, 500), 1);
        let mut left: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy()[..1].to_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a", "b", "d"], "the two that fit stay");
        put(&"e".repeat(64), 400);
        assert_eq!(trim(&store, 500), 1, "then the oldest goes");
        assert!(!cache.join("a".repeat(64)).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_transfer_per_digest_and_failures_leave_nothing() {
        let dir = std::env::temp_dir().join(format!("peerd-cache-{}", std::process::id()));
        let cache = BlobCache::new(&dir).unwrap();
        let d = Digest::of(b"hello");
        let Ok(Begin::Started(t, _w)) = cache.begin(&d) else { panic!("first request starts") };
        assert!(matches!(cache.begin(&d), Ok(Begin::Joined(_))));
        cache.finish(&t, Err(("upstream said 404".into(), true)));
        assert!(!dir.join("sha256").join(format!("{}.partial", d.hex())).exists());
        assert!(!dir.join("sha256").join(d.hex()).exists());
        let Ok(Begin::Started(t, _w)) = cache.begin(&d) else { panic!("a failed fetch can be retried") };
        cache.finish(&t, Ok(()));
        assert!(matches!(cache.begin(&d), Ok(Begin::Cached)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
