//! A TCP fault proxy between sidecars and the scheduler's internal listener: pass traffic,
//! blackhole it both ways (a network cut), or let requests through while dropping every
//! response ("execute then drop the response", Temporal's ExecuteAndTimeout). Faults act on
//! the bytes of open connections too, so keep-alive connections are cut as well.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward both ways.
    Pass = 0,
    /// Forward nothing either way: a symmetric network cut.
    Blackhole = 1,
    /// Forward requests, drop responses: an asymmetric partition.
    DropResponses = 2,
}

/// A running proxy; dropping it stops accepting.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`, to give sidecars as `SLUICE_API_URL`.
    pub url: String,
    mode: Arc<AtomicU8>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (e.g. `http://127.0.0.1:7071`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream host:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let mode = Arc::new(AtomicU8::new(ProxyMode::Pass as u8));
        let shared = mode.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pump(client_read, server_write, mode.clone(), |m| {
                        m == ProxyMode::Pass as u8 || m == ProxyMode::DropResponses as u8
                    });
                    let down = pump(server_read, client_write, mode, |m| {
                        m == ProxyMode::Pass as u8
                    });
                    tokio::join!(up, down);
                });
            }
        });
        FaultProxy {
            url,
            mode,
            acceptor,
        }
    }

    /// Changes what happens to traffic from now on.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// Copies bytes while `forward(mode)` holds, and swallows them otherwise.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    forward: fn(u8) -> bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if forward(mode.load(Ordering::SeqCst)) && to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A stand-in for a Kubernetes Service in front of several schedulers' internal listeners:
/// each connection goes to the first upstream (round robin) that accepts it.
pub struct Balancer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    upstreams: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    acceptor: JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl Balancer {
    /// Starts one with no upstream yet (connections are closed until one is added).
    pub async fn start() -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind balancer");
        let url = format!("http://{}", listener.local_addr().expect("balancer addr"));
        let upstreams: Arc<std::sync::Mutex<Vec<SocketAddr>>> = Arc::default();
        let shared = upstreams.clone();
        let acceptor = tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut client, _)) = listener.accept().await {
                next = next.wrapping_add(1);
                let targets = shared.lock().expect("upstreams").clone();
                tokio::spawn(async move {
                    for i in 0..targets.len() {
                        let target = targets[(next + i) % targets.len()];
                        if let Ok(mut server) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer {
            url,
            upstreams,
            acceptor,
        }
    }

    /// Adds `upstream` (`http://host:port`).
    pub fn add(&self, upstream: &str) {
        let addr: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream host:port");
        self.upstreams.lock().expect("upstreams").push(addr);
    }
}
