//! Resource ids: a short type prefix and 16 random lowercase alphanumerics.

use rand::Rng;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A new random id such as `sbx-3k9x0q…`.
pub fn new(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let tail: String = (0..16)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}-{tail}")
}

/// True when `id` looks like an id with `prefix` (cheap check before any lookup).
pub fn is_valid(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|t| t.len() == 16 && t.bytes().all(|b| ALPHABET.contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_checked() {
        let id = new("sbx");
        assert!(id.starts_with("sbx-") && id.len() == 20);
        assert!(is_valid("sbx", &id));
        assert!(!is_valid("snap", &id));
        assert!(!is_valid("sbx", "sbx-../../etc"));
        assert_ne!(new("sbx"), new("sbx"));
    }
}
