//! NDJSON framing of the agent's streams: any sequence of exec events (and of file
//! watch events) encoded one per line, with the agent's blank-line padding anywhere,
//! arrives intact through `forkbox_types::ndjson::Decoder` whatever the chunking. Catches an encoder
//! that lets a newline into a line (e.g. unescaped in a string).

#![no_main]

use arbitrary::Arbitrary;
use forkbox_fuzz::{chunks, ArbEvent, ArbExec, ArbFileOp, ArbWatch};
use forkbox_types::agent::{AgentEvent, ExecRequest, FileOp, WatchEvent};
use forkbox_types::ndjson::Decoder as NdjsonDecoder;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

#[derive(Arbitrary, Debug)]
struct Input {
    events: Vec<(ArbEvent, u8)>,
    watch: Vec<(ArbWatch, u8)>,
    ops: Vec<ArbFileOp>,
    execs: Vec<ArbExec>,
    seed: u8,
}

/// Encodes `items` as NDJSON, each followed by `pad` blank lines, decodes in chunks.
fn through<T: Serialize + DeserializeOwned + PartialEq + Debug>(items: &[(T, u8)], seed: u8) {
    let mut bytes = Vec::new();
    for (it, pad) in items {
        let line = serde_json::to_vec(it).expect("encodes");
        assert!(!line.contains(&b'\n'), "a newline inside an NDJSON line");
        bytes.extend_from_slice(&line);
        bytes.push(b'\n');
        bytes.extend(std::iter::repeat_n(b'\n', usize::from(pad % 8)));
    }
    let mut d = NdjsonDecoder::<T>::default();
    let mut got = Vec::new();
    for c in chunks(&bytes, seed) {
        d.push(c);
        while let Some(item) = d.next_item() {
            got.push(item.expect("our own line decodes"));
        }
    }
    assert_eq!(d.pending(), 0);
    assert_eq!(got.len(), items.len());
    for (g, (want, _)) in got.iter().zip(items) {
        assert_eq!(g, want);
    }
}

fuzz_target!(|input: Input| {
    let events: Vec<(AgentEvent, u8)> = input
        .events
        .into_iter()
        .map(|(e, p)| (e.into(), p))
        .collect();
    through(&events, input.seed);
    let watch: Vec<(WatchEvent, u8)> = input
        .watch
        .into_iter()
        .map(|(w, p)| (w.into(), p))
        .collect();
    through(&watch, input.seed);
    let ops: Vec<(FileOp, u8)> = input.ops.into_iter().map(|o| (o.into(), 0)).collect();
    through(&ops, input.seed);
    let execs: Vec<(ExecRequest, u8)> = input.execs.into_iter().map(|e| (e.into(), 1)).collect();
    through(&execs, input.seed);
});
