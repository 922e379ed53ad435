//! The agent protocol's JSON messages on arbitrary bytes: decoding never panics; a value
//! that decodes re-encodes to JSON that decodes to the same value, and encoding is
//! stable (encode ∘ decode ∘ encode = encode); the NDJSON event stream decoder
//! (`forkbox_types::ndjson::Decoder`) yields, for any chunking, exactly one item per non-empty
//! newline-terminated line, each equal to decoding that line on its own.

#![no_main]

use forkbox_fuzz::chunks;
use forkbox_types::agent::*;
use forkbox_types::ndjson::Decoder as NdjsonDecoder;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + Debug>(bytes: &[u8]) {
    let Ok(v) = serde_json::from_slice::<T>(bytes) else {
        return;
    };
    let once = serde_json::to_vec(&v).expect("a decoded value encodes");
    let back: T = serde_json::from_slice(&once).expect("our own encoding decodes");
    assert_eq!(back, v, "round trip changed the value");
    let twice = serde_json::to_vec(&back).expect("encodes");
    assert_eq!(once, twice, "encoding is not stable");
    assert!(!once.contains(&b'\n'), "an encoded message spans lines");
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, bytes)) = data.split_first() else {
        return;
    };
    round_trip::<AgentEvent>(bytes);
    round_trip::<WatchEvent>(bytes);
    round_trip::<ExecRequest>(bytes);
    round_trip::<RunCodeRequest>(bytes);
    round_trip::<FileOp>(bytes);
    round_trip::<FileOpReply>(bytes);
    round_trip::<FileInfo>(bytes);
    round_trip::<WriteReply>(bytes);
    round_trip::<PtyRequest>(bytes);
    round_trip::<BgInfo>(bytes);
    round_trip::<BgSignal>(bytes);
    round_trip::<Health>(bytes);
    round_trip::<JailInit>(bytes);
    round_trip::<JailInitReply>(bytes);
    round_trip::<ForkRequest>(bytes);
    round_trip::<ForkReply>(bytes);
    round_trip::<AdoptRequest>(bytes);
    round_trip::<AdoptReply>(bytes);

    // The stream decoder against a line-by-line oracle.
    let mut d = NdjsonDecoder::<AgentEvent>::default();
    let mut got = Vec::new();
    for c in chunks(bytes, seed) {
        d.push(c);
        while let Some(item) = d.next_item() {
            got.push(item.ok());
        }
    }
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    let unterminated = lines.pop().unwrap_or_default();
    let want: Vec<Option<AgentEvent>> = lines
        .into_iter()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).ok())
        .collect();
    assert_eq!(got, want);
    assert_eq!(d.pending(), unterminated.len());
});
