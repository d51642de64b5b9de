//! What this node holds, according to containerd: the image names in our namespace (over gRPC)
//! and the blobs they reach that are really on disk (read straight from the content directory).
//! containerd may discard layers after unpacking and lazily pulled images have none, so only
//! blobs found on disk are ever advertised.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{ListImagesRequest, SubscribeRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;
use containerd_client::with_namespace;
use tokio::sync::mpsc;

use crate::oci::{Digest, ManifestDoc};
use crate::store::{ContentStore, LocalIndex, Target};

/// Errors of talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The socket could not be reached.
    #[error("connecting to containerd at {0}: {1}")]
    Connect(PathBuf, containerd_client::tonic::transport::Error),
    /// A gRPC call failed.
    #[error("containerd call failed: {0}")]
    Call(#[from] containerd_client::tonic::Status),
}

pub async fn connect(socket: &std::path::Path) -> Result<Channel, ContainerdError> {
    containerd_client::connect(socket).await.map_err(|e| ContainerdError::Connect(socket.to_owned(), e))
}

/// Lists the images of `namespace` and walks each to the blobs present in `store`.
pub async fn scan(channel: &Channel, namespace: &str, store: &ContentStore) -> Result<LocalIndex, ContainerdError> {
    let mut client = ImagesClient::new(channel.clone());
    let req = with_namespace!(ListImagesRequest { filters: vec![] }, namespace);
    let images = client.list(req).await?.into_inner().images;
    let mut index = LocalIndex::default();
    for image in images {
        let Some(target) = image.target else { continue };
        let Ok(digest) = Digest::parse(&target.digest) else { continue };
        if !walk(store, &digest, &mut index.digests, 0) {
            continue;
        }
        // `name@sha256:...` names carry no tag to announce.
        if image.name.contains('@') {
            continue;
        }
        index.tags.insert(
            image.name,
            Target { digest, media_type: target.media_type, size: u64::try_from(target.size).unwrap_or(0) },
        );
    }
    Ok(index)
}

/// Adds `digest` and everything below it that is on disk to `found`. Returns whether `digest`
/// itself is on disk.
fn walk(store: &ContentStore, digest: &Digest, found: &mut HashSet<Digest>, depth: u8) -> bool {
    if found.contains(digest) {
        return true;
    }
    if depth > 4 || !store.contains(digest) {
        return false;
    }
    found.insert(digest.clone());
    let Ok(bytes) = store.read_small(digest) else { return true };
    let Some(doc) = ManifestDoc::parse(&bytes) else { return true };
    for child in doc.children() {
        let Ok(d) = Digest::parse(&child.digest) else { continue };
        if doc.manifests.iter().any(|m| m.digest == child.digest) {
            walk(store, &d, found, depth + 1);
        } else if store.contains(&d) {
            found.insert(d);
        }
    }
    true
}

/// Forwards a unit message on every image or content change in `namespace`, reconnecting with
/// backoff; the receiver rescans. Ends when the receiver is gone.
pub async fn watch(socket: PathBuf, namespace: String, changed: mpsc::Sender<()>) {
    let filters = vec![
        format!("namespace==\"{namespace}\",topic~=\"^/images/\""),
        format!("namespace==\"{namespace}\",topic==\"/content/delete\""),
    ];
    let mut backoff = Duration::from_millis(200);
    loop {
        match subscribe(&socket, filters.clone(), &changed).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "containerd event stream lost; reconnecting");
                if changed.send(()).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn subscribe(
    socket: &std::path::Path,
    filters: Vec<String>,
    changed: &mpsc::Sender<()>,
) -> Result<(), ContainerdError> {
    let channel = connect(socket).await?;
    // A rescan on every (re)connection covers whatever happened while we were not listening. It
    // must not wait for the subscription: containerd sends the stream's headers only with its
    // first event.
    if changed.send(()).await.is_err() {
        return Ok(());
    }
    let mut client = EventsClient::new(channel);
    let mut stream = client.subscribe(SubscribeRequest { filters }).await?.into_inner();
    while let Some(envelope) = stream.message().await? {
        tracing::debug!(topic = %envelope.topic, "containerd event");
        if changed.send(()).await.is_err() {
            return Ok(());
        }
    }
    Err(ContainerdError::Call(containerd_client::tonic::Status::unavailable("event stream ended")))
}
