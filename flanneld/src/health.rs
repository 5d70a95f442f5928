//! The `/healthz` endpoint (Go flanneld's `--healthz-ip`/`--healthz-port`): 200 `flanneld is running`;
//! `/readyz` answers 200 once subnet.env is written, else 503; `/metrics` serves Prometheus text.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds the endpoint and serves it until `shutdown`.
pub(crate) async fn serve(
    ip: &str,
    port: u16,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind((ip, port)).await.with_context(|| {
        format!("listening for /healthz on {ip}:{port} (check --healthz-ip/--healthz-port)")
    })?;
    tracing::info!(%ip, port, "serving /healthz");
    Ok(tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((mut sock, _)) = accepted else {
                continue;
            };
            let ready = ready.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let metrics;
                let (status, body, ctype) = match path {
                    "/healthz" => ("200 OK", "flanneld is running", "text/plain; charset=utf-8"),
                    "/readyz" if ready.load(Ordering::SeqCst) => {
                        ("200 OK", "flanneld is ready", "text/plain; charset=utf-8")
                    }
                    "/readyz" => (
                        "503 Service Unavailable",
                        "flanneld is not ready yet",
                        "text/plain; charset=utf-8",
                    ),
                    "/metrics" => {
                        metrics = flannel_core::metrics::render_prometheus(
                            flannel_core::metrics::metrics(),
                        );
                        (
                            "200 OK",
                            metrics.as_str(),
                            "text/plain; version=0.0.4; charset=utf-8",
                        )
                    }
                    _ => (
                        "404 Not Found",
                        "404 page not found",
                        "text/plain; charset=utf-8",
                    ),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    }))
}
