//! The Language Server Protocol's base framing, spoken on a language server's stdin and
//! stdout: a header part (`Content-Length: N`, optionally `Content-Type`, each line
//! ended by `\r\n`), an empty line, then N bytes of JSON-RPC. The LSP bridge turns it
//! into one WebSocket message per JSON-RPC message and back.

/// Largest message accepted either way (a big workspace's symbols fit; each open
/// session may hold one in the server's memory, so it is bounded).
pub const MAX_MESSAGE: usize = 8 << 20;
/// Longest header part accepted.
const MAX_HEADER: usize = 8 << 10;

/// `body` framed for a language server's stdin.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LspFrameError {
    #[error("a message header longer than {MAX_HEADER} bytes")]
    HeaderTooLong,
    #[error("a message header without Content-Length")]
    NoLength,
    #[error("a malformed message header line {0:?}")]
    Malformed(String),
    #[error("a message of {0} bytes is over the limit")]
    TooLarge(usize),
}

/// Accumulates a language server's output and yields whole message bodies.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message's body, if one is buffered. After an error the stream
    /// cannot be resynchronised: the caller ends the session.
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, LspFrameError> {
        let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            // (A terminator starting within the limit would have ended by now.)
            return if self.buf.len() >= MAX_HEADER + 4 {
                Err(LspFrameError::HeaderTooLong)
            } else {
                Ok(None)
            };
        };
        if end > MAX_HEADER {
            return Err(LspFrameError::HeaderTooLong);
        }
        let header = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let mut length = None;
        for line in header.split("\r\n") {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| LspFrameError::Malformed(line.chars().take(80).collect()))?;
            if name.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = value
                    .trim()
                    .parse()
                    .map_err(|_| LspFrameError::Malformed(line.chars().take(80).collect()))?;
                length = Some(n);
            }
        }
        let n = length.ok_or(LspFrameError::NoLength)?;
        if n > MAX_MESSAGE {
            return Err(LspFrameError::TooLarge(n));
        }
        let start = end + 4;
        if self.buf.len() < start + n {
            return Ok(None);
        }
        let body = self.buf[start..start + n].to_vec();
        self.buf.drain(..start + n);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_anywhere_come_out_whole() {
        let a = br#"{"jsonrpc":"2.0","id":1,"result":{"x":"\u00e9 \r\n\r\n"}}"#;
        let b = br#"{"jsonrpc":"2.0","method":"window/logMessage"}"#;
        let mut wire = encode(a);
        // Other headers are allowed, in any case.
        wire.extend_from_slice(
            format!(
                "content-type: application/vscode-jsonrpc; charset=utf-8\r\nCONTENT-LENGTH: {}\r\n\r\n",
                b.len()
            )
            .as_bytes(),
        );
        wire.extend_from_slice(b);
        for cut in 0..wire.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                d.push(part);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, vec![a.to_vec(), b.to_vec()], "cut at {cut}");
        }
    }

    #[test]
    fn bad_headers_are_errors_not_waits() {
        let err = |bytes: &[u8]| {
            let mut d = Decoder::default();
            d.push(bytes);
            d.next_message()
        };
        assert_eq!(
            err(b"Content-Type: x\r\n\r\n{}"),
            Err(LspFrameError::NoLength)
        );
        assert!(matches!(
            err(b"Content-Length: ten\r\n\r\n"),
            Err(LspFrameError::Malformed(_))
        ));
        assert!(matches!(
            err(b"garbage\r\n\r\n"),
            Err(LspFrameError::Malformed(_))
        ));
        assert_eq!(
            err(format!("Content-Length: {}\r\n\r\n", MAX_MESSAGE + 1).as_bytes()),
            Err(LspFrameError::TooLarge(MAX_MESSAGE + 1))
        );
        assert_eq!(
            err(&[b'x'; MAX_HEADER + 4]),
            Err(LspFrameError::HeaderTooLong)
        );
        assert_eq!(err(&[b'x'; MAX_HEADER + 3]), Ok(None));
        // A part of a message is a wait.
        assert_eq!(err(b"Content-Length: 5\r\n\r\n{}"), Ok(None));
        assert_eq!(err(b"Content-Len"), Ok(None));
    }
}
