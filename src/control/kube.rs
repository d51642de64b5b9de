//! Kubernetes, when peerd runs in a pod: events on the pod's own object through kube's event
//! recorder, and `--bootstrap kubernetes` from a watch of the ready peerd pods.
//!
//! The API server is never on a pull's path: events go through a bounded queue that drops when
//! full, and everything here runs in its own tasks on the control thread's runtime.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::mpsc;

use super::events::Published;

/// Label every peerd pod carries (the chart sets it).
pub const POD_LABEL: &str = "app=peerd";
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Which pod this process is, from the downward API.
#[derive(Clone, Debug)]
pub struct PodIdentity {
    pub name: String,
    pub namespace: String,
}

impl PodIdentity {
    pub fn from_env() -> Option<Self> {
        let name = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty())?;
        let namespace = std::env::var("POD_NAMESPACE").ok().filter(|s| !s.is_empty())?;
        Some(Self { name, namespace })
    }
}

/// Connects to the API server (in-cluster config or `KUBECONFIG`), then publishes every event
/// that arrives on `events` and, if `peers` is given, reports the IPs of the other ready peerd
/// pods on it whenever they change. Retries the connection with backoff; never returns early.
pub async fn run(pod: PodIdentity, mut events: mpsc::Receiver<Published>, peers: Option<mpsc::Sender<Vec<IpAddr>>>) {
    let mut backoff = Duration::from_millis(500);
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the Kubernetes API server; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    if let Some(peers) = peers {
        tokio::spawn(watch_peers(client.clone(), pod.clone(), peers));
    }
    let reference = pod_reference(&client, &pod).await;
    let recorder = Recorder::new(client, Reporter { controller: "peerd".into(), instance: Some(pod.name.clone()) });
    while let Some((reason, note, published)) = events.recv().await {
        let event = Event {
            type_: if reason.is_warning() { EventType::Warning } else { EventType::Normal },
            reason: reason.as_str().into(),
            note: Some(note),
            action: "P2P".into(),
            secondary: None,
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, recorder.publish(&event, &reference)).await {
            Ok(Ok(())) => tracing::debug!(reason = reason.as_str(), "event published"),
            Ok(Err(e)) => tracing::warn!(error = %e, reason = reason.as_str(), "publishing an event failed"),
            Err(_) => tracing::warn!(reason = reason.as_str(), "publishing an event timed out"),
        }
        if let Some(p) = published {
            let _ = p.send(());
        }
    }
}

/// The pod's object reference, with its uid when the API server answers (events then follow
/// the pod object, not just its name).
async fn pod_reference(client: &Client, pod: &PodIdentity) -> ObjectReference {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let uid = match tokio::time::timeout(PUBLISH_TIMEOUT, api.get(&pod.name)).await {
        Ok(Ok(p)) => p.metadata.uid,
        _ => None,
    };
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.name.clone()),
        namespace: Some(pod.namespace.clone()),
        uid,
        ..Default::default()
    }
}

/// One watch per node on the peerd pods of our namespace: no polling, and it scales with the
/// number of pods, not with time.
async fn watch_peers(client: Client, me: PodIdentity, out: mpsc::Sender<Vec<IpAddr>>) {
    let api: Api<Pod> = Api::namespaced(client, &me.namespace);
    let cfg = watcher::Config::default().labels(POD_LABEL);
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let mut ready: HashMap<String, IpAddr> = HashMap::new();
    let mut init: HashMap<String, IpAddr> = HashMap::new();
    let mut last_sent: Vec<IpAddr> = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(p)) => update(&mut ready, &p, &me.name),
            Ok(watcher::Event::Delete(p)) => {
                if let Some(n) = p.metadata.name {
                    ready.remove(&n);
                }
            }
            Ok(watcher::Event::Init) => init.clear(),
            Ok(watcher::Event::InitApply(p)) => update(&mut init, &p, &me.name),
            Ok(watcher::Event::InitDone) => ready = std::mem::take(&mut init),
            Err(e) => {
                tracing::warn!(error = %e, "watching peerd pods failed; retrying");
                continue;
            }
        }
        let mut ips: Vec<IpAddr> = ready.values().copied().collect();
        ips.sort();
        ips.dedup();
        if ips != last_sent {
            last_sent = ips.clone();
            if out.send(ips).await.is_err() {
                return;
            }
        }
    }
}

fn update(set: &mut HashMap<String, IpAddr>, pod: &Pod, me: &str) {
    let Some(name) = pod.metadata.name.clone() else { return };
    match ready_ip(pod) {
        Some(ip) if name != me => {
            set.insert(name, ip);
        }
        _ => {
            set.remove(&name);
        }
    }
}

/// The pod's IP if it runs and is not being deleted. Readiness is not required: a peerd pod
/// becomes ready only once it has a peer, so waiting for Ready would keep every pod waiting.
fn ready_ip(pod: &Pod) -> Option<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}
