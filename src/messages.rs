//! The one channel between the data plane and the control thread.
//!
//! Shards push requests onto a lock-free queue and wake the control thread through an
//! `AtomicWaker`; each request that needs an answer carries its own oneshot. A shard never waits on
//! the control thread except inside the one request that asked, and then with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crossbeam_queue::SegQueue;
use futures::channel::oneshot;
use futures::task::AtomicWaker;

/// A peer that announced a key, with the address of its HTTP data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provider {
    pub peer_id: String,
    pub http: SocketAddr,
}

/// What shards ask of, or tell, the control thread.
#[derive(Debug)]
pub enum ControlRequest {
    /// Find peers that hold `key` (a digest or a `registry/name:tag`); answered with the first
    /// providers found (possibly none).
    FindProviders { key: String, reply: oneshot::Sender<Vec<Provider>> },
    /// Content is being served to a client from a peer (feeds the `P2PActive` event).
    ServedFromPeer { bytes: u64 },
    /// A request could not be served (feeds the `P2PFailed` event).
    RequestFailed { reason: String },
    /// A peer answered with bytes that did not match the digest: stop trusting it for a while.
    BadPeer { peer_id: String },
    /// The node's own content changed outside containerd (a pulled-through blob entered the
    /// cache): rescan and announce it.
    ContentChanged,
    /// peerd cannot start: report it (`P2PFailed`) and signal `published` once the report went
    /// out, or drop it when there is nowhere to report to.
    Fatal { reason: String, published: std::sync::mpsc::Sender<()> },
}

/// A lock-free multi-producer queue with one consumer that sleeps on an `AtomicWaker`: how
/// shards reach the control thread and the upstream thread without ever blocking.
/// The peers a shard may send a pull-through to (connected, not penalised, HTTP address known),
/// published by the control thread and read by shards without locks.
#[derive(Debug, Default)]
pub struct Members {
    me: [u8; 32],
    peers: Vec<([u8; 32], Provider)>,
}

pub type SharedMembers = Arc<arc_swap::ArcSwap<Members>>;

