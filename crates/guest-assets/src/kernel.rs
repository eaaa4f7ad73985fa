//! Guest kernel provisioning.
//!
//! The default guest kernel is Debian's cloud kernel package. On first use the
//! product obtains it through the system's own package manager (apt, configured
//! by the system: no archive host is named here), unpacks it with `dpkg-deb`,
//! and keeps the kernel image, its config and its modules tree in the user's
//! cache:
//!
//! ```text
//! $XDG_CACHE_HOME/supermachine/            (default ~/.cache/supermachine)
//!   kernels/default                        version chosen by the last provision
//!   kernels/<version>/vmlinuz-<version>
//!   kernels/<version>/config-<version>
//!   kernels/<version>/modules/             the package's /lib/modules/<version>
//! ```
//!
//! A version directory appears only by an atomic `rename` of a finished temp
//! directory, so an interrupted or concurrent provision never leaves a
//! half-kernel that looks complete. Later runs read `kernels/default` and touch
//! neither apt nor the network.
//!
//! A user kernel overrides all this: `SUPERMACHINE_KERNEL=<path>` or an explicit
//! path (the CLI's `--kernel`), see [`KernelAssets::from_path`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::CacheLayout;

/// Environment variable naming a kernel image that replaces the provisioned one.
pub const KERNEL_ENV: &str = "SUPERMACHINE_KERNEL";

/// Temp directories older than this inside `kernels/` are leftovers of an
/// interrupted provision and are removed.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// A guest kernel and what belongs with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelAssets {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64` (for a user kernel without a
    /// Debian-style name: its file name).
    pub version: String,
    /// The kernel image (bzImage `vmlinuz-*`, or an ELF `vmlinux`).
    pub kernel: PathBuf,
    /// The kernel's build config, when known.
    pub config: Option<PathBuf>,
    /// The kernel's modules tree (`/lib/modules/<version>`), when known.
    pub modules_dir: Option<PathBuf>,
}

