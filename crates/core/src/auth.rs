//! API keys and workspaces. A key is random, shown once at creation and stored only as
//! its SHA-256 hash; it belongs to one workspace, which owns sandboxes and snapshots.
//! Admin keys may manage every workspace's keys and quotas.

use rand::Rng;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The workspace of everything made without a key (local use) and of the first keys.
pub const DEFAULT_WORKSPACE: &str = "default";
/// Every key starts with this, so leaked keys are easy to recognise (secret scanners).
pub const KEY_PREFIX: &str = "fbk_";
/// Characters of a key after [`KEY_PREFIX`]: 43 base-62 characters ≈ 256 bits.
const KEY_LEN: usize = 43;
const KEY_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Who is calling: a key's workspace and rights, or the local user when auth is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub workspace: String,
    /// The key used, if any.
    pub token_id: Option<String>,
    pub token_name: Option<String>,
    pub admin: bool,
}

impl Principal {
    /// The caller when auth is off and no key was given: admin of the default workspace.
    pub fn local() -> Principal {
        Principal {
            workspace: DEFAULT_WORKSPACE.to_owned(),
            token_id: None,
            token_name: None,
            admin: true,
        }
    }
}

/// An API key's record (never the key itself).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Token {
    pub id: String,
    pub workspace: String,
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    pub admin: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// After this it authenticates nothing; `None`: never expires.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

impl Token {
    /// Whether the key still authenticates at `now`.
    pub fn in_force(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// A new key: its record and the key, which is shown this once.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub token: Token,
    pub key: String,
}

/// Limits of one workspace; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quota {
    pub max_sandboxes: Option<u64>,
    pub max_memory_mb: Option<u64>,
}

/// What a workspace holds now: sandboxes not ended, and the memory of those that run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub sandboxes: u64,
    pub memory_mb: u64,
}

impl Quota {
    /// Why adding `sandboxes` sandboxes of `memory_mb` each to `usage` breaks this quota.
    pub fn refuse(&self, ws: &str, usage: Usage, sandboxes: u64, memory_mb: u64) -> Option<String> {
        if let Some(max) = self.max_sandboxes {
            if usage.sandboxes + sandboxes > max {
                return Some(format!(
                    "workspace {ws} may have at most {max} sandboxes; it has {} and this would add {sandboxes}",
                    usage.sandboxes
                ));
            }
        }
        if let Some(max) = self.max_memory_mb {
            let more = sandboxes * memory_mb;
            if usage.memory_mb + more > max {
                return Some(format!(
                    "workspace {ws} may use at most {max} MiB of sandbox memory; it uses {} and this would add {more}",
                    usage.memory_mb
                ));
            }
        }
        None
    }

    pub fn is_unlimited(&self) -> bool {
        self.max_sandboxes.is_none() && self.max_memory_mb.is_none()
    }
}

/// A fresh random key.
pub fn new_key() -> String {
    let mut rng = rand::rngs::OsRng;
    let tail: String = (0..KEY_LEN)
        .map(|_| KEY_ALPHABET[rng.gen_range(0..KEY_ALPHABET.len())] as char)
        .collect();
    format!("{KEY_PREFIX}{tail}")
}

/// The stored form of a key: lowercase hex SHA-256.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The part of a key kept in listings.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(KEY_PREFIX.len() + 6).collect()
}

/// Stores `key` as a key of `workspace` (created if new). For operator tools working on
/// the database directly (`forkbox token create --data-dir`); the server goes through
/// [`crate::Manager::create_token`], which checks the caller's rights.
pub async fn issue(
    store: &crate::store::Store,
    key: &str,
    name: &str,
    workspace: &str,
    admin: bool,
    expires_at: Option<OffsetDateTime>,
) -> Result<NewToken, crate::store::StoreError> {
    let token = Token {
        id: crate::ids::new("tok"),
        workspace: workspace.to_owned(),
        name: name.to_owned(),
        prefix: key_prefix(key),
        admin,
        created_at: OffsetDateTime::now_utc(),
        revoked_at: None,
        expires_at,
    };
    store.insert_token(&token, &hash_key(key)).await?;
    Ok(NewToken {
        token,
        key: key.to_owned(),
    })
}

/// Workspace names: 1-64 of a-z, 0-9, '-', '_'.
pub fn valid_workspace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_hash_stably() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + KEY_LEN);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
        assert_eq!(hash_key("abc").len(), 64);
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key_prefix(&a).len(), KEY_PREFIX.len() + 6);
    }

    #[test]
    fn quotas_refuse_with_reasons() {
        let q = Quota {
            max_sandboxes: Some(2),
            max_memory_mb: Some(1024),
        };
        let u = Usage {
            sandboxes: 1,
            memory_mb: 512,
        };
        assert_eq!(q.refuse("w", u, 1, 512), None);
        assert!(q
            .refuse("w", u, 2, 16)
            .unwrap()
            .contains("at most 2 sandboxes"));
        assert!(q.refuse("w", u, 1, 513).unwrap().contains("1024 MiB"));
        assert_eq!(Quota::default().refuse("w", u, 100, 100_000), None);
    }

    #[test]
    fn workspace_names() {
        assert!(valid_workspace("team-a_1"));
        assert!(!valid_workspace(""));
        assert!(!valid_workspace("Team"));
        assert!(!valid_workspace("a/b"));
    }
}
