//! PTY frames: encode → decode round-trips for any sequence of frames, whatever the
//! chunking of the bytes in between.

#![no_main]

use forkbox_fuzz::{chunks, ArbFrame};
use forkbox_types::pty::{encode, Decoder, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<ArbFrame>, u8)| {
    let (frames, seed) = input;
    let frames: Vec<Frame> = frames.into_iter().map(Frame::from).collect();
    let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
    let mut d = Decoder::default();
    let mut got = Vec::new();
    for c in chunks(&bytes, seed) {
        d.push(c);
        while let Some(f) = d.next_frame().expect("a frame we encoded failed to decode") {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
    assert_eq!(d.next_frame(), Ok(None), "bytes left over");
});
