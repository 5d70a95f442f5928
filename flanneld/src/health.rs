//! The `/healthz` endpoint (Go flanneld's `--healthz-ip`/`--healthz-port`): 200 `flanneld is running`;
//! `/readyz` answers 200 once subnet.env is written, else 503; `/metrics` serves Prometheus text.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send its request head.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads until the end of the request head (`\r\n\r\n`), EOF or a full `buf`; returns the bytes
/// read, or `None` on an I/O error. A request may arrive in several segments: answering after the
/// first one and closing with the rest unread would reset the connection under the client.
async fn read_head(
    sock: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
) -> Option<usize> {
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Some(n)
}

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
                let mut buf = [0u8; 4096];
                let Ok(Some(n)) =
                    tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut sock, &mut buf)).await
                else {
                    return;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_head_in_several_segments_is_read_whole() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for part in ["GET ", "/metrics", " HTTP/1.1\r\n", "Host: x\r\n", "\r\n"] {
                client.write_all(part.as_bytes()).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut buf = [0u8; 256];
        let n = read_head(&mut server, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn an_unterminated_head_stops_at_eof_or_a_full_buffer() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let mut buf = [0u8; 256];
        assert_eq!(read_head(&mut server, &mut buf).await, Some(16));
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&[b'a'; 40]).await.unwrap();
        let mut small = [0u8; 8];
        assert_eq!(read_head(&mut server, &mut small).await, Some(8));
    }
}
