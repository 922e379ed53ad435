//! NDJSON, the framing of every stream forkbox speaks (the agent's events, the API's
//! exec and build streams): one JSON value per line. One encoder and one decoder for
//! the server, the agent, the CLI and the SDK's tests alike.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// `item` as one NDJSON line, newline included. A value that cannot be encoded (a map
/// with non-string keys; nothing forkbox sends) is an empty object rather than a panic.
pub fn line<T: Serialize + ?Sized>(item: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(item).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

/// Splits NDJSON bytes, pushed in chunks of any size, into lines and decodes each as
/// `T`. Empty lines (the padding the agent adds to keep its frames large) are skipped;
/// an unterminated last line is never yielded.
pub struct Decoder<T> {
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts (read lines are dropped in batches).
    start: usize,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> Default for Decoder<T> {
    fn default() -> Self {
        Decoder {
            buf: Vec::new(),
            start: 0,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: DeserializeOwned> Decoder<T> {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole line, decoded; `None` until a whole non-empty line is buffered.
    pub fn next_item(&mut self) -> Option<Result<T, serde_json::Error>> {
        while let Some(pos) = self.buf[self.start..].iter().position(|b| *b == b'\n') {
            let line = self.start..self.start + pos;
            self.start += pos + 1;
            if pos == 0 {
                continue;
            }
            return Some(serde_json::from_slice(&self.buf[line]));
        }
        None
    }

    /// Bytes buffered that are not yet a whole line.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::agent::AgentEvent;

    #[test]
    fn lines_come_out_whole_whatever_the_chunking() {
        let events = vec![
            AgentEvent::Stdout {
                data: "a\nb".into(),
            },
            AgentEvent::Stderr { data: "é".into() },
            AgentEvent::Exit {
                code: 3,
                signal: None,
                timed_out: false,
                oom_kills: None,
            },
        ];
        let mut bytes = Vec::new();
        for e in &events {
            bytes.extend_from_slice(&line(e));
            bytes.extend_from_slice(b"\n\n");
        }
        for split in 1..bytes.len() {
            let mut d = Decoder::<AgentEvent>::default();
            let mut got = Vec::new();
            for c in bytes.chunks(split) {
                d.push(c);
                while let Some(e) = d.next_item() {
                    got.push(e.ok());
                }
            }
            assert_eq!(got, events.iter().cloned().map(Some).collect::<Vec<_>>());
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn a_bad_line_is_an_error_and_the_rest_still_decodes() {
        let mut d = Decoder::<AgentEvent>::default();
        d.push(b"{\"type\":\"nope\"}\n{\"type\":\"stderr\",\"data\":\"x\"}\n{\"type\"");
        assert!(matches!(d.next_item(), Some(Err(_))));
        assert!(matches!(d.next_item(), Some(Ok(AgentEvent::Stderr { .. }))));
        assert!(d.next_item().is_none());
        assert_eq!(d.pending(), 7);
        d.push(b":\"stdout\",\"data\":\"y\"}\n");
        assert!(matches!(d.next_item(), Some(Ok(AgentEvent::Stdout { .. }))));
        assert_eq!(d.pending(), 0);
    }
}
