//! The exec event stream as the HTTP API serves it (seed 000/001): one JSON object per
//! NDJSON line, `seq` strictly increasing within one exec call, `ts` in ms since the epoch.

use serde::{Deserialize, Serialize};

/// What one event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// One line of standard output, newline included when the process wrote one.
    Stdout(String),
    /// One line of standard error.
    Stderr(String),
    /// The exit code (128 + signal when killed by a signal).
    Exit(i32),
}

/// A numbered, timestamped exec event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecEvent {
    pub kind: EventKind,
    pub seq: u64,
    pub ts: u64,
}

/// The exact JSON shape of an event on the wire.
#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(rename = "type")]
    ty: String,
    data: serde_json::Value,
    seq: u64,
    ts: u64,
}

impl Serialize for ExecEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (ty, data) = match &self.kind {
            EventKind::Stdout(d) => ("stdout", serde_json::Value::from(d.as_str())),
            EventKind::Stderr(d) => ("stderr", serde_json::Value::from(d.as_str())),
            EventKind::Exit(c) => ("exit", serde_json::Value::from(*c)),
        };
        Wire {
            ty: ty.to_owned(),
            data,
            seq: self.seq,
            ts: self.ts,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ExecEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let w = Wire::deserialize(d)?;
        let text = |v: serde_json::Value| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => Err(D::Error::custom("data must be a string")),
        };
        let kind = match w.ty.as_str() {
            "stdout" => EventKind::Stdout(text(w.data)?),
            "stderr" => EventKind::Stderr(text(w.data)?),
            "exit" => EventKind::Exit(
                w.data
                    .as_i64()
                    .and_then(|c| i32::try_from(c).ok())
                    .ok_or_else(|| D::Error::custom("exit data must be an integer"))?,
            ),
            other => return Err(D::Error::custom(format!("unknown event type {other}"))),
        };
        Ok(ExecEvent {
            kind,
            seq: w.seq,
            ts: w.ts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_exactly_like_the_seed() {
        let ev = ExecEvent {
            kind: EventKind::Stdout("0\n".into()),
            seq: 1,
            ts: 1776510028036,
        };
        assert_eq!(
            serde_json::to_string(&ev).unwrap(),
            r#"{"type":"stdout","data":"0\n","seq":1,"ts":1776510028036}"#
        );
        let exit = ExecEvent {
            kind: EventKind::Exit(0),
            seq: 4,
            ts: 1776510028039,
        };
        let line = serde_json::to_string(&exit).unwrap();
        assert_eq!(
            line,
            r#"{"type":"exit","data":0,"seq":4,"ts":1776510028039}"#
        );
        assert_eq!(serde_json::from_str::<ExecEvent>(&line).unwrap(), exit);
    }

    #[test]
    fn rejects_unknown_types() {
        assert!(
            serde_json::from_str::<ExecEvent>(r#"{"type":"x","data":1,"seq":1,"ts":1}"#).is_err()
        );
    }
}
