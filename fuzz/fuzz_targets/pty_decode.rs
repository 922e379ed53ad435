//! The PTY frame decoder (`forkbox_types::pty::Decoder`) on arbitrary bytes arriving in
//! arbitrary chunks: it never panics, never yields a frame over the size limit, gives
//! the same frames however the bytes are split, and every frame it yields re-encodes to
//! exactly the bytes it was decoded from (the encoding is canonical).

#![no_main]

use forkbox_fuzz::chunks;
use forkbox_types::pty::{encode, Decoder, Frame, FrameError, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

/// Decodes up to the first error; the frames and the error.
fn decode_all(parts: &[&[u8]]) -> (Vec<Frame>, Option<FrameError>) {
    let mut d = Decoder::default();
    let mut frames = Vec::new();
    for p in parts {
        d.push(p);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, bytes)) = data.split_first() else {
        return;
    };
    let whole = decode_all(&[bytes]);
    let split = decode_all(&chunks(bytes, seed));
    assert_eq!(whole, split, "the split changed what was decoded");
    let (frames, err) = whole;
    let mut consumed = Vec::new();
    for f in &frames {
        if let Frame::Data(d) = f {
            assert!(d.len() <= MAX_FRAME);
        }
        consumed.extend_from_slice(&encode(f));
    }
    assert!(
        bytes.starts_with(&consumed),
        "decoded frames do not re-encode to the input"
    );
    let rest = &bytes[consumed.len()..];
    match err {
        // Nothing decodable was left: at most an incomplete frame.
        None => {
            if rest.len() >= 5 {
                let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                assert!(rest.len() < 5 + len, "a whole frame was left undecoded");
            }
        }
        Some(FrameError::TooLarge(n)) => assert!(n > MAX_FRAME),
        Some(FrameError::Kind(k)) => assert!(k > 3 && rest.first() == Some(&k)),
        Some(FrameError::Malformed(_)) => assert!(matches!(rest.first(), Some(1..=3))),
    }
});
