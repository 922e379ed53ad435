//! The LSP framing decoder (`forkbox_types::lsp::Decoder`, which parses a language
//! server's output: sandbox-controlled bytes) on arbitrary bytes in arbitrary chunks:
//! it never panics, never yields a body over the size limit, gives the same messages
//! and error however the bytes are split, and a body it yields comes back whole when
//! framed again and decoded.

#![no_main]

use forkbox_fuzz::chunks;
use forkbox_types::lsp::{encode, Decoder, LspFrameError, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

/// Decodes up to the first error; the bodies and the error.
fn decode_all(parts: &[&[u8]]) -> (Vec<Vec<u8>>, Option<LspFrameError>) {
    let mut d = Decoder::default();
    let mut bodies = Vec::new();
    for p in parts {
        d.push(p);
        loop {
            match d.next_message() {
                Ok(Some(b)) => bodies.push(b),
                Ok(None) => break,
                Err(e) => return (bodies, Some(e)),
            }
        }
    }
    (bodies, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, bytes)) = data.split_first() else {
        return;
    };
    let whole = decode_all(&[bytes]);
    let split = decode_all(&chunks(bytes, seed));
    assert_eq!(whole, split, "the split changed what was decoded");
    for body in &whole.0 {
        assert!(body.len() <= MAX_MESSAGE);
        let again = decode_all(&[&encode(body)]);
        assert_eq!(again, (vec![body.clone()], None));
    }
});