/// Errors of guest kernel provisioning.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The user's kernel path does not name a readable file.
    #[error("kernel image {path}")]
    KernelNotFound {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: io::Error,
    },
    /// The host has no apt (not Debian-based), so the default kernel cannot be
    /// obtained.
    #[error(
        "no guest kernel: this host has no apt-get to fetch Debian's cloud kernel; \
         pass --kernel <path> or set {KERNEL_ENV}, e.g. to boot/vmlinuz-* of the \
         linux-image-<version> package that Debian's {} depends on (a .deb unpacks \
         with `ar x` and `tar xf data.tar.xz`)",
        meta_package().unwrap_or("linux-image-cloud-<arch>")
    )]
    NoPackageManager,
    /// No Debian kernel package exists for this host architecture.
    #[error("no default guest kernel for the {0} architecture; pass --kernel <path>")]
    UnsupportedArch(&'static str),
    /// apt has no package lists (never updated), so the package is unknown.
    #[error(
        "apt does not know {package}: its package lists are empty; run \
         `sudo apt-get update` and try again, or pass --kernel <path>"
    )]
    AptListsMissing {
        /// The meta package looked up.
        package: &'static str,
    },
    /// The meta package has no versioned `linux-image-*` dependency.
    #[error("apt-cache depends {package} names no linux-image-<version> package")]
    NoVersionedPackage {
        /// The meta package looked up.
        package: &'static str,
    },
    /// A helper program could not be started.
    #[error("running {program}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A helper program failed.
    #[error("{command} failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line, for the user to retry by hand.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The tail of its standard error.
        stderr: String,
    },
    /// The downloaded package lacks a file every kernel package has.
    #[error("kernel package {package} has no {missing}")]
    PackageLayout {
        /// The package.
        package: String,
        /// What is missing.
        missing: String,
    },
    /// A file system operation in the cache failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl KernelAssets {
    /// A user-supplied kernel. Its version, config and modules are found beside it
    /// when the layout is Debian's (`/boot/vmlinuz-V`, `/boot/config-V`,
    /// `/lib/modules/V`) or this cache's (`vmlinuz-V`, `config-V`, `modules/`).
    pub fn from_path(path: &Path) -> Result<Self, KernelError> {
        let meta = fs::metadata(path).map_err(|source| KernelError::KernelNotFound {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(KernelError::KernelNotFound {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        // Debian's /boot/vmlinuz-* is 0600 root: say so now, not at boot.
        fs::File::open(path).map_err(|source| KernelError::KernelNotFound {
            path: path.to_path_buf(),
            source,
        })?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = path.parent().unwrap_or(Path::new("."));
        let Some(version) = file_name.strip_prefix("vmlinuz-").filter(|v| !v.is_empty()) else {
            return Ok(Self {
                version: file_name,
                kernel: path.to_path_buf(),
                config: None,
                modules_dir: None,
            });
        };
        let config = Some(dir.join(format!("config-{version}"))).filter(|p| p.is_file());
        let beside = dir.join("modules");
        let debian = dir
            .parent()
            .map(|root| root.join("lib/modules").join(version));
        let modules_dir = if beside.is_dir() {
            Some(beside)
        } else {
            debian.filter(|p| p.is_dir())
        };
        Ok(Self {
            version: version.to_string(),
            kernel: path.to_path_buf(),
            config,
            modules_dir,
        })
    }

    /// Whether this kernel can run as a PVM guest (see [`kernel_has_pvm_guest_support`]).
    pub fn has_pvm_guest_support(&self) -> Option<bool> {
        kernel_has_pvm_guest_support(self.config.as_deref())
    }
}

/// Whether a kernel built with `config` has PVM-guest support
/// (`CONFIG_PVM_GUEST=y`). `None` when there is no config or it cannot be read:
/// the caller cannot know.
pub fn kernel_has_pvm_guest_support(config: Option<&Path>) -> Option<bool> {
    let text = fs::read_to_string(config?).ok()?;
    Some(text.lines().any(|l| l.trim_end() == "CONFIG_PVM_GUEST=y"))
}

/// The guest kernel to boot: `explicit` (the CLI's `--kernel`) if given, else
/// `SUPERMACHINE_KERNEL`, else Debian's cloud kernel from `cache`, obtained on
/// first use.
pub fn provision_with(
    explicit: Option<&Path>,
    cache: &CacheLayout,
) -> Result<KernelAssets, KernelError> {
    match explicit {
        Some(path) => KernelAssets::from_path(path),
        None => provision(cache),
    }
}

/// The guest kernel to boot: `SUPERMACHINE_KERNEL` if set, else Debian's cloud
/// kernel from `cache`, obtained through apt on first use.
pub fn provision(cache: &CacheLayout) -> Result<KernelAssets, KernelError> {
    if let Some(path) = std::env::var_os(KERNEL_ENV).filter(|p| !p.is_empty()) {
        return KernelAssets::from_path(Path::new(&path));
    }
    provision_debian(cache)
}

/// Debian's cloud kernel in `cache`: reused when a previous provision finished,
/// else resolved, downloaded and unpacked.
pub fn provision_debian(cache: &CacheLayout) -> Result<KernelAssets, KernelError> {
    let kernels = cache.kernels();
    if let Some(assets) = cached_default(&kernels) {
        return Ok(assets);
    }
    let package = meta_package()?;
    if !program_exists("apt-get") {
        return Err(KernelError::NoPackageManager);
    }
    let versioned = resolve_versioned_package(package)?;
    let version = versioned
        .strip_prefix("linux-image-")
        .unwrap_or(&versioned)
        .to_string();
    fs::create_dir_all(&kernels).map_err(io_err("creating", &kernels))?;
    let final_dir = kernels.join(&version);
    if !final_dir.join(format!("vmlinuz-{version}")).is_file() {
        remove_stale_temps(&kernels);
        let tmp = unique_temp(&kernels, &version);
        fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        let result = download_and_unpack(&versioned, &version, &tmp)
            .and_then(|staged| publish_dir(&staged, &final_dir));
        // The staged tree was renamed away on success; what is left is the .deb
        // and the unpacked package.
        let _ = fs::remove_dir_all(&tmp);
        result?;
    }
    write_atomic(&kernels.join("default"), version.as_bytes())?;
    Ok(assets_in(&final_dir, &version))
}

fn assets_in(dir: &Path, version: &str) -> KernelAssets {
    let config = dir.join(format!("config-{version}"));
    let modules = dir.join("modules");
    KernelAssets {
        version: version.to_string(),
        kernel: dir.join(format!("vmlinuz-{version}")),
        config: config.is_file().then_some(config),
        modules_dir: modules.is_dir().then_some(modules),
    }
}

/// The kernel named by `kernels/default`, when that version's directory is
/// complete. Any doubt means "not cached": provisioning again is always safe.
fn cached_default(kernels: &Path) -> Option<KernelAssets> {
    let version = fs::read_to_string(kernels.join("default")).ok()?;
    let version = version.trim();
    if !is_safe_version(version) {
        return None;
    }
    let dir = kernels.join(version);
    dir.join(format!("vmlinuz-{version}"))
        .is_file()
        .then(|| assets_in(&dir, version))
}

/// Puts `assets` (the kernel image and its config, not its modules tree) and the
/// initramfs built for it into another cache, `dst`, as its default kernel: a
/// self-contained cache a test rig or a benchmark carries elsewhere. The
/// initramfs keeps its name, which is its cache key, so `dst` reuses it instead of
/// building one (it could not: the modules stay behind).
pub fn seed(dst: &CacheLayout, assets: &KernelAssets, initramfs: &Path) -> io::Result<()> {
    fn copy_named(from: &Path, to_dir: &Path) -> io::Result<()> {
        let name = from.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no file name", from.display()),
            )
        })?;
        fs::copy(from, to_dir.join(name)).map(|_| ())
    }
    let kernels = dst.kernels();
    let dir = kernels.join(&assets.version);
    fs::create_dir_all(&dir)?;
    copy_named(&assets.kernel, &dir)?;
    if let Some(c) = &assets.config {
        copy_named(c, &dir)?;
    }
    fs::write(kernels.join("default"), &assets.version)?;
    copy_named(initramfs, dst.initramfs_dir())
}

