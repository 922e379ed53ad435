//! `forkbox sandbox shell <id> [--cmd CMD]`: an interactive terminal in a sandbox over the
//! server's PTY WebSocket (`GET /v1/sandboxes/:id/exec/pty`, see `docs/api.md`).
//!
//! With a terminal on stdin, it is put in raw mode for the session (every key, Ctrl-C
//! included, goes to the sandbox) and restored at the end, and the window size is sent
//! at start and on every SIGWINCH. Without one (a pipe or a file), the terminal
//! settings are left alone and, at the end of the input, an end-of-file key (Ctrl-D) is
//! sent so that a shell reading it ends. The exit code is the remote program's.

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use nix::sys::termios::{self, SetArg, Termios};
use serde_json::{json, Value};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header as http_header;
use tokio_tungstenite::tungstenite::{self, Message};

/// The end-of-file key of a terminal in canonical mode.
const EOF_KEY: u8 = 0x04;

/// Puts the terminal on stdin in raw mode; restores its settings when dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("read the terminal settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw)
            .context("put the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// The size of the terminal on stdout (or stdin), if there is one.
fn window_size() -> Option<(u16, u16)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize struct, which lives on the stack.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((ws.ws_row.min(1000), ws.ws_col.min(1000)));
        }
    }
    None
}

fn resize_message(rows: u16, cols: u16) -> Message {
    Message::Text(
        json!({"type": "resize", "rows": rows, "cols": cols})
            .to_string()
            .into(),
    )
}

/// The PTY route's WebSocket URL for `base` (http → ws, https → wss).
fn pty_url(base: &str, id: &str, size: Option<(u16, u16)>, cmd: Option<&str>) -> String {
    let ws_base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    };
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some((rows, cols)) = size {
        q.append_pair("rows", &rows.to_string());
        q.append_pair("cols", &cols.to_string());
    }
    if let Some(c) = cmd {
        q.append_pair("cmd", c);
    }
    let q = q.finish();
    let path: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
    if q.is_empty() {
        format!("{ws_base}/v1/sandboxes/{path}/exec/pty")
    } else {
        format!("{ws_base}/v1/sandboxes/{path}/exec/pty?{q}")
    }
}

/// Reads stdin on a thread of its own (a blocking read would hold up the async
/// runtime's shutdown); `None` marks the end of the input.
fn stdin_reader() -> tokio::sync::mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 8192];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Runs the session; the remote program's exit code.
pub async fn shell(
    base: &str,
    api_key: Option<&str>,
    id: &str,
    cmd: Option<&str>,
) -> anyhow::Result<i32> {
    let tty = std::io::stdin().is_terminal();
    let size = if tty { window_size() } else { None };
    let mut req = pty_url(base, id, size, cmd)
        .into_client_request()
        .context("the server URL")?;
    if let Some(k) = api_key {
        req.headers_mut().insert(
            http_header::AUTHORIZATION,
            format!("Bearer {k}").parse().context("api key")?,
        );
    }
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(c) => c,
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let body: Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            bail!(
                "{} ({status})",
                body["error"].as_str().unwrap_or("request failed")
            );
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot reach the forkbox server at {base}"))
        }
    };
    // From here on the terminal is raw until `_raw` drops, whatever happens.
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    let mut winch = signal(SignalKind::window_change()).context("watch window size changes")?;
    if let Some((rows, cols)) = size {
        ws.send(resize_message(rows, cols)).await?;
    }
    let mut input = stdin_reader();
    let mut input_open = true;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            msg = ws.next() => {
                let msg = match msg {
                    Some(m) => m.context("the terminal connection failed")?,
                    None => bail!("the server closed the terminal before the program exited"),
                };
                match msg {
                    Message::Binary(b) => {
                        out.write_all(&b)?;
                        out.flush()?;
                    }
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                        match v["type"].as_str() {
                            Some("exit") => {
                                let code = v["code"].as_i64().unwrap_or(-1) as i32;
                                let _ = ws.close(None).await;
                                return Ok(code);
                            }
                            Some("error") => bail!(
                                "{}",
                                v["message"].as_str().unwrap_or("the terminal failed")
                            ),
                            _ => {}
                        }
                    }
                    Message::Close(_) => {
                        bail!("the server closed the terminal before the program exited")
                    }
                    _ => {}
                }
            }
            data = input.recv(), if input_open => match data.flatten() {
                Some(d) => ws.send(Message::Binary(d.into())).await?,
                None => {
                    input_open = false;
                    if !tty {
                        ws.send(Message::Binary(vec![EOF_KEY].into())).await?;
                    }
                }
            },
            _ = winch.recv() => {
                if let Some((rows, cols)) = window_size() {
                    ws.send(resize_message(rows, cols)).await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            pty_url("http://127.0.0.1:7070", "sbx-1", None, None),
            "ws://127.0.0.1:7070/v1/sandboxes/sbx-1/exec/pty"
        );
        assert_eq!(
            pty_url("https://h", "sbx-1", Some((40, 100)), Some("python3 -q")),
            "wss://h/v1/sandboxes/sbx-1/exec/pty?rows=40&cols=100&cmd=python3+-q"
        );
        assert_eq!(
            pty_url("http://h", "a/b", None, None),
            "ws://h/v1/sandboxes/a%2Fb/exec/pty"
        );
    }
}
