//! The `/healthz` endpoint (Go flanneld's `--healthz-ip`/`--healthz-port`): 200 `flanneld is running`;
//! `/readyz` answers 200 once subnet.env is written, else 503; `/metrics` serves Prometheus text.
//!
//! HTTP/1.1 by hyper. The server bounds itself (it listens on 0.0.0.0 by default): at most
//! [`Limits::max_connections`] connections at once (further clients wait in the listen backlog), a
//! client that does not send its request head within [`Limits::header_timeout`] is dropped, and no
//! connection lives longer than [`Limits::connection_timeout`].

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How much the health server takes on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send its request head.
    pub header_timeout: Duration,
    /// Time a connection may live.
    pub connection_timeout: Duration,
}

/// The limits flanneld uses.
pub(crate) const LIMITS: Limits = Limits {
    max_connections: 32,
    header_timeout: Duration::from_secs(5),
    connection_timeout: Duration::from_secs(30),
};

fn respond(path: &str, ready: &AtomicBool) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    let (status, body, ctype) = match path {
        "/healthz" => (StatusCode::OK, "flanneld is running".to_string(), text),
        "/readyz" if ready.load(Ordering::SeqCst) => {
            (StatusCode::OK, "flanneld is ready".to_string(), text)
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "flanneld is not ready yet".to_string(),
            text,
        ),
        "/metrics" => (
            StatusCode::OK,
            crate::metrics::render(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "404 page not found".to_string(),
            text,
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

/// Binds the endpoint and serves it until `shutdown`.
pub(crate) async fn serve(
    addr: std::net::SocketAddr,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("listening for /healthz on {addr} (check --healthz-ip/--healthz-port)")
    })?;
    tracing::info!(%addr, "serving /healthz");
    Ok(tokio::spawn(serve_on(listener, ready, shutdown, LIMITS)))
}

/// Serves on `listener` within `limits` until `shutdown`.
pub(crate) async fn serve_on(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // A permit first: past the limit, clients wait in the kernel's backlog, not in memory.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((sock, _)) = accepted else {
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = respond(req.uri().path(), &ready);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
            let _ = tokio::time::timeout(limits.connection_timeout, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve_on(
            l,
            Arc::new(AtomicBool::new(false)),
            stop.clone(),
            limits,
        ));
        (addr, stop)
    }

    async fn get(addr: std::net::SocketAddr, parts: &[&str]) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        for p in parts {
            c.write_all(p.as_bytes()).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_requests_also_in_several_segments() {
        let (addr, stop) = start(LIMITS).await;
        let r = get(
            addr,
            &["GET ", "/healthz", " HTTP/1.1\r\n", "Host: x\r\n", "\r\n"],
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.ends_with("flanneld is running"), "{r}");
        let r = get(addr, &["GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        let r = get(addr, &["GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
        assert!(r.contains("flannel_reconcile_runs_total"), "{r}");
        let r = get(addr, &["GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        stop.cancel();
    }

    #[tokio::test]
    async fn slow_clients_are_dropped_and_connections_are_limited() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(5),
        };
        let (addr, stop) = start(limits).await;
        // Two clients that never send anything hold both places...
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...so a third waits until the server drops them for their silence.
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            get(addr, &["GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"]),
        )
        .await
        .expect("answered once the silent clients were dropped");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "the third client waited for a place: {:?}",
            t.elapsed()
        );
        for mut c in idle {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
                .await
                .expect("the server closed the silent connection");
            // Closed (0) or reset, perhaps after a 408: either way, not kept.
            if let Ok(n) = n {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
            }
        }
        stop.cancel();
    }
}