fn point(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn distance(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

impl Members {
    /// `me` and `peers` are peer ids in their byte form.
    pub fn new(me: &[u8], peers: impl IntoIterator<Item = (Vec<u8>, Provider)>) -> Self {
        Self { me: point(me), peers: peers.into_iter().map(|(id, p)| (point(&id), p)).collect() }
    }

    /// The node that fetches `key` from upstream for the whole cluster: the one closest to it in
    /// XOR space (as Kademlia measures). `None` when that is this node. Nodes that see the same
    /// peers agree, so concurrent misses meet at one node and upstream serves the blob once.
    pub fn home(&self, key: &str) -> Option<&Provider> {
        self.home_without(key, &[])
    }

    /// The home of `key` when the peers in `skip` are out (they did not answer): every node that
    /// found the same peers gone falls back to the same next one.
    pub fn home_without(&self, key: &str, skip: &[String]) -> Option<&Provider> {
        let k = point(key.as_bytes());
        let mine = distance(&self.me, &k);
        self.peers
            .iter()
            .filter(|(_, prov)| !skip.contains(&prov.peer_id))
            .map(|(p, prov)| (distance(p, &k), prov))
            .filter(|(d, _)| *d < mine)
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, p)| p)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

struct Inbox<T> {
    queue: SegQueue<T>,
    waker: AtomicWaker,
}

/// The producers' side of a [`mailbox`]; cheap to clone.
pub struct MailboxSender<T> {
    inbox: Arc<Inbox<T>>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        Self { inbox: self.inbox.clone() }
    }
}

/// The consumer's side of a [`mailbox`].
pub struct MailboxReceiver<T> {
    inbox: Arc<Inbox<T>>,
}

pub fn mailbox<T>() -> (MailboxSender<T>, MailboxReceiver<T>) {
    let inbox = Arc::new(Inbox { queue: SegQueue::new(), waker: AtomicWaker::new() });
    (MailboxSender { inbox: inbox.clone() }, MailboxReceiver { inbox })
}

impl<T> MailboxSender<T> {
    pub fn send(&self, item: T) {
        self.inbox.queue.push(item);
        self.inbox.waker.wake();
    }
}

impl<T> MailboxReceiver<T> {
    /// The next item; pending while the queue is empty.
    pub async fn recv(&self) -> T {
        futures::future::poll_fn(|cx| {
            if let Some(r) = self.inbox.queue.pop() {
                return Poll::Ready(r);
            }
            self.inbox.waker.register(cx.waker());
            // A push between the first pop and the registration would otherwise be missed.
            match self.inbox.queue.pop() {
                Some(r) => Poll::Ready(r),
                None => Poll::Pending,
            }
        })
        .await
    }
}

/// The shards' side of the control channel: cheap to clone, one per shard.
#[derive(Clone)]
pub struct ControlHandle {
    inbox: MailboxSender<ControlRequest>,
}

/// The control thread's side.
pub type ControlReceiver = MailboxReceiver<ControlRequest>;

pub fn channel() -> (ControlHandle, ControlReceiver) {
    let (tx, rx) = mailbox();
    (ControlHandle { inbox: tx }, rx)
}

impl ControlHandle {
    pub fn send(&self, req: ControlRequest) {
        self.inbox.send(req);
    }

    /// Providers of `key`, or none if the control thread has no answer within `deadline`.
    pub async fn find_providers(&self, key: String, deadline: Duration) -> Vec<Provider> {
        let (reply, rx) = oneshot::channel();
        self.send(ControlRequest::FindProviders { key, reply });
        match monoio::time::timeout(deadline, rx).await {
            Ok(Ok(providers)) => providers,
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cross_threads_and_replies_come_back() {
        let (handle, rx) = channel();
        let control = std::thread::spawn(move || {
            futures::executor::block_on(async {
                for _ in 0..2 {
                    match rx.recv().await {
                        ControlRequest::FindProviders { key, reply } => {
                            let http = "198.18.0.11:5000".parse().unwrap();
                            let _ = reply.send(vec![Provider { peer_id: key, http }]);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            })
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        rt.block_on(async {
            let p = handle.find_providers("k1".into(), Duration::from_secs(5)).await;
            assert_eq!(p[0].peer_id, "k1");
            let p = handle.find_providers("k2".into(), Duration::from_secs(5)).await;
            assert_eq!(p[0].peer_id, "k2");
        });
        control.join().unwrap();
    }

    #[test]
    fn every_node_picks_the_same_home() {
        let provider =
            |i: u8| Provider { peer_id: format!("p{i}"), http: format!("198.18.0.{i}:5000").parse().unwrap() };
        let ids: Vec<Vec<u8>> = (1..=5u8).map(|i| vec![i; 8]).collect();
        let views: Vec<Members> = (0..5)
            .map(|me| {
                let others = (0..5).filter(|&j| j != me).map(|j| (ids[j].clone(), provider(j as u8 + 1)));
                Members::new(&ids[me], others)
            })
            .collect();
        let mut homes_used = std::collections::HashSet::new();
        for key in (0..64).map(|i| format!("sha256:{i:064x}")) {
            // Each node names either itself or a peer; all of them must name the same node.
            let named: Vec<String> = views
                .iter()
                .enumerate()
                .map(|(me, v)| v.home(&key).map(|p| p.peer_id.clone()).unwrap_or(format!("p{}", me + 1)))
                .collect();
            assert!(named.iter().all(|n| *n == named[0]), "{key}: {named:?}");
            homes_used.insert(named[0].clone());
        }
        // With the home gone, every node that noticed names the same next one.
        let key = "sha256:feed";
        let first = views[0].home(key).map(|p| p.peer_id.clone()).unwrap_or("p1".into());
        let next: Vec<String> = views
            .iter()
            .enumerate()
            .filter(|(me, _)| format!("p{}", me + 1) != first)
            .map(|(me, v)| {
                v.home_without(key, std::slice::from_ref(&first))
                    .map(|p| p.peer_id.clone())
                    .unwrap_or(format!("p{}", me + 1))
            })
            .collect();
        assert!(next.iter().all(|n| *n == next[0] && *n != first), "{first} then {next:?}");
        // And the work spreads over the nodes.
        assert!(homes_used.len() >= 4, "{homes_used:?}");
    }

    #[test]
    fn a_silent_control_thread_costs_only_the_deadline() {
        let (handle, _rx) = channel();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        let p = rt.block_on(handle.find_providers("k".into(), Duration::from_millis(20)));
        assert!(p.is_empty());
    }
}
