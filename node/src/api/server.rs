//! The HTTP/1.1 server under the API: hyper driven by hand, because
//! `axum::serve` gives hyper no timer, and without one hyper turns its
//! header-read timeout off (a slowloris client then holds a socket forever).
//!
//! One task accepts; each connection runs in its own task holding a permit
//! of `max_connections` and one of its IP's `max_connections_per_ip`
//! (a connection past the per-IP cap is closed at once). hyper closes a
//! connection whose request headers do not arrive within
//! `header_timeout_s`, which is also how long an idle keep-alive connection
//! lives. Bodies, the request deadline and concurrency are the
//! [`guard`](super::guard)'s. HTTP/2 is not served: every OpenAI client
//! speaks HTTP/1.1, and one protocol is one set of limits to get right.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::guard::HttpConfig;

/// The address a request came from, in its extensions.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// Open connections per IP address.
#[derive(Default)]
struct PerIp {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerIp`], given back on drop.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(table: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut open = table.open.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: Arc::clone(table),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.table.open.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

/// Serves `app` on `listener` until `cancel` fires, then lets open
/// connections finish for up to `grace`.
pub async fn run(
    listener: TcpListener,
    app: Router,
    config: HttpConfig,
    cancel: CancellationToken,
    grace: Duration,
) {
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(config.header_timeout_s))
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            p = Arc::clone(&connections).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "HTTP API could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = PerIp::take(&per_ip, peer.ip(), config.max_connections_per_ip) else {
            tracing::debug!(%peer, "HTTP API: too many connections from this address; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = app
            .clone()
            .map_request(move |mut req: axum::http::Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req
            });
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("HTTP API: connections still open after the grace period");
    }
}
