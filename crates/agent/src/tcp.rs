//! Reaching servers inside the sandbox from outside (preview ports):
//! - `POST /tcp?port=N`: the request body is written to a fresh TCP connection to the
//!   sandbox's own `127.0.0.1:N` (else `[::1]:N`), and what it answers is the response
//!   body; the end of the request body half-closes the connection, its end ends the
//!   response. Refused with 502 when nothing listens there.
//! - `GET /ports`: the TCP ports something listens on in the sandbox
//!   (`/proc/net/tcp{,6}` of its network namespace).

use bytes::Bytes;
use forkbox_types::agent::ListeningPort;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `port` and starts copying both ways; `Err` says why it could not connect.
pub async fn start(port: u16, input: Incoming, out: mpsc::Sender<Bytes>) -> Result<(), String> {
    let mut last = String::new();
    let mut conn = None;
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => {
                conn = Some(s);
                break;
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
    }
    let Some(conn) = conn else {
        return Err(format!(
            "nothing accepts connections on port {port} in the sandbox ({last})"
        ));
    };
    let _ = conn.set_nodelay(true);
    carry(conn, input, out);
    Ok(())
}

/// Copies `input` into `conn` (then half-closes it) and what `conn` sends into `out`,
/// until either side ends.
pub fn carry(conn: TcpStream, input: Incoming, out: mpsc::Sender<Bytes>) {
    let (mut rd, mut wr) = conn.into_split();
    // Host → server, then a half-close.
    let upload = tokio::spawn(async move {
        let mut body = input;
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if wr.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    // Server → host, until it closes or the host goes away.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                },
                _ = out.closed() => break,
            }
        }
        upload.abort();
    });
}

/// Listening TCP ports of the sandbox's network namespace, each once, ascending.
pub fn listening() -> Vec<ListeningPort> {
    let mut out: Vec<ListeningPort> = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for p in parse(&text, v6) {
            if !out.iter().any(|o| o.port == p.port) {
                out.push(p);
            }
        }
    }
    out.sort_by_key(|p| p.port);
    out
}

/// The LISTEN rows (state `0A`) of a `/proc/net/tcp{,6}` table.
fn parse(text: &str, v6: bool) -> Vec<ListeningPort> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some(ListeningPort {
                port,
                address: address(addr, v6)?,
            })
        })
        .collect()
}

/// A kernel-formatted address (host-order 32-bit words in hex) as text.
fn address(hex: &str, v6: bool) -> Option<String> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    Some(if v6 {
        let b: [u8; 16] = bytes.try_into().ok()?;
        std::net::Ipv6Addr::from(b).to_string()
    } else {
        let b: [u8; 4] = bytes.try_into().ok()?;
        std::net::Ipv4Addr::from(b).to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_rows_are_parsed() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1F40 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0";
        let got = parse(v4, false);
        assert_eq!(
            got,
            vec![
                ListeningPort {
                    port: 8000,
                    address: "0.0.0.0".into()
                },
                ListeningPort {
                    port: 3000,
                    address: "127.0.0.1".into()
                },
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1";
        assert_eq!(
            parse(v6, true),
            vec![ListeningPort {
                port: 8080,
                address: "::1".into()
            }]
        );
    }
}
