//! Volumes: persistent directories with a size limit, owned by a workspace, mounted
//! into any number of its sandboxes at create, outliving them all.

use crate::ids;
use crate::manager::Manager;
use crate::model::{Volume, VolumeMount};
use crate::CoreError;
use time::OffsetDateTime;

/// Smallest and largest volume, in MiB.
pub const MIN_SIZE_MB: u64 = 16;
pub const MAX_SIZE_MB: u64 = 1 << 20;
/// Most volumes one sandbox mounts.
pub const MAX_MOUNTS: usize = 16;

/// Paths a volume may not be mounted on (the sandbox's own special filesystems).
const RESERVED: &[&str] = &["/", "/proc", "/dev", "/sys", "/tmp"];

/// The file name of volume `id`'s image in the host's volumes dir.
pub fn image_file(id: &str) -> String {
    format!("{id}.img")
}

/// Checks the mount points of a create request.
pub fn check_mounts(mounts: &[VolumeMount]) -> Result<(), CoreError> {
    if mounts.len() > MAX_MOUNTS {
        return Err(CoreError::Invalid(format!(
            "a sandbox mounts at most {MAX_MOUNTS} volumes"
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for m in mounts {
        let p = m.mount.trim_end_matches('/');
        let bad = !m.mount.starts_with('/')
            || m.mount.len() > 256
            || m.mount.contains('\0')
            || m.mount.split('/').any(|c| c == ".." || c == ".")
            || RESERVED
                .iter()
                .any(|r| p.is_empty() || p == *r || (*r != "/" && p.starts_with(&format!("{r}/"))));
        if bad {
            return Err(CoreError::Invalid(format!(
                "volume mount {:?} must be an absolute path without . or .., not /, /proc, /dev, /sys or /tmp",
                m.mount
            )));
        }
        if !seen.insert(p.to_owned()) {
            return Err(CoreError::Invalid(format!("two volumes mount at {p}")));
        }
        if !ids::is_valid("vol", &m.id) {
            return Err(CoreError::NoVolume(m.id.clone()));
        }
    }
    Ok(())
}

impl Manager {
    /// Makes a volume of `workspace`.
    pub async fn create_volume(
        &self,
        workspace: &str,
        name: &str,
        size_mb: u64,
    ) -> Result<Volume, CoreError> {
        if name.is_empty() || name.len() > 128 || name.contains('\0') {
            return Err(CoreError::Invalid(
                "name must be 1-128 characters without NUL".into(),
            ));
        }
        if !(MIN_SIZE_MB..=MAX_SIZE_MB).contains(&size_mb) {
            return Err(CoreError::Invalid(format!(
                "size_mb must be between {MIN_SIZE_MB} and {MAX_SIZE_MB}"
            )));
        }
        let v = Volume {
            id: ids::new("vol"),
            name: name.to_owned(),
            size_mb,
            workspace: workspace.to_owned(),
            created_at: OffsetDateTime::now_utc(),
        };
        self.host_stores().create_volume(&v.id, size_mb).await?;
        if let Err(e) = self.store().insert_volume(&v).await {
            let _ = self.host_stores().delete_volume(&v.id).await;
            return Err(e.into());
        }
        tracing::info!(volume = %v.id, size_mb, "volume created");
        Ok(v)
    }

    /// Volumes of `workspace`.
    pub async fn volumes(&self, workspace: &str) -> Result<Vec<Volume>, CoreError> {
        Ok(self.store().list_volumes(Some(workspace)).await?)
    }

    /// Volume `id` if `workspace` owns it, else `NoVolume`.
    pub async fn volume_of(&self, workspace: &str, id: &str) -> Result<Volume, CoreError> {
        self.store()
            .get_volume(id)
            .await?
            .filter(|v| v.workspace == workspace)
            .ok_or_else(|| CoreError::NoVolume(id.to_owned()))
    }

    /// The workspace owning volume `id`, if it exists.
    pub async fn volume_workspace(&self, id: &str) -> Result<Option<String>, CoreError> {
        Ok(self.store().get_volume(id).await?.map(|v| v.workspace))
    }

    /// Bytes used in a volume, when the runtime knows.
    pub async fn volume_used(&self, id: &str) -> Option<u64> {
        self.host_stores().volume_used(id).await
    }

    /// Deletes a volume and its data; `Conflict` while a sandbox (running, paused or
    /// hibernated) mounts it.
    /// Checks that the sandbox about to be made by `runtime` may mount `mounts` beside
    /// the sandboxes that mount them now, and hands them to `runtime` if it attaches
    /// volumes as block devices. A guest's file system is its kernel's alone: a
    /// volume attached to a vm sandbox is mounted by no other sandbox, except that vm
    /// sandboxes may share one all read-only; and the host never mounts again a
    /// volume a guest had writable (`HostStores::detach_volume`).
    pub(crate) async fn claim_volumes(
        &self,
        runtime: &dyn crate::runtime::Runtime,
        mounts: &[VolumeMount],
    ) -> Result<(), CoreError> {
        let devices = runtime.capabilities().volumes_as_devices;
        // Every mount is checked before any is handed over.
        for m in mounts {
            let users = self.store().volume_users(&m.id).await?;
            // A runtime this server does not run counts as one with devices (the
            // stricter rule).
            let user_is_device = |u: &crate::store::VolumeUser| {
                self.all_runtimes()
                    .iter()
                    .find(|r| r.name() == u.runtime)
                    .is_none_or(|r| r.capabilities().volumes_as_devices)
            };
            let clash = if devices {
                users
                    .iter()
                    .find(|u| !(m.read_only && u.read_only && user_is_device(u)))
            } else {
                users.iter().find(|u| user_is_device(u))
            };
            if let Some(u) = clash {
                return Err(CoreError::Conflict(format!(
                    "volume {} is mounted by {} ({} runtime{}); a volume attached to a vm \
                     sandbox is mounted by no other sandbox, except read-only by vm \
                     sandboxes that all mount it read-only",
                    m.id,
                    u.sandbox,
                    u.runtime,
                    if u.read_only { ", read-only" } else { "" }
                )));
            }
        }
        if devices {
            for m in mounts {
                self.host_stores()
                    .detach_volume(&m.id, !m.read_only)
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn delete_volume(&self, workspace: &str, id: &str) -> Result<(), CoreError> {
        self.volume_of(workspace, id).await?;
        // Its image is on the node that made it.
        self.ensure_here(id).await?;
        let users = self.store().sandboxes_mounting(id).await?;
        if !users.is_empty() {
            return Err(CoreError::Conflict(format!(
                "volume {id} is mounted by {}; delete those sandboxes first",
                users.join(", ")
            )));
        }
        self.host_stores().delete_volume(id).await?;
        self.store().delete_volume(id).await?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str) -> VolumeMount {
        VolumeMount {
            id: "vol-0123456789abcdef".into(),
            mount: path.into(),
            read_only: false,
        }
    }

    #[test]
    fn mount_points_are_checked() {
        assert!(check_mounts(&[m("/data")]).is_ok());
        assert!(check_mounts(&[m("/mnt/a/b")]).is_ok());
        assert!(check_mounts(&[m("/tmpdata")]).is_ok());
        for bad in [
            "data", "/", "/proc", "/proc/x", "/dev/shm", "/sys", "/tmp", "/a/../b", "/a/./b", "",
        ] {
            assert!(check_mounts(&[m(bad)]).is_err(), "{bad:?}");
        }
        assert!(check_mounts(&[m("/a"), m("/a/")]).is_err());
        let bad_id = VolumeMount {
            id: "x".into(),
            mount: "/a".into(),
            read_only: false,
        };
        assert!(matches!(
            check_mounts(&[bad_id]),
            Err(CoreError::NoVolume(_))
        ));
    }
}
