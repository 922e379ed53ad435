//! Framing of an interactive terminal session between the host and the agent
//! (`POST /pty`): both directions are a sequence of frames `[kind: u8][len: u32 BE]
//! [payload]`, so terminal bytes, window sizes and the exit status share one stream.

/// Terminal bytes (either direction).
pub const DATA: u8 = 0;
/// Host → agent: new window size, payload `rows: u16 BE, cols: u16 BE`.
pub const RESIZE: u8 = 1;
/// Agent → host: the process exited, payload `code: i32 BE`; the last frame.
pub const EXIT: u8 = 2;
/// Host → agent: end the terminal's process tree now (SIGKILL); the exit frame follows.
pub const KILL: u8 = 3;

/// Largest payload accepted in one frame.
pub const MAX_FRAME: usize = 1 << 20;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(Vec<u8>),
    Resize { rows: u16, cols: u16 },
    Exit(i32),
    Kill,
}

/// Encodes one frame.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let (kind, payload): (u8, Vec<u8>) = match frame {
        Frame::Data(d) => (DATA, d.clone()),
        Frame::Resize { rows, cols } => {
            let mut p = rows.to_be_bytes().to_vec();
            p.extend_from_slice(&cols.to_be_bytes());
            (RESIZE, p)
        }
        Frame::Exit(code) => (EXIT, code.to_be_bytes().to_vec()),
        Frame::Kill => (KILL, Vec::new()),
    };
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

/// Accumulates bytes and yields whole frames.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let kind = self.buf[0];
        let payload: Vec<u8> = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        Ok(Some(match kind {
            DATA => Frame::Data(payload),
            RESIZE => match payload[..] {
                [a, b, c, d] => Frame::Resize {
                    rows: u16::from_be_bytes([a, b]),
                    cols: u16::from_be_bytes([c, d]),
                },
                _ => return Err(FrameError::Malformed("resize")),
            },
            EXIT => match payload[..] {
                [a, b, c, d] => Frame::Exit(i32::from_be_bytes([a, b, c, d])),
                _ => return Err(FrameError::Malformed("exit")),
            },
            KILL if payload.is_empty() => Frame::Kill,
            KILL => return Err(FrameError::Malformed("kill")),
            k => return Err(FrameError::Kind(k)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_across_arbitrary_splits() {
        let frames = vec![
            Frame::Data(b"hello\r\n".to_vec()),
            Frame::Resize {
                rows: 40,
                cols: 120,
            },
            Frame::Data(vec![]),
            Frame::Kill,
            Frame::Exit(-3),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
        for split in 1..bytes.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(split) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split {split}");
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut d = Decoder::default();
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Kind(9)));
        let mut d = Decoder::default();
        d.push(&[RESIZE, 0, 0, 0, 1, 7]);
        assert_eq!(d.next_frame(), Err(FrameError::Malformed("resize")));
        let mut d = Decoder::default();
        d.push(&[DATA, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
    }
}
