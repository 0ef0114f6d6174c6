//! A small HTTP/1.1 server for three read-only pages: one request per
//! connection (`Connection: close`), GET and HEAD only, bounded in header
//! size, time and concurrent connections. Enough for Prometheus and the
//! kubelet's probes; nothing a web framework would add is needed here.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use log::{debug, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// The longest request head we read; ours carry no body.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client has this long to send its request and take the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

/// What the pages say, as functions of the moment they are asked.
pub struct Handler {
    /// The `/metrics` page (may read maps: run off the accepting task).
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// `/healthz`: `Err(why)` is a 503 carrying `why`.
    pub health: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
    /// `/readyz`: `Err(why)` is a 503 carrying `why`.
    pub readiness: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Bind `address` now, then serve from a thread of its own (with its own
/// runtime, so that the agent's loop and this server never wait on each
/// other). Returns the bound address (port 0 picks a free one).
pub fn serve(address: SocketAddr, handler: Handler) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let handler = Arc::new(handler);
    std::thread::Builder::new()
        .name("fe-metrics".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return warn!("metrics server: no runtime ({e}); not serving"),
            };
            runtime.block_on(accept_loop(listener, handler));
        })
        .context("starting the metrics thread")?;
    Ok(bound)
}

async fn accept_loop(listener: std::net::TcpListener, handler: Arc<Handler>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => return warn!("metrics server: {e}; not serving"),
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of fds and the like: pause instead of spinning.
                warn!("metrics server: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(CLIENT_TIMEOUT, connection(stream, handler)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("metrics client {peer}: {e:#}"),
                Err(_) => debug!("metrics client {peer}: timed out"),
            }
            drop(slot);
        });
    }
}

async fn connection(mut stream: TcpStream, handler: Arc<Handler>) -> Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let response = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(()); // closed before a whole request
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&head, b"\r\n\r\n") {
            head.truncate(end);
            break None;
        }
        if head.len() > MAX_REQUEST_HEAD {
            break Some(("GET", Response::text(431, "request head too large\n")));
        }
    };
    let (method, response) = match response {
        Some(too_large) => too_large,
        None => {
            let request_line = head
                .split(|&b| b == b'\n')
                .next()
                .map(|line| String::from_utf8_lossy(line).trim_end().to_owned())
                .unwrap_or_default();
            let method = if request_line.starts_with("HEAD ") {
                "HEAD"
            } else {
                "GET"
            };
            let handler = handler.clone();
            let response =
                tokio::task::spawn_blocking(move || respond(&handler, &request_line)).await?;
            (method, response)
        }
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    if response.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if method != "HEAD" {
        out.push_str(&response.body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await?;
    if response.status == 431 {
        // Closing with the rest of the request unread would reset the
        // connection and could lose the response on the way: read it first.
        let mut drained = 0;
        while drained < 16 * MAX_REQUEST_HEAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
    Ok(())
}

/// The response to one request line (`GET /metrics HTTP/1.1`).
pub fn respond(handler: &Handler, request_line: &str) -> Response {
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(505, "HTTP/1.x only\n");
    }
    if method != "GET" && method != "HEAD" {
        return Response::text(405, format!("{method} is not served here; use GET\n"));
    }
    let path = target.split('?').next().unwrap_or_default();
    let probe = |result: Result<(), String>| match result {
        Ok(()) => Response::text(200, "ok\n"),
        Err(why) => Response::text(503, format!("{why}\n")),
    };
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: (handler.metrics)(),
        },
        "/healthz" => probe((handler.health)()),
        "/readyz" => probe((handler.readiness)()),
        _ => Response::text(
            404,
            format!("{path}: not found; try /metrics, /healthz or /readyz\n"),
        ),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        sync::atomic::{AtomicBool, Ordering},
    };

    use super::*;

    fn handler(ready: Arc<AtomicBool>) -> Handler {
        Handler {
            metrics: Box::new(|| "fabedge_ready 1\n".to_owned()),
            health: Box::new(|| Ok(())),
            readiness: Box::new(move || {
                if ready.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("no plan applied yet".into())
                }
            }),
        }
    }

    fn exchange(address: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn serves_metrics_and_probes_over_real_tcp() {
        let ready = Arc::new(AtomicBool::new(false));
        let address = serve("127.0.0.1:0".parse().unwrap(), handler(ready.clone())).unwrap();

        let metrics = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            metrics,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: 16\r\nConnection: close\r\n\r\nfabedge_ready 1\n"
        );
        let not_ready = exchange(address, b"GET /readyz HTTP/1.1\r\n\r\n");
        assert!(
            not_ready.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{not_ready}"
        );
        assert!(
            not_ready.ends_with("\r\n\r\nno plan applied yet\n"),
            "{not_ready}"
        );
        ready.store(true, Ordering::Relaxed);
        let now_ready = exchange(address, b"GET /readyz HTTP/1.0\r\n\r\n");
        assert!(now_ready.starts_with("HTTP/1.1 200 OK\r\n"), "{now_ready}");
        let head = exchange(address, b"HEAD /healthz HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Length: 3\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
        // A request head split over several writes is still one request.
        let mut stream = TcpStream::connect(address).unwrap();
        stream.write_all(b"GET /heal").unwrap();
        stream.flush().unwrap();
        stream.write_all(b"thz HTTP/1.1\r\n\r\n").unwrap();
        let mut split = String::new();
        stream.read_to_string(&mut split).unwrap();
        assert!(split.starts_with("HTTP/1.1 200 OK\r\n"), "{split}");
    }

    #[test]
    fn refuses_what_it_does_not_serve() {
        let handler = handler(Arc::new(AtomicBool::new(true)));
        let status = |line: &str| respond(&handler, line).status;
        assert_eq!(status("GET /metrics?x=1 HTTP/1.1"), 200);
        assert_eq!(status("GET / HTTP/1.1"), 404);
        assert_eq!(status("POST /metrics HTTP/1.1"), 405);
        assert_eq!(status("GET /metrics HTTP/2"), 505);
        assert_eq!(status("GET /metrics"), 400);
        assert_eq!(status(""), 400);
        assert_eq!(
            respond(&handler, "GET /nope HTTP/1.1").body,
            "/nope: not found; try /metrics, /healthz or /readyz\n"
        );
    }

    #[test]
    fn an_oversized_request_head_gets_431() {
        let address = serve(
            "127.0.0.1:0".parse().unwrap(),
            handler(Arc::new(AtomicBool::new(true))),
        )
        .unwrap();
        let mut request = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD + 10));
        let response = exchange(address, &request);
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{response}"
        );
    }
}
