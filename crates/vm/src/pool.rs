//! Boot images: a template's guest booted once, its Python REPL started, and captured
//! (`images.rs`); a create then restores a copy of it, mapping the captured RAM
//! privately (copy-on-write, one page cache for every copy) instead of booting a
//! kernel. One image per template, guest size and disk size, made in the background
//! after the first cold boot of that kind, kept in
//! `<run>/images/<template>-<mb>m-<n>c-<disk mb>d/`, and
//! made again when the template's disk image, the kernel, the agent or the
//! accelerator changed (its fingerprint).

use super::images::{limits_of, CaptureTo, Captured, KEPT_RAM, KEPT_STATE};
use super::*;
use forkbox_types::agent::{Language, RunCodeRequest};
use futures_util::StreamExt as _;

/// The file in an image's dir that says what it was made from.
const FINGERPRINT: &str = "fingerprint";

/// Most boot images kept; past it the least recently made go (copies made from them
/// keep their layers).
const MAX_IMAGES: usize = 4;

/// Prefix of the ids of the VMs booted to make an image (never sandboxes).
pub(crate) const IMAGE_VM_PREFIX: &str = "vmimg-";

impl Inner {
    fn image_dir(&self, template: &str, spec: &CreateSpec) -> PathBuf {
        let (mb, smp) = limits_of(spec);
        let disk = spec.disk_bytes >> 20;
        self.cfg
            .run_dir
            .join("images")
            .join(format!("{template}-{mb}m-{smp}c-{disk}d"))
    }

    /// What an image of `template` made now would be made from.
    async fn fingerprint(&self, template: &str) -> Option<String> {
        let stamp = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            let t = m
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            Some(format!("{}.{}:{}", t.as_secs(), t.subsec_nanos(), m.len()))
        };
        Some(format!(
            "disk {} kernel {} agent {} accel {} tsc {} grace {:?}\n",
            stamp(&self.image(template))?,
            stamp(&self.cfg.assets_dir.join("vmlinux"))?,
            stamp(&self.cfg.agent_bin)?,
            self.accel().await.as_str(),
            self.tsc_khz,
            self.cfg.orphan_grace,
        ))
    }

    /// The current boot image for `spec` (template, guest and disk size), if there is
    /// one.
    pub(crate) async fn boot_image(&self, spec: &CreateSpec) -> Option<Captured> {
        let dir = self.image_dir(&spec.template, spec);
        let have = std::fs::read_to_string(dir.join(FINGERPRINT)).ok()?;
        if have != self.fingerprint(&spec.template).await? {
            return None;
        }
        Captured::kept_in(&dir).filter(|c| c.fits(spec).is_ok())
    }

    /// Makes the boot image for `spec`'s template, guest and disk size in the background,
    /// unless one is being made.
    pub(crate) fn make_image_later(self: &Arc<Self>, spec: &CreateSpec) {
        let dir = self.image_dir(&spec.template, spec);
        {
            let mut making = match self.making_images.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            // One at a time, whatever asks: a boot image is a cache, not a right.
            if !making.is_empty() || !making.insert(dir.clone()) {
                return;
            }
        }
        let me = self.clone();
        let mut spec = spec.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let template = spec.template.clone();
            match me.make_image(&dir, &mut spec).await {
                Ok(()) => tracing::info!(
                    template,
                    ms = started.elapsed().as_millis() as u64,
                    "vm boot image made"
                ),
                Err(e) => tracing::warn!(template, error = %e, "making a vm boot image"),
            }
            let mut making = match me.making_images.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            making.remove(&dir);
        });
    }

    /// Boots a guest like `spec`'s (its template, guest and disk size; nothing of its
    /// own: no environment, egress or volumes) and captures it into `dir`.
    async fn make_image(
        self: &Arc<Self>,
        dir: &Path,
        spec: &mut CreateSpec,
    ) -> Result<(), RuntimeError> {
        let Some(fingerprint) = self.fingerprint(&spec.template).await else {
            return Err(self.assets_missing(format!("the image of template {}", spec.template)));
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // What an earlier server killed while making this image left.
        if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
            let stale = format!("{}.", name.to_string_lossy());
            for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&stale) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        spec.id = format!("{IMAGE_VM_PREFIX}{stamp}");
        spec.env = Default::default();
        spec.snapshot = None;
        spec.egress = None;
        spec.volumes = Vec::new();
        let vm = self.boot_fresh(spec).await?;
        let tmp = dir.with_extension(format!("tmp-{stamp}"));
        let made = async {
            // The REPL every copy starts with: Python started, its standard library read.
            let warm = RunCodeRequest {
                language: Language::Python,
                code: "import os, sys, json".into(),
                timeout_ms: Some(60_000),
            };
            let mut events = vm.agent()?.run_code(&warm).await?;
            while let Some(ev) = events.next().await {
                ev?;
            }
            let io = |e: std::io::Error| RuntimeError::host("make vm image", &vm.id, e);
            std::fs::create_dir_all(&tmp).map_err(io)?;
            vm.capture(CaptureTo {
                state: &tmp.join(KEPT_STATE),
                ram: Some(&tmp.join(KEPT_RAM)),
                resume: false,
            })
            .await?
            .keep_in(&tmp)
            .map_err(io)?;
            std::fs::write(tmp.join(FINGERPRINT), &fingerprint).map_err(io)?;
            // In place of the old one (copies made from it hold their layers).
            let old = dir.with_extension(format!("old-{stamp}"));
            let _ = std::fs::rename(dir, &old);
            std::fs::rename(&tmp, dir).map_err(io)?;
            let _ = std::fs::remove_dir_all(&old);
            if let Some(images) = dir.parent() {
                keep_newest(images, MAX_IMAGES);
            }
            Ok::<(), RuntimeError>(())
        }
        .await;
        let _ = vm.destroy_in().await;
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        collect_layers(&self.cfg.run_dir.join("layers"));
        made
    }
}

/// Deletes all but the `n` most recently made images in `images` (and anything else
/// there that is no finished image: what a killed server left).
fn keep_newest(images: &Path, n: usize) {
    let mut made: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(images).into_iter().flatten().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") {
            // Being made (one at a time: `make_image_later`) or left by a killed
            // server; the builder removes its own.
            continue;
        }
        match std::fs::metadata(p.join(FINGERPRINT)).and_then(|m| m.modified()) {
            Ok(t) if !name.contains(".old-") => made.push((t, p)),
            _ => {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    made.sort_by_key(|m| std::cmp::Reverse(m.0));
    for (_, p) in made.into_iter().skip(n) {
        let _ = std::fs::remove_dir_all(p);
    }
}
