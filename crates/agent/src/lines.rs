//! Splits a byte stream into lines, the unit of a stdout/stderr event.

/// Longest line sent as one event; longer runs are split.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `chunk` and returns every complete line (newline included).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in chunk {
            self.buf.push(b);
            if b == b'\n' {
                out.push(String::from_utf8_lossy(&self.buf).into_owned());
                self.buf.clear();
            } else if self.buf.len() >= MAX_LINE {
                // A long run is cut before a character it would split; that
                // character's first bytes start the next piece.
                let cut = char_boundary(&self.buf);
                let rest = self.buf.split_off(cut);
                out.push(String::from_utf8_lossy(&self.buf).into_owned());
                self.buf = rest;
            }
        }
        out
    }

    /// The unterminated rest, if any (at end of stream).
    pub fn finish(&mut self) -> Option<String> {
        if self.buf.is_empty() {
            None
        } else {
            let s = String::from_utf8_lossy(&self.buf).into_owned();
            self.buf.clear();
            Some(s)
        }
    }
}

/// Where `buf` can be cut without splitting a UTF-8 character: before an incomplete
/// sequence at its end, else its end (invalid bytes are not held back).
fn char_boundary(buf: &[u8]) -> usize {
    let len = buf.len();
    // The last character starts at most 3 bytes before the end.
    for back in 1..=len.min(4) {
        let b = buf[len - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte
        }
        let want = match b {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if want > back { len - back } else { len };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_line_is_not_cut_inside_a_character() {
        for prefix in ["", "a", "ab", "abc"] {
            for ch in ["é", "€", "😀"] {
                let text = format!("{prefix}{}\n", ch.repeat(MAX_LINE / ch.len() + 100));
                let mut s = LineSplitter::default();
                let mut pieces = Vec::new();
                for chunk in text.as_bytes().chunks(1000) {
                    pieces.extend(s.push(chunk));
                }
                assert!(s.finish().is_none());
                assert!(pieces.len() >= 2);
                for p in &pieces {
                    assert!(
                        !p.contains('\u{FFFD}'),
                        "{prefix:?} {ch}: a character was cut"
                    );
                    assert!(p.len() <= MAX_LINE);
                }
                assert_eq!(pieces.concat(), text);
            }
        }
        // Bytes that are no UTF-8 still go out (replaced), never held back forever.
        let mut s = LineSplitter::default();
        let lines = s.push(&vec![0xFF; MAX_LINE + 1]);
        assert_eq!(lines.len(), 1);
    }

    #[test]
    fn splits_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"a\nb"), vec!["a\n"]);
        assert_eq!(s.push(b"c\n\nd"), vec!["bc\n", "\n"]);
        assert_eq!(s.finish().as_deref(), Some("d"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn caps_line_length() {
        let mut s = LineSplitter::default();
        let big = vec![b'x'; MAX_LINE + 10];
        let lines = s.push(&big);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(s.finish().map(|l| l.len()), Some(10));
    }
}