/// A version string is used as a directory name: refuse anything that could
/// leave the cache.
fn is_safe_version(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b))
}

fn meta_package() -> Result<&'static str, KernelError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("linux-image-cloud-amd64"),
        "aarch64" => Ok("linux-image-cloud-arm64"),
        other => Err(KernelError::UnsupportedArch(other)),
    }
}

fn program_exists(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

fn run(program: &'static str, args: &[&str], cwd: Option<&Path>) -> Result<String, KernelError> {
    let mut cmd = Command::new(program);
    cmd.args(args).env("LC_ALL", "C");
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let out = cmd
        .output()
        .map_err(|source| KernelError::Spawn { program, source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(KernelError::CommandFailed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `linux-image-cloud-amd64` -> `linux-image-6.1.0-56-cloud-amd64`. Updates
/// apt's lists first when they are empty and we are root; otherwise says how.
fn resolve_versioned_package(package: &'static str) -> Result<String, KernelError> {
    match depends_of(package) {
        Ok(Some(v)) => return Ok(v),
        Ok(None) => return Err(KernelError::NoVersionedPackage { package }),
        Err(e @ KernelError::AptListsMissing { .. }) => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    run("apt-get", &["update", "-q"], None)?;
    depends_of(package)?.ok_or(KernelError::NoVersionedPackage { package })
}

fn depends_of(package: &'static str) -> Result<Option<String>, KernelError> {
    let mut cmd = Command::new("apt-cache");
    cmd.args(["depends", package]).env("LC_ALL", "C");
    let out = cmd.output().map_err(|source| KernelError::Spawn {
        program: "apt-cache",
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout.trim().is_empty() {
        // "E: No packages found" / "Unable to locate package": empty lists.
        return Err(KernelError::AptListsMissing { package });
    }
    Ok(parse_depends(&stdout))
}

/// The first `Depends: linux-image-<version>` of `apt-cache depends` output.
fn parse_depends(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        let version = dep.strip_prefix("linux-image-")?;
        is_safe_version(version).then(|| dep.to_string())
    })
}

/// Downloads `package` into `tmp`, unpacks it and stages the cache layout in
/// `tmp/staged`, which is returned.
fn download_and_unpack(package: &str, version: &str, tmp: &Path) -> Result<PathBuf, KernelError> {
    run("apt-get", &["download", "-q", package], Some(tmp))?;
    let deb = fs::read_dir(tmp)
        .map_err(io_err("reading", tmp))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| KernelError::PackageLayout {
            package: package.to_string(),
            missing: "downloaded .deb file".to_string(),
        })?;
    let root = tmp.join("root");
    let deb_str = deb.to_string_lossy().into_owned();
    let root_str = root.to_string_lossy().into_owned();
    run("dpkg-deb", &["-x", &deb_str, &root_str], None)?;

    let staged = tmp.join("staged");
    fs::create_dir(&staged).map_err(io_err("creating", &staged))?;
    let missing = |what: String| KernelError::PackageLayout {
        package: package.to_string(),
        missing: what,
    };
    let vmlinuz = format!("vmlinuz-{version}");
    let src = root.join("boot").join(&vmlinuz);
    if !src.is_file() {
        return Err(missing(format!("/boot/{vmlinuz}")));
    }
    fs::rename(&src, staged.join(&vmlinuz)).map_err(io_err("moving", &src))?;
    let config = format!("config-{version}");
    let src = root.join("boot").join(&config);
    if src.is_file() {
        fs::rename(&src, staged.join(&config)).map_err(io_err("moving", &src))?;
    }
    let src = root.join("lib/modules").join(version);
    if src.is_dir() {
        fs::rename(&src, staged.join("modules")).map_err(io_err("moving", &src))?;
    }
    Ok(staged)
}

/// Moves a finished directory to its final name. If another provision got there
/// first, theirs is as good as ours.
fn publish_dir(staged: &Path, final_dir: &Path) -> Result<(), KernelError> {
    match fs::rename(staged, final_dir) {
        Ok(()) => Ok(()),
        Err(_) if final_dir.is_dir() => Ok(()),
        Err(e) => Err(KernelError::Io {
            op: "publishing",
            path: final_dir.to_path_buf(),
            source: e,
        }),
    }
}

/// A name no other process or call uses at the same time.
pub(crate) fn unique_temp(dir: &Path, stem: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    dir.join(format!(".tmp-{stem}-{}-{nanos}", std::process::id()))
}

/// Writes `data` to `path` through a temp file and `rename`, so readers see the
/// old content or the new, never a partial file.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), KernelError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = unique_temp(dir, "file");
    let written = fs::File::create(&tmp).and_then(|mut f| {
        use std::io::Write;
        f.write_all(data)?;
        // On disk before the rename makes it visible: a crash leaves the old
        // file or the whole new one, never an empty one.
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("writing", &tmp)(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        KernelError::Io {
            op: "renaming into",
            path: path.to_path_buf(),
            source: e,
        }
    })
}

/// Removes `.tmp-*` leftovers (directories or files) of interrupted
/// provisions and builds in `dir`, older than an hour (best effort).
pub(crate) fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if old {
            let path = entry.path();
            if path.is_dir() {
                let _ = fs::remove_dir_all(&path);
            } else {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;

    /// A temp directory removed on drop (tests only).
    pub(crate) struct TestDir(pub PathBuf);

    impl TestDir {
        pub(crate) fn new(tag: &str) -> Self {
            let p = unique_temp(&std::env::temp_dir(), &format!("supermachine-{tag}"));
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A host where apt can fetch the kernel; otherwise the reason to skip.
    pub(crate) fn apt_available() -> Result<(), &'static str> {
        if !program_exists("apt-get") || !program_exists("dpkg-deb") {
            return Err("no apt-get/dpkg-deb on this host");
        }
        Ok(())
    }

    /// One provisioned kernel shared by the tests of this crate (persistent under
    /// the system temp dir, so reruns reuse it; the fresh-download path has its
    /// own test below).
    pub(crate) fn shared_test_kernel() -> Option<KernelAssets> {
        if let Err(why) = apt_available() {
            eprintln!("skipping: {why}");
            return None;
        }
        static KERNEL: std::sync::OnceLock<KernelAssets> = std::sync::OnceLock::new();
        let cache = std::env::temp_dir().join("supermachine-test-cache");
        Some(
            KERNEL
                .get_or_init(|| {
                    provision_debian(&CacheLayout::at(cache)).expect("provisioning the test kernel")
                })
                .clone(),
        )
    }

    #[test]
    fn parse_depends_picks_versioned_image() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
    }

    #[test]
    fn parse_depends_hostile_or_absent_none() {
        assert_eq!(parse_depends("linux-image-cloud-amd64\n"), None);
        assert_eq!(parse_depends("  Depends: linux-image-../../etc\n"), None);
        assert_eq!(parse_depends("  Depends: firmware-foo\n"), None);
    }

    #[test]
    fn is_safe_version_rejects_path_tricks() {
        assert!(is_safe_version("6.1.0-56-cloud-amd64"));
        assert!(!is_safe_version(""));
        assert!(!is_safe_version(".."));
        assert!(!is_safe_version("a/b"));
    }

    #[test]
    fn from_path_debian_layout_finds_config_and_modules() {
        let root = TestDir::new("kernel-layout");
        fs::create_dir_all(root.0.join("boot")).unwrap();
        fs::create_dir_all(root.0.join("lib/modules/6.9-test")).unwrap();
        fs::write(root.0.join("boot/vmlinuz-6.9-test"), b"k").unwrap();
        fs::write(root.0.join("boot/config-6.9-test"), b"CONFIG_PVM_GUEST=y\n").unwrap();
        let a = KernelAssets::from_path(&root.0.join("boot/vmlinuz-6.9-test")).unwrap();
        assert_eq!(a.version, "6.9-test");
        assert_eq!(a.config, Some(root.0.join("boot/config-6.9-test")));
        assert_eq!(a.modules_dir, Some(root.0.join("lib/modules/6.9-test")));
        assert_eq!(a.has_pvm_guest_support(), Some(true));
    }

    #[test]
    fn from_path_plain_file_has_no_extras() {
        let root = TestDir::new("kernel-plain");
        fs::write(root.0.join("bzImage"), b"k").unwrap();
        let a = KernelAssets::from_path(&root.0.join("bzImage")).unwrap();
        assert_eq!(a.version, "bzImage");
        assert_eq!(a.has_pvm_guest_support(), None);
        assert_eq!((a.config, a.modules_dir), (None, None));
    }

    #[test]
    fn from_path_missing_or_dir_errors() {
        let root = TestDir::new("kernel-missing");
        assert!(matches!(
            KernelAssets::from_path(&root.0.join("nope")),
            Err(KernelError::KernelNotFound { .. })
        ));
        assert!(matches!(
            KernelAssets::from_path(&root.0),
            Err(KernelError::KernelNotFound { .. })
        ));
    }

    #[test]
    fn pvm_support_absent_option_false() {
        let root = TestDir::new("kernel-config");
        let cfg = root.0.join("config");
        fs::write(&cfg, b"CONFIG_PVM=y\n# CONFIG_PVM_GUEST is not set\n").unwrap();
        assert_eq!(kernel_has_pvm_guest_support(Some(&cfg)), Some(false));
        assert_eq!(
            kernel_has_pvm_guest_support(Some(&root.0.join("none"))),
            None
        );
    }

    #[test]
    fn seed_makes_the_kernel_the_default_of_another_cache() {
        let src = TestDir::new("kernel-seed-src");
        let dir = src.0.join("6.9-test");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vmlinuz-6.9-test"), b"kernel").unwrap();
        fs::write(dir.join("config-6.9-test"), b"CONFIG_X=y\n").unwrap();
        let initramfs = src.0.join("initramfs-abc.cpio");
        fs::write(&initramfs, b"cpio").unwrap();
        let assets = assets_in(&dir, "6.9-test");
        let dst = TestDir::new("kernel-seed-dst");
        let layout = CacheLayout::at(&dst.0);
        seed(&layout, &assets, &initramfs).unwrap();
        let found = cached_default(&layout.kernels()).unwrap();
        assert_eq!(found.version, "6.9-test");
        assert_eq!(fs::read(&found.kernel).unwrap(), b"kernel");
        assert_eq!(found.modules_dir, None);
        assert_eq!(fs::read(dst.0.join("initramfs-abc.cpio")).unwrap(), b"cpio");
    }

    #[test]
    fn cached_default_incomplete_dir_not_reused() {
        let root = TestDir::new("kernel-incomplete");
        fs::create_dir_all(root.0.join("6.9")).unwrap();
        fs::write(root.0.join("default"), b"6.9").unwrap();
        assert_eq!(cached_default(&root.0), None);
        fs::write(root.0.join("6.9/vmlinuz-6.9"), b"k").unwrap();
        assert_eq!(
            cached_default(&root.0).map(|a| a.version),
            Some("6.9".to_string())
        );
        fs::write(root.0.join("default"), b"../../x").unwrap();
        assert_eq!(cached_default(&root.0), None);
    }

    #[test]
    fn publish_dir_lost_race_keeps_winner() {
        let root = TestDir::new("kernel-publish");
        let winner = root.0.join("v");
        fs::create_dir_all(&winner).unwrap();
        fs::write(winner.join("vmlinuz-v"), b"theirs").unwrap();
        let staged = root.0.join(".tmp-v");
        fs::create_dir_all(&staged).unwrap();
        fs::write(staged.join("vmlinuz-v"), b"ours").unwrap();
        publish_dir(&staged, &winner).unwrap();
        assert_eq!(fs::read(winner.join("vmlinuz-v")).unwrap(), b"theirs");
    }

    #[test]
    fn remove_stale_temps_removes_only_old_temps() {
        let root = TestDir::new("kernel-stale");
        fs::create_dir_all(root.0.join(".tmp-fresh")).unwrap();
        fs::create_dir_all(root.0.join("6.9")).unwrap();
        fs::create_dir_all(root.0.join(".tmp-old/sub")).unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        fs::File::open(root.0.join(".tmp-old"))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        remove_stale_temps(&root.0);
        assert!(!root.0.join(".tmp-old").exists());
        assert!(root.0.join(".tmp-fresh").is_dir());
        assert!(root.0.join("6.9").is_dir());
    }

    #[test]
    fn write_atomic_replaces_content() {
        let root = TestDir::new("kernel-atomic");
        let f = root.0.join("default");
        write_atomic(&f, b"a").unwrap();
        write_atomic(&f, b"bb").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"bb");
        assert_eq!(fs::read_dir(&root.0).unwrap().count(), 1);
    }

    #[test]
    fn provision_debian_fresh_cache_downloads_then_reuses() {
        if let Err(why) = apt_available() {
            eprintln!("skipping: {why}");
            return;
        }
        let cache = TestDir::new("kernel-provision");
        let a = provision_debian(&CacheLayout::at(&cache.0)).unwrap();
        assert!(a.version.ends_with("-cloud-amd64") || a.version.ends_with("-cloud-arm64"));
        assert!(a.kernel.starts_with(cache.0.join("kernels")));
        assert!(
            fs::metadata(&a.kernel).unwrap().len() > 1 << 20,
            "vmlinuz is megabytes"
        );
        let config = a.config.clone().unwrap();
        assert!(fs::read_to_string(&config)
            .unwrap()
            .contains("CONFIG_VIRTIO_MMIO=m"));
        let modules = a.modules_dir.clone().unwrap();
        assert!(modules
            .join("kernel/drivers/virtio/virtio_mmio.ko")
            .is_file());
        // Debian's cloud kernel is not a PVM guest kernel.
        assert_eq!(a.has_pvm_guest_support(), Some(false));
        // No temp dirs are left behind.
        let leftovers: Vec<_> = fs::read_dir(cache.0.join("kernels"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
        // Second call: same assets, from the cache.
        assert_eq!(provision_debian(&CacheLayout::at(&cache.0)).unwrap(), a);
        // And a user path to the cached kernel finds the same things beside it.
        assert_eq!(KernelAssets::from_path(&a.kernel).unwrap(), a);
    }

    #[test]
    fn no_package_manager_error_names_this_arch_kernel_and_flag() {
        let msg = KernelError::NoPackageManager.to_string();
        assert!(msg.contains("--kernel"), "{msg}");
        assert!(msg.contains(meta_package().unwrap()), "{msg}");
    }
}
