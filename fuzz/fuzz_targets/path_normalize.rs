//! The agent's pure path check (`files::normalize`) on arbitrary strings: it never
//! panics; it accepts exactly the non-empty paths of at most 4096 bytes without NUL and
//! without a `..` component; what it returns is absolute, still free of NUL and `..`,
//! and names the same path (absolute input unchanged, relative input under /root).

#![no_main]

use forkbox_agent::files::{normalize, FileError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let acceptable = !path.is_empty()
        && !path.contains('\0')
        && path.len() <= 4096
        && !path.split('/').any(|c| c == "..");
    match normalize(path) {
        Ok(p) => {
            assert!(acceptable, "accepted {path:?}");
            assert!(p.starts_with('/'), "{p:?} is not absolute");
            assert!(!p.contains('\0'));
            assert!(!p.split('/').any(|c| c == ".."), "{p:?} has a .. component");
            if path.starts_with('/') {
                assert_eq!(p, path);
            } else {
                assert_eq!(p, format!("/root/{path}"));
            }
        }
        Err(FileError::BadPath(_)) => assert!(!acceptable, "refused {path:?}"),
        Err(e) => panic!("normalize touched the filesystem: {e}"),
    }
});
