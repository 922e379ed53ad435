//! The Dockerfile front end (`forkbox_dockerfile::read`, which reads a client's
//! Dockerfile for a template build) on arbitrary text: it never panics, and what it
//! accepts names a base that is a template name (or Debian, or an image) and gives one
//! step per `RUN`, each ending in the command.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args = BTreeMap::from([("A".to_owned(), "x y".to_owned())]);
    match forkbox_dockerfile::read(text, &args) {
        Ok(r) => {
            if let Some(b) = &r.base {
                assert!(!b.is_empty() && b.len() <= 64);
                assert!(b.bytes().all(|c| c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || c == b'-'
                    || c == b'_'));
            }
            assert!(r.workdir.as_deref().is_none_or(|w| w.starts_with('/')));
            assert!(r.base.is_none() || r.image.is_none());
            // (From an image, steps before a WORKDIR run where the image says.)
            // (A USER's working directories are made by steps of their own.)
            if r.image.is_none() {
                for step in &r.run {
                    assert!(
                        step.contains(" && cd ")
                            || step.starts_with("mkdir -p ")
                            || step.starts_with("[ -d "),
                        "{step}"
                    );
                }
            }
            for step in &r.run {
                if step.starts_with(forkbox_types::api::BUILD_USER_STEP) {
                    assert!(forkbox_types::api::step_user(step).is_some(), "{step}");
                }
            }
        }
        Err(e) => assert!(e.to_string().starts_with("Dockerfile line ")),
    }
});
