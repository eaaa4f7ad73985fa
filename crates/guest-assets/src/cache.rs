//! The cache directory and everything under it, in one place:
//!
//! ```text
//! $XDG_CACHE_HOME/supermachine/            (default ~/.cache/supermachine)
//!   kernels/                               provisioned guest kernels (crate::kernel)
//!   initramfs-<key>.cpio                   built initramfs archives (crate::initramfs)
//!   store/                                 OCI blobs and image records (image::store)
//!   rootfs/<manifest digest>.erofs         converted root filesystems
//!   snapshots/<manifest digest>/<key>.snap ready VMs `run` restores (one per VM configuration)
//! ```
//!
//! Other crates take these paths as arguments and never compute them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Neither `XDG_CACHE_HOME` nor `HOME` is set.
#[derive(Debug, thiserror::Error)]
#[error("no cache directory: set XDG_CACHE_HOME or HOME")]
pub struct NoCacheDir;

/// The cache directory's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLayout {
    root: PathBuf,
}

impl CacheLayout {
    /// The user's cache: `$XDG_CACHE_HOME/supermachine`, else
    /// `$HOME/.cache/supermachine` (XDG Base Directory spec: an empty or relative
    /// `XDG_CACHE_HOME` is ignored).
    pub fn user() -> Result<Self, NoCacheDir> {
        Self::from_env(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
    }

    fn from_env(xdg: Option<OsString>, home: Option<OsString>) -> Result<Self, NoCacheDir> {
        let root = match (xdg.map(PathBuf::from).filter(|p| p.is_absolute()), home) {
            (Some(xdg), _) => xdg.join("supermachine"),
            (None, Some(home)) if !home.is_empty() => {
                PathBuf::from(home).join(".cache").join("supermachine")
            }
            (None, _) => return Err(NoCacheDir),
        };
        Ok(Self { root })
    }

    /// A layout rooted at `root` (tests, benches, a cache carried elsewhere).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Provisioned kernels.
    pub fn kernels(&self) -> PathBuf {
        self.root.join("kernels")
    }

    /// The image store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// Converted root filesystems.
    pub fn rootfs(&self) -> PathBuf {
        self.root.join("rootfs")
    }

    /// Snapshots of ready VMs, one directory per image (manifest digest).
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Where initramfs archives are kept (the root itself).
    pub fn initramfs_dir(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cache_layout_xdg_wins() {
        let c = CacheLayout::from_env(Some("/x/cache".into()), Some("/home/u".into())).unwrap();
        assert_eq!(c.root(), Path::new("/x/cache/supermachine"));
        assert_eq!(c.store(), Path::new("/x/cache/supermachine/store"));
        assert_eq!(c.kernels(), Path::new("/x/cache/supermachine/kernels"));
        assert_eq!(c.rootfs(), Path::new("/x/cache/supermachine/rootfs"));
    }

    #[test]
    fn cache_layout_relative_or_empty_xdg_falls_back_to_home() {
        for xdg in ["rel", ""] {
            let c = CacheLayout::from_env(Some(xdg.into()), Some("/home/u".into())).unwrap();
            assert_eq!(c.root(), Path::new("/home/u/.cache/supermachine"));
        }
    }

    #[test]
    fn cache_layout_nothing_set_errors() {
        assert!(CacheLayout::from_env(None, None).is_err());
        assert!(CacheLayout::from_env(Some("rel".into()), None).is_err());
    }
}
