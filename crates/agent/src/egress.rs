//! Egress of a vm guest, which has no network device: programs reach the sandbox's
//! proxy address ([`PROXY_ADDR`], set as `HTTP(S)_PROXY` by the host) on the guest's
//! loopback, where this listener takes their connections; the host fetches each one
//! through `POST /egress/accept` (the request body is what the proxy sends to the
//! program, the response body what the program sends) and serves it with the same
//! proxy code as a jail sandbox's, host names on the allowlist only.
//! - `POST /egress/listen`: starts the listener (once; `{}`).
//! - `POST /egress/accept`: answers when a program connects, then carries its bytes.

use forkbox_types::egress::PROXY_ADDR;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex, OnceCell};

/// Connections accepted and not yet fetched by the host; past this many, programs'
/// connections wait in the listen backlog.
const WAITING: usize = 64;

#[derive(Default, Clone)]
pub struct Egress {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    listening: OnceCell<()>,
    waiting: Mutex<Option<mpsc::Receiver<TcpStream>>>,
}

impl Egress {
    /// Puts the proxy address on the loopback device and starts accepting there.
    pub async fn listen(&self) -> Result<(), String> {
        self.inner
            .listening
            .get_or_try_init(|| async {
                let addr: SocketAddr = PROXY_ADDR
                    .parse()
                    .map_err(|_| format!("bad proxy address {PROXY_ADDR}"))?;
                let ip = match addr.ip() {
                    std::net::IpAddr::V4(ip) => ip,
                    std::net::IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
                };
                forkbox_sys::net::loopback_alias("lo:egress", ip)
                    .map_err(|e| format!("add {ip} to the loopback device: {e}"))?;
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("listen on {addr}: {e}"))?;
                let (tx, rx) = mpsc::channel(WAITING);
                *self.inner.waiting.lock().await = Some(rx);
                tokio::spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((s, _)) => {
                                let _ = s.set_nodelay(true);
                                if tx.send(s).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => {
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await
                            }
                        }
                    }
                });
                Ok::<(), String>(())
            })
            .await
            .map(|_| ())
    }

    /// The next program's connection (waits for one); `None` if not listening.
    pub async fn next(&self) -> Option<TcpStream> {
        let mut g = self.inner.waiting.lock().await;
        g.as_mut()?.recv().await
    }
}
