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
    /// peerd cannot start: report it (`P2PFailed`) and signal `published` once the report went
    /// out, or drop it when there is nowhere to report to.
    Fatal { reason: String, published: std::sync::mpsc::Sender<()> },
}

struct Inbox {
    queue: SegQueue<ControlRequest>,
    waker: AtomicWaker,
}

/// The shards' side: cheap to clone, one per shard.
#[derive(Clone)]
pub struct ControlHandle {
    inbox: Arc<Inbox>,
}

/// The control thread's side.
pub struct ControlReceiver {
    inbox: Arc<Inbox>,
}

pub fn channel() -> (ControlHandle, ControlReceiver) {
    let inbox = Arc::new(Inbox { queue: SegQueue::new(), waker: AtomicWaker::new() });
    (ControlHandle { inbox: inbox.clone() }, ControlReceiver { inbox })
}

impl ControlHandle {
    pub fn send(&self, req: ControlRequest) {
        self.inbox.queue.push(req);
        self.inbox.waker.wake();
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

impl ControlReceiver {
    /// The next request; pending while the queue is empty.
    pub async fn recv(&self) -> ControlRequest {
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
    fn a_silent_control_thread_costs_only_the_deadline() {
        let (handle, _rx) = channel();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        let p = rt.block_on(handle.find_providers("k".into(), Duration::from_millis(20)));
        assert!(p.is_empty());
    }
}
