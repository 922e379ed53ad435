//! Public preview links (issue 26): a sandbox's port reachable without a key, through a
//! preview host whose first label carries an expiry and a signature,
//! `{port}-{id}-{expiry hex}-{signature}`. The signature is an HMAC-SHA256 (96 bits
//! kept) of the sandbox, the port and the expiry under a key derived from the cluster
//! secret, so any node checks a link any node made, and a link names exactly one port
//! of one sandbox until it expires or the sandbox ends (its id is never reused).

use super::Manager;
use crate::access::SandboxRef;
use crate::auth::Principal;
use crate::CoreError;
use hmac::{Hmac, Mac};

/// Bytes of the HMAC kept in a link (hex: twice as many characters).
const SIG_BYTES: usize = 12;

/// The longest a public link may live.
pub const MAX_PREVIEW_SECS: u64 = 30 * 24 * 3600;

/// A public link to one port of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicPreview {
    /// The preview host's first label: `{port}-{id}-{expiry hex}-{signature}`.
    pub label: String,
    /// Unix seconds.
    pub expires: u64,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Manager {
    /// The MAC of a link to `port` of `id` until `expires`, fed and not yet finished.
    fn preview_mac(&self, id: &str, port: u16, expires: u64) -> Option<Hmac<sha2::Sha256>> {
        let key = format!("forkbox preview\0{}", self.cluster_secret()?);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).ok()?;
        mac.update(format!("{id}\0{port}\0{expires}").as_bytes());
        Some(mac)
    }

    /// A public link to `port` of `sbx`, valid for `secs` seconds (at most
    /// [`MAX_PREVIEW_SECS`]).
    pub fn public_preview(
        &self,
        sbx: &SandboxRef,
        port: u16,
        secs: u64,
    ) -> Result<PublicPreview, CoreError> {
        if port == 0 {
            return Err(CoreError::Invalid("port must be 1-65535".into()));
        }
        if secs == 0 || secs > MAX_PREVIEW_SECS {
            return Err(CoreError::Invalid(format!(
                "expires_in must be 1-{MAX_PREVIEW_SECS} seconds"
            )));
        }
        let expires = now() + secs;
        let mac = self
            .preview_mac(sbx.id(), port, expires)
            .ok_or_else(|| CoreError::Conflict("this node has not registered yet".into()))?
            .finalize()
            .into_bytes();
        let sig: String = mac[..SIG_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(PublicPreview {
            label: format!("{port}-{}-{expires:x}-{sig}", sbx.id()),
            expires,
        })
    }

    /// The caller a public link stands for: the sandbox's workspace without admin
    /// rights, when `label` is one this cluster signed and it has not expired; `None`
    /// otherwise (also for a plain `{port}-{id}` label).
    pub async fn preview_principal(&self, label: &str) -> Option<(u16, String, Principal)> {
        let (port, rest) = label.split_once('-')?;
        let (rest, sig) = rest.rsplit_once('-')?;
        let (id, expires) = rest.rsplit_once('-')?;
        // One spelling per link: digits (no sign, no leading zero) and lowercase hex.
        let digits =
            |s: &str| !s.is_empty() && !s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit());
        let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !digits(port)
            || !crate::ids::is_valid("sbx", id)
            || expires.is_empty()
            || expires.len() > 16
            || expires.starts_with('0')
            || !hex(expires)
            || sig.len() != 2 * SIG_BYTES
            || !hex(sig)
        {
            return None;
        }
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        let expires = u64::from_str_radix(expires, 16).ok()?;
        if expires <= now() {
            return None;
        }
        let given: Vec<u8> = (0..SIG_BYTES)
            .map(|i| u8::from_str_radix(sig.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        // Constant time, on the kept prefix.
        self.preview_mac(id, port, expires)?
            .verify_truncated_left(&given)
            .ok()?;
        let workspace = self.sandbox_workspace(id).await.ok()??;
        Some((
            port,
            id.to_owned(),
            Principal {
                workspace,
                token_id: None,
                token_name: Some("public preview link".into()),
                admin: false,
            },
        ))
    }
}
