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
            if b == b'\n' || self.buf.len() >= MAX_LINE {
                out.push(String::from_utf8_lossy(&self.buf).into_owned());
                self.buf.clear();
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

#[cfg(test)]
mod tests {
    use super::*;

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
