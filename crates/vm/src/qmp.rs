//! A small typed client of QEMU's QMP (JSON lines over the VM's Unix socket): the
//! greeting, `qmp_capabilities`, then one command at a time; asynchronous events are
//! skipped.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connect to QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP sent an undecodable message: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command {0} got no answer in time")]
    Timeout(String),
}

/// What the VM is doing (`query-status`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub running: bool,
    pub status: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

pub struct Qmp {
    rx: BufReader<OwnedReadHalf>,
    tx: OwnedWriteHalf,
}

/// How long to wait before asking again how a migration goes: a device state takes
/// milliseconds, so often at first, then every 10 ms.
fn poll_pause(started: std::time::Instant) -> Duration {
    if started.elapsed() < Duration::from_millis(100) {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(10)
    }
}

/// How long one command may take.
const PATIENCE: Duration = Duration::from_secs(30);
/// The longest QMP message taken (`query-*` answers are a few KiB).
const MAX_LINE: u64 = 1 << 20;

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = s.into_split();
        let mut q = Qmp {
            rx: BufReader::new(r),
            tx: w,
        };
        let greeting = tokio::time::timeout(PATIENCE, q.next_message())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Closed);
        }
        q.execute::<Value>("qmp_capabilities", Value::Null).await?;
        Ok(q)
    }

    async fn next_message(&mut self) -> Result<Value, QmpError> {
        use tokio::io::AsyncReadExt as _;
        let mut line = String::new();
        loop {
            line.clear();
            // A QEMU taken over by its guest could send one endless line.
            let n = (&mut self.rx).take(MAX_LINE).read_line(&mut line).await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if !line.ends_with('\n') {
                return Err(QmpError::Io(std::io::Error::other(
                    "a QMP message longer than 1 MiB",
                )));
            }
            let v: Value = serde_json::from_str(line.trim())?;
            if v.get("event").is_some() {
                tracing::debug!(event = %v, "QMP event");
                continue;
            }
            return Ok(v);
        }
    }

    /// Runs `command` with `arguments` (`Value::Null`: none) and decodes its return.
    pub async fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T, QmpError> {
        let msg = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(b'\n');
        self.tx.write_all(&bytes).await?;
        let reply = tokio::time::timeout(PATIENCE, self.next_message())
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))??;
        Self::answer(command, reply)
    }

    /// A command's reply: its return decoded, or its error.
    fn answer<T: DeserializeOwned>(command: &str, reply: Value) -> Result<T, QmpError> {
        if let Some(e) = reply.get("error") {
            let e: ErrorBody = serde_json::from_value(e.clone())?;
            return Err(QmpError::Command {
                command: command.to_owned(),
                class: e.class,
                desc: e.desc,
            });
        }
        Ok(serde_json::from_value(
            reply.get("return").cloned().unwrap_or(Value::Null),
        )?)
    }

    /// Pauses every vCPU (`stop`).
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute::<Value>("stop", Value::Null).await.map(|_| ())
    }

    /// Resumes the vCPUs (`cont`).
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute::<Value>("cont", Value::Null).await.map(|_| ())
    }

    pub async fn status(&mut self) -> Result<Status, QmpError> {
        self.execute("query-status", Value::Null).await
    }

    /// Hands QEMU an open file as `name` (`getfd`, the fd travels as SCM_RIGHTS).
    pub async fn getfd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        self.execute_with_fd::<Value>("getfd", json!({"fdname": name}), fd)
            .await
            .map(|_| ())
    }

    /// Runs `command` with `arguments`, `fd` travelling with it as SCM_RIGHTS.
    async fn execute_with_fd<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<T, QmpError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        use std::os::fd::AsRawFd as _;
        let mut bytes = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))?;
        bytes.push(b'\n');
        let sock: &UnixStream = self.tx.as_ref();
        loop {
            sock.writable().await?;
            let fds = [fd.as_raw_fd()];
            let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<UnixAddr>(
                    sock.as_raw_fd(),
                    &[std::io::IoSlice::new(&bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == bytes.len() => break,
                Ok(_) => {
                    return Err(QmpError::Io(std::io::Error::other(format!(
                        "short {command} write"
                    ))))
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let reply = tokio::time::timeout(PATIENCE, self.next_message())
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))??;
        Self::answer(command, reply)
    }

    /// Saves the device state alone — no RAM section at all, whatever backs the RAM
    /// (`xen-save-devices-state`, which every machine has; the stream lacks the
    /// configuration section a migration has, see `ram::devices_only_stream`) — into
    /// `fd`, open write-only. The VM stays stopped.
    pub async fn save_devices_only(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        let added: Value = self.execute_with_fd("add-fd", json!({}), fd).await?;
        let set = added
            .get("fdset-id")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Command {
                command: "add-fd".into(),
                class: "Unexpected".into(),
                desc: format!("no fdset-id in {added}"),
            })?;
        let saved = self
            .execute::<Value>(
                "xen-save-devices-state",
                json!({"filename": format!("/dev/fdset/{set}"), "live": false}),
            )
            .await;
        let removed = self
            .execute::<Value>("remove-fd", json!({"fdset-id": set}))
            .await;
        saved.and(removed).map(|_| ())
    }

    /// Saves the VM (device state and RAM) into the file passed as `fdname`, waiting
    /// until the migration completed.
    pub async fn save_to_fd(&mut self, fdname: &str, patience: Duration) -> Result<(), QmpError> {
        self.set_ignore_shared(false).await?;
        // The default cap is 128 MiB/s; a save to a local file needs none.
        self.execute::<Value>(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1u64 << 40}),
        )
        .await?;
        self.execute::<Value>("migrate", json!({"uri": format!("fd:{fdname}")}))
            .await?;
        self.wait_migration("migrate", patience).await
    }

    /// Saves the device state only (RAM lives in a shared file the stream skips:
    /// `x-ignore-shared`) into the file passed as `fdname`.
    pub async fn save_devices_to_fd(
        &mut self,
        fdname: &str,
        patience: Duration,
    ) -> Result<(), QmpError> {
        self.set_ignore_shared(true).await?;
        let r = async {
            self.execute::<Value>("migrate", json!({"uri": format!("fd:{fdname}")}))
                .await?;
            self.wait_migration("migrate", patience).await
        }
        .await;
        let reset = self.set_ignore_shared(false).await;
        r.and(reset)
    }

    /// Whether migration streams skip RAM in shared memory backends.
    pub async fn set_ignore_shared(&mut self, on: bool) -> Result<(), QmpError> {
        self.execute::<Value>(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]}),
        )
        .await
        .map(|_| ())
    }

    /// Grows the disk of `device` to `size` bytes (the guest is told).
    pub async fn block_resize(&mut self, device: &str, size: u64) -> Result<(), QmpError> {
        self.execute::<Value>("block_resize", json!({"device": device, "size": size}))
            .await
            .map(|_| ())
    }

    /// Makes `overlay` (an existing qcow2 whose backing is the current image of
    /// `device`) the device's active image; the current one becomes read-only.
    pub async fn snapshot_disk(&mut self, device: &str, overlay: &Path) -> Result<(), QmpError> {
        self.execute::<Value>(
            "blockdev-snapshot-sync",
            json!({
                "device": device,
                "snapshot-file": overlay.display().to_string(),
                "format": "qcow2",
                "mode": "existing",
            }),
        )
        .await
        .map(|_| ())
    }

    /// Loads the VM from the file passed as `fdname` (QEMU started with `-incoming
    /// defer`), waiting until the migration completed.
    pub async fn load_from_fd(&mut self, fdname: &str, patience: Duration) -> Result<(), QmpError> {
        self.execute::<Value>("migrate-incoming", json!({"uri": format!("fd:{fdname}")}))
            .await?;
        let started = std::time::Instant::now();
        loop {
            let st = self.status().await?;
            if st.status != "inmigrate" {
                let m: Value = self.execute("query-migrate", Value::Null).await?;
                if m.get("status").and_then(Value::as_str) == Some("failed") {
                    return Err(QmpError::Command {
                        command: "migrate-incoming".into(),
                        class: "MigrationFailed".into(),
                        desc: m
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("incoming migration failed")
                            .to_owned(),
                    });
                }
                return Ok(());
            }
            if started.elapsed() > patience {
                return Err(QmpError::Timeout("migrate-incoming".into()));
            }
            tokio::time::sleep(poll_pause(started)).await;
        }
    }

    async fn wait_migration(&mut self, command: &str, patience: Duration) -> Result<(), QmpError> {
        let started = std::time::Instant::now();
        loop {
            let m: Value = self.execute("query-migrate", Value::Null).await?;
            match m.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class: "MigrationFailed".into(),
                        desc: m
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("migration failed")
                            .to_owned(),
                    })
                }
                _ => {}
            }
            if started.elapsed() > patience {
                return Err(QmpError::Timeout(command.to_owned()));
            }
            tokio::time::sleep(poll_pause(started)).await;
        }
    }

    /// Asks QEMU to exit (the answer may be lost as it goes).
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute::<Value>("quit", Value::Null).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
