//! The metrics port: `/metrics/prometheus`, `/healthz`, `/readyz`, `/dashboard`. Runs on the control thread's
//! runtime; a scrape never touches a shard.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The live throughput page: one self-contained file (no internet at run time) that polls
/// `/metrics/prometheus` and draws per-core throughput.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What `/readyz` reports on, written by the control loop.
#[derive(Debug, Default)]
pub struct Health {
    pub containerd: AtomicBool,
    pub peers: AtomicUsize,
    /// `--bootstrap none`: a node alone by configuration is ready without peers.
    pub alone_ok: bool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.containerd.load(Ordering::Relaxed) && (self.alone_ok || self.peers.load(Ordering::Relaxed) > 0)
    }
}

pub async fn serve(listener: TcpListener, registry: Arc<Registry>, health: Arc<Health>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let registry = registry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &registry, &health)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, registry: &Registry, health: &Health) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let path = loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_owned(),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return respond(&mut stream, 400, "text/plain", "bad request\n").await,
        }
    };
    let path = path.split('?').next().unwrap_or("");
    match path {
        "/metrics/prometheus" | "/metrics" => {
            let body = crate::metrics::render(registry);
            respond(&mut stream, 200, "application/openmetrics-text; version=1.0.0; charset=utf-8", &body).await
        }
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/dashboard" | "/dashboard/" => respond(&mut stream, 200, "text/html; charset=utf-8", DASHBOARD).await,
        "/readyz" => {
            if health.ready() {
                respond(&mut stream, 200, "text/plain", "ready\n").await
            } else {
                let why = if health.containerd.load(Ordering::Relaxed) {
                    "no peers yet\n"
                } else {
                    "containerd not reachable\n"
                };
                respond(&mut stream, 503, "text/plain", why).await
            }
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        crate::dataplane::http::reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
