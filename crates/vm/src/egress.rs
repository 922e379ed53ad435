//! Egress of a vm sandbox created with an allowlist. The guest has no network device:
//! its agent listens on the proxy address on the guest's loopback (programs find it
//! through `HTTP(S)_PROXY`, as in a jail sandbox), and the host keeps a few
//! `POST /egress/accept` calls waiting on the agent; each one answers with a program's
//! connection, which the host serves with the jail's proxy code
//! (`forkbox_net::proxy::serve_incoming`): the same allowlist of host names, the same
//! refusal of private and host addresses, the same connection caps.

use super::*;
use forkbox_net::proxy;
use forkbox_types::egress::Allowlist;

/// `POST /egress/accept` calls kept waiting per VM: connections opened at once past
/// this many wait for one to be answered (a few milliseconds).
const ACCEPTS: usize = 4;

/// One program's connection as a byte stream for the proxy.
type Conn = tokio::io::DuplexStream;

impl VmInstance {
    /// Starts the guest's egress (listener and the host's tunnels) admitting `hosts`.
    /// `listen`: the guest's listener may not run yet (false for a paused guest, which
    /// cannot answer: it had one before).
    pub(crate) async fn start_egress(
        &self,
        hosts: &[String],
        listen: bool,
    ) -> Result<(), RuntimeError> {
        let Some(shared) = self.rt.egress.clone() else {
            return Err(RuntimeError::Rejected(
                "this server's vm runtime has no egress (egress_allowlist)".into(),
            ));
        };
        let allow = Allowlist::parse(hosts).map_err(|e| RuntimeError::Rejected(e.to_string()))?;
        let client = self.client()?.clone();
        if listen {
            client
                .egress_listen()
                .await
                .map_err(|e| self.agent_err(e))?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(ACCEPTS);
        let policy = Arc::new(proxy::Policy {
            allow,
            trusted: false,
        });
        let serving = proxy::serve_incoming(rx, policy, shared, self.id.clone());
        let id = self.id.clone();
        let accepting = async move {
            let mut waiting = tokio::task::JoinSet::new();
            loop {
                while waiting.len() < ACCEPTS {
                    waiting.spawn(accept_one(client.clone()));
                }
                match waiting.join_next().await {
                    Some(Ok(Ok(conn))) => {
                        if tx.send(conn).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Err(e))) => {
                        if !client.is_open() {
                            return;
                        }
                        tracing::debug!(sandbox = %id, error = %e, "vm egress accept");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Some(Err(_)) | None => {}
                }
            }
        };
        let task = tokio::spawn(async move {
            tokio::join!(accepting, serving);
        });
        if let Some(old) = self
            .egress
            .lock()
            .map(|mut g| g.replace(task.abort_handle()))
            .unwrap_or(None)
        {
            old.abort();
        }
        Ok(())
    }

    /// Ends the host's side of the guest's egress.
    pub(crate) fn stop_egress(&self) {
        if let Some(t) = self.egress.lock().ok().and_then(|mut g| g.take()) {
            t.abort();
        }
    }
}

/// Waits for a program's connection in the guest; its bytes both ways as a duplex
/// stream.
async fn accept_one(client: AgentClient) -> Result<Conn, forkbox_agent_client::AgentError> {
    use futures_util::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (to_guest, rx) =
        tokio::sync::mpsc::channel::<Result<Bytes, forkbox_agent_client::BoxError>>(2);
    let input =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let mut from_guest = client.egress_accept(input).await?;
    let (ours, theirs) = tokio::io::duplex(16 * 1024);
    let (mut rd, mut wr) = tokio::io::split(theirs);
    // Either direction's end ends the other: nothing waits on a side that is gone.
    let down = tokio::spawn(async move {
        while let Some(Ok(b)) = from_guest.next().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_guest
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // The proxy closed its side (or the guest's input is gone): the program's
        // connection ends too once what was sent is through.
        drop(to_guest);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while !down.is_finished() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        down.abort();
    });
    Ok(ours)
}
