//! The initramfs the product builds: a newc cpio with the guest's PID 1
//! (`guest-init`, embedded in this crate at build time) and the kernel modules
//! the guest needs, in dependency order.
//!
//! Archive layout:
//! ```text
//! init                                  guest-init, 0755
//! dev/ proc/ sys/ run/ tmp/ lib/ lib/modules/
//! dev/console                           char 5:1, so the kernel can open init's stdio
//! lib/modules/<name>.ko                 each module, names normalized to `_`
//! lib/modules/supermachine.order        one module name per line, dependencies first
//! ```
//!
//! Debian's cloud kernel ships no `modules.dep`, so dependencies come from each
//! module's `.modinfo` ELF section (`depends=` field, written by modpost).
//!
//! The finished archive is cached as `<cache>/initramfs-<hash>.cpio`, keyed by
//! kernel version, modules dir, guest-init bytes and the wanted module list, and
//! written atomically.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::cache::CacheLayout;
use crate::kernel::{self, KernelAssets};

/// The guest-init binary built by `build.rs` (empty on hosts that have no guest
/// build yet).
pub static GUEST_INIT: &[u8] = include_bytes!(env!("SUPERMACHINE_GUEST_INIT"));

/// Modules the product loads by default: virtio-mmio transport, block, net, rng,
/// vsock and the filesystems for the image rootfs. Their dependencies are added.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "overlay",
    "erofs",
    // Extra disks a container formats or mounts (`run --disk`); built into
    // Debian's cloud kernel, where the closure skips it.
    "ext4",
];

/// Name of the load-order file guest-init reads.
pub const ORDER_FILE: &str = "lib/modules/supermachine.order";

/// Largest module file read (the biggest in Debian's kernels are a few MiB).
const MAX_MODULE_SIZE: u64 = 64 << 20;

/// Errors of building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// This build of the runner embeds no guest-init (non-x86_64-Linux host).
    #[error("this supermachine build embeds no guest-init binary for this host architecture")]
    NoGuestInit,
    /// The kernel's modules directory could not be read.
    #[error("reading modules directory {path}")]
    ModulesDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A wanted module (or a dependency) is neither a `.ko` in the modules tree
    /// nor built in.
    #[error("kernel module {name} not found in {modules_dir} (needed by {needed_by})")]
    ModuleNotFound {
        /// The module name.
        name: String,
        /// Who wants it: "the module list" or a module name.
        needed_by: String,
        /// Where it was looked for.
        modules_dir: PathBuf,
    },
    /// The kernel ships compressed modules, which this builder does not unpack.
    #[error(
        "kernel module {path} is compressed; supermachine needs uncompressed .ko files \
         (Debian 12's cloud kernel ships them so), or pass a kernel whose modules are \
         uncompressed"
    )]
    CompressedModule {
        /// The module file.
        path: PathBuf,
    },
    /// A module file could not be read.
    #[error("reading kernel module {path}")]
    ReadModule {
        /// The module file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A module file is not a well-formed ELF64 little-endian object with a
    /// `.modinfo` section.
    #[error("kernel module {path} is malformed: {reason}")]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// Module dependencies form a cycle.
    #[error("kernel module dependency cycle through {0}")]
    DependencyCycle(String),
    /// An entry is too big for newc's 32-bit size field.
    #[error("initramfs entry {0} is larger than 4 GiB")]
    EntryTooLarge(String),
    /// Writing the archive failed.
    #[error("writing initramfs {path}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

// ---------------------------------------------------------------------------
// newc cpio writer
// ---------------------------------------------------------------------------

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// A writer of "new ASCII" (newc, magic `070701`) cpio archives, the format the
/// kernel unpacks as initramfs (Documentation/driver-api/early-userspace/
/// buffer-format.rst). Entries get uid/gid 0 and mtime 0 so archives are
/// reproducible; paths are written without a leading `/`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// A writer appending to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), InitramfsError> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), InitramfsError> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitramfsError> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the `TRAILER!!!` entry and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, InitramfsError> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), InitramfsError> {
        let name = path.trim_start_matches('/');
        let size = u32::try_from(data.len())
            .map_err(|_| InitramfsError::EntryTooLarge(name.to_string()))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| InitramfsError::EntryTooLarge(name.to_string()))?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        // 110-byte header: magic then 13 fields of 8 hex digits: ino, mode, uid,
        // gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
        // namesize, check.
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?; // header + name end on a 4-byte boundary
        self.put(data)?;
        self.pad() // data ends on a 4-byte boundary
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), InitramfsError> {
        self.out
            .write_all(bytes)
            .map_err(|source| InitramfsError::Write {
                path: PathBuf::new(),
                source,
            })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), InitramfsError> {
        let n = ((4 - (self.written % 4)) % 4) as usize;
        self.put(&[0u8; 3][..n])
    }
}

// ---------------------------------------------------------------------------
// Modules
// ---------------------------------------------------------------------------

/// A module to put in the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its name, normalized (`-` -> `_`), as in `depends=` and `/proc/modules`.
    pub name: String,
    /// Its `.ko` file in the kernel's modules tree.
    pub path: PathBuf,
}

/// Module names treat `-` and `_` as the same (kernel/module/main.c); `_` is canonical.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Finds `wanted` modules in `modules_dir` and returns them with all their
/// dependencies, each once, dependencies before their users. Modules listed in
/// `modules.builtin` are skipped (built into the kernel).
pub fn module_closure(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, InitramfsError> {
    let index = index_modules(modules_dir)?;
    let builtin = builtin_modules(modules_dir);
    let mut state: HashMap<String, Visit> = HashMap::new();
    let mut order = Vec::new();
    for w in wanted {
        visit(
            &normalize(w),
            "the module list",
            modules_dir,
            &index,
            &builtin,
            &mut state,
            &mut order,
        )?;
    }
    Ok(order)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visit {
    InProgress,
    Done,
}

fn visit(
    name: &str,
    needed_by: &str,
    modules_dir: &Path,
    index: &HashMap<String, PathBuf>,
    builtin: &[String],
    state: &mut HashMap<String, Visit>,
    order: &mut Vec<Module>,
) -> Result<(), InitramfsError> {
    match state.get(name) {
        Some(Visit::Done) => return Ok(()),
        Some(Visit::InProgress) => return Err(InitramfsError::DependencyCycle(name.to_string())),
        None => {}
    }
    let Some(path) = index.get(name) else {
        if builtin.iter().any(|b| b == name) {
            state.insert(name.to_string(), Visit::Done);
            return Ok(());
        }
        return Err(InitramfsError::ModuleNotFound {
            name: name.to_string(),
            needed_by: needed_by.to_string(),
            modules_dir: modules_dir.to_path_buf(),
        });
    };
    if !is_plain_ko(path) {
        return Err(InitramfsError::CompressedModule { path: path.clone() });
    }
    state.insert(name.to_string(), Visit::InProgress);
    let data = read_module(path)?;
    let deps = modinfo_depends(&data).map_err(|reason| InitramfsError::BadModule {
        path: path.clone(),
        reason,
    })?;
    for dep in deps {
        visit(
            &normalize(&dep),
            name,
            modules_dir,
            index,
            builtin,
            state,
            order,
        )?;
    }
    state.insert(name.to_string(), Visit::Done);
    order.push(Module {
        name: name.to_string(),
        path: path.clone(),
    });
    Ok(())
}

fn is_plain_ko(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "ko")
}

fn read_module(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let read_err = |source| InitramfsError::ReadModule {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_MODULE_SIZE {
        return Err(InitramfsError::BadModule {
            path: path.to_path_buf(),
            reason: "larger than 64 MiB",
        });
    }
    fs::read(path).map_err(|source| InitramfsError::ReadModule {
        path: path.to_path_buf(),
        source,
    })
}

/// Maps normalized module name -> file for every module under `modules_dir`
/// (`.ko`, and compressed `.ko.xz`/`.ko.zst`/`.ko.gz` so that they are reported
/// rather than "not found").
fn index_modules(modules_dir: &Path) -> Result<HashMap<String, PathBuf>, InitramfsError> {
    let mut index = HashMap::new();
    let mut stack = vec![modules_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|source| InitramfsError::ModulesDir {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            let path = entry.path();
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .find_map(|suffix| file_name.strip_suffix(suffix));
            if let Some(stem) = stem {
                // Several trees (kernel/, updates/, extra/) may hold one name: keep
                // the first found; the order of read_dir is not meaningful anyway.
                index.entry(normalize(stem)).or_insert(path);
            }
        }
    }
    Ok(index)
}

/// Names from `modules.builtin` (lines like `kernel/drivers/virtio/virtio.ko`).
fn builtin_modules(modules_dir: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(modules_dir.join("modules.builtin")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(normalize))
        .collect()
}

/// The `depends=` list from a module's `.modinfo` section. `data` is untrusted:
/// every offset is bounds-checked and errors say what is wrong.
///
/// ELF-64 object file format (System V gABI, ch. 4): the header gives the
/// section header table (e_shoff, e_shentsize, e_shnum) and the index of the
/// section-name string table (e_shstrndx).
pub fn modinfo_depends(data: &[u8]) -> Result<Vec<String>, &'static str> {
    let modinfo = modinfo_section(data)?;
    for field in modinfo.split(|&b| b == 0) {
        if let Some(value) = field.strip_prefix(b"depends=") {
            let value = std::str::from_utf8(value).map_err(|_| "depends= is not UTF-8")?;
            return Ok(value
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect());
        }
    }
    // modpost always writes depends=, but a module without it has no dependencies.
    Ok(Vec::new())
}

fn modinfo_section(data: &[u8]) -> Result<&[u8], &'static str> {
    if data.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file");
    }
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file");
    }
    let shoff = read_u64(data, 0x28).ok_or("truncated ELF header")?;
    let shentsize = u64::from(read_u16(data, 0x3a).ok_or("truncated ELF header")?);
    let shnum = u64::from(read_u16(data, 0x3c).ok_or("truncated ELF header")?);
    let shstrndx = u64::from(read_u16(data, 0x3e).ok_or("truncated ELF header")?);
    if shentsize < 64 {
        return Err("section header entries too small");
    }
    if shnum == 0 || shstrndx >= shnum {
        return Err("no section headers or bad section-name table index");
    }
    let section = |i: u64| -> Result<(u32, &[u8]), &'static str> {
        let at = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or("section header offset overflows")?;
        let at = usize::try_from(at).map_err(|_| "section header out of bounds")?;
        let name = read_u32(data, at).ok_or("section header out of bounds")?;
        let sh_type = read_u32(data, at + 4).ok_or("section header out of bounds")?;
        let offset = read_u64(data, at + 0x18).ok_or("section header out of bounds")?;
        let size = read_u64(data, at + 0x20).ok_or("section header out of bounds")?;
        // SHT_NOBITS occupies no file space.
        if sh_type == 8 {
            return Ok((name, &[]));
        }
        let start = usize::try_from(offset).map_err(|_| "section out of bounds")?;
        let len = usize::try_from(size).map_err(|_| "section out of bounds")?;
        let end = start.checked_add(len).ok_or("section out of bounds")?;
        let bytes = data.get(start..end).ok_or("section out of bounds")?;
        Ok((name, bytes))
    };
    let (_, strtab) = section(shstrndx)?;
    for i in 0..shnum {
        let (name_off, bytes) = section(i)?;
        let name = usize::try_from(name_off)
            .ok()
            .and_then(|o| strtab.get(o..))
            .ok_or("section name out of bounds")?;
        if name.starts_with(b".modinfo\0") {
            return Ok(bytes);
        }
    }
    Err("no .modinfo section")
}

fn read_u16(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        d.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn read_u32(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        d.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        d.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

// ---------------------------------------------------------------------------
// Archive and cache
// ---------------------------------------------------------------------------

/// Writes the initramfs (layout in the module docs) to `out`.
pub fn write_archive<W: Write>(
    out: W,
    init: &[u8],
    modules: &[Module],
) -> Result<W, InitramfsError> {
    let mut cpio = CpioWriter::new(out);
    for dir in ["dev", "proc", "sys", "run", "tmp", "lib", "lib/modules"] {
        cpio.dir(dir, 0o755)?;
    }
    // /dev/console (5,1): the kernel opens it as init's stdin/out/err before
    // devtmpfs is mounted (init/main.c, console_on_rootfs).
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, init)?;
    let mut order = String::new();
    for m in modules {
        let data = read_module(&m.path)?;
        cpio.file(&format!("lib/modules/{}.ko", m.name), 0o644, &data)?;
        order.push_str(&m.name);
        order.push('\n');
    }
    cpio.file(ORDER_FILE, 0o644, order.as_bytes())?;
    cpio.finish()
}

/// The initramfs for `kernel` with the embedded guest-init and
/// [`DEFAULT_MODULES`], from `cache` (built on first use).
pub fn ensure(cache: &CacheLayout, kernel: &KernelAssets) -> Result<PathBuf, InitramfsError> {
    ensure_in(cache.initramfs_dir(), kernel, GUEST_INIT, DEFAULT_MODULES)
}

/// Like [`ensure`] with an explicit cache root, init binary and module list. A
/// kernel without a modules dir (everything built in) gets no modules.
pub fn ensure_in(
    cache: &Path,
    kernel: &KernelAssets,
    init: &[u8],
    wanted: &[&str],
) -> Result<PathBuf, InitramfsError> {
    if init.is_empty() {
        return Err(InitramfsError::NoGuestInit);
    }
    let key = cache_key(kernel, init, wanted);
    let path = cache.join(format!("initramfs-{key:016x}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    let modules = match &kernel.modules_dir {
        Some(dir) => module_closure(dir, wanted)?,
        None => Vec::new(),
    };
    fs::create_dir_all(cache).map_err(|source| InitramfsError::Write {
        path: cache.to_path_buf(),
        source,
    })?;
    kernel::remove_stale_temps(cache);
    let tmp = kernel::unique_temp(cache, "initramfs");
    let write_err = |source| InitramfsError::Write {
        path: tmp.clone(),
        source,
    };
    let result = (|| {
        let file = fs::File::create(&tmp).map_err(write_err)?;
        let writer = write_archive(BufWriter::new(file), init, &modules).map_err(|e| match e {
            InitramfsError::Write { source, .. } => write_err(source),
            other => other,
        })?;
        let file = writer.into_inner().map_err(|e| write_err(e.into_error()))?;
        // On disk before the rename makes it visible (a crash must not leave a
        // truncated initramfs under the final name).
        file.sync_all().map_err(write_err)?;
        fs::rename(&tmp, &path).map_err(write_err)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

/// FNV-1a (64-bit) over everything that changes the archive's content. Not a
/// security boundary: the cache is the user's own.
fn cache_key(kernel: &KernelAssets, init: &[u8], wanted: &[&str]) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.field(b"supermachine-initramfs-v1");
    // No paths in the key: a cache carried elsewhere (XDG_CACHE_HOME pointed at a
    // copy, as the nested rig does) must still find its initramfs. The kernel
    // version names the module files.
    h.field(kernel.version.as_bytes());
    h.field(init);
    for w in wanted {
        h.field(normalize(w).as_bytes());
    }
    h.0
}

struct Fnv(u64);

impl Fnv {
    /// Length-prefixed, so field boundaries are part of the hash.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::kernel::tests::{shared_test_kernel, TestDir};
    use std::process::Command;

    /// A minimal ELF64 LE relocatable with sections: null, .shstrtab, .modinfo.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        let strtab_off = d.len();
        d.extend_from_slice(shstrtab);
        let modinfo_off = d.len();
        d.extend_from_slice(modinfo);
        while d.len() % 8 != 0 {
            d.push(0);
        }
        let shoff = d.len();
        let mut sh = |name: u32, ty: u32, off: usize, size: usize| {
            let mut e = [0u8; 64];
            e[0..4].copy_from_slice(&name.to_le_bytes());
            e[4..8].copy_from_slice(&ty.to_le_bytes());
            e[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            e[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            d.extend_from_slice(&e);
        };
        sh(0, 0, 0, 0);
        sh(1, 3, strtab_off, shstrtab.len());
        sh(11, 1, modinfo_off, modinfo.len());
        d[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        d[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        d[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        d[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        d
    }

    fn cpio_list(path: &Path) -> Option<Vec<String>> {
        let out = match Command::new("cpio")
            .arg("-it")
            .stdin(fs::File::open(path).unwrap())
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("skipping cpio check: cannot run cpio ({e}); apt-get install -y cpio");
                return None;
            }
        };
        assert!(
            out.status.success(),
            "cpio -it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect(),
        )
    }

    #[test]
    fn cpio_writer_header_fields_and_padding() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/ab", 0o644, b"xyz").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(&out[..6], b"070701");
        let field = |i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&out[6 + 8 * i..14 + 8 * i]).unwrap(),
                16,
            )
            .unwrap()
        };
        assert_eq!(field(1), 0o100644); // mode
        assert_eq!(field(6), 3); // filesize
        assert_eq!(field(11), 3); // namesize "ab\0"
                                  // 110 + 3 = 113 -> name padded to 116; data 3 -> padded to 120.
        assert_eq!(&out[110..116], b"ab\0\0\0\0");
        assert_eq!(&out[116..120], b"xyz\0");
        assert_eq!(&out[120..126], b"070701");
        assert!(out.windows(11).any(|w| w == b"TRAILER!!!\0"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn cpio_writer_char_dev_has_rdev() {
        let mut w = CpioWriter::new(Vec::new());
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        let field = |i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&out[6 + 8 * i..14 + 8 * i]).unwrap(),
                16,
            )
            .unwrap()
        };
        assert_eq!(field(1), 0o020600);
        assert_eq!((field(9), field(10)), (5, 1));
    }

    #[test]
    fn cpio_writer_output_lists_with_cpio() {
        let dir = TestDir::new("cpio-list");
        let path = dir.0.join("a.cpio");
        let mut w = CpioWriter::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file("d/f", 0o644, b"hello").unwrap();
        w.char_dev("d/c", 0o600, 5, 1).unwrap();
        fs::write(&path, w.finish().unwrap()).unwrap();
        if let Some(list) = cpio_list(&path) {
            assert_eq!(list, ["d", "d/f", "d/c"]);
        }
    }

    #[test]
    fn modinfo_depends_lists_dependencies() {
        let m = fake_module(b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_mmio\0");
        assert_eq!(modinfo_depends(&m).unwrap(), ["virtio", "virtio_ring"]);
        let m = fake_module(b"depends=\0name=vsock\0");
        assert!(modinfo_depends(&m).unwrap().is_empty());
    }

    #[test]
    fn modinfo_depends_hostile_input_errors_without_panic() {
        assert!(modinfo_depends(b"").is_err());
        assert!(modinfo_depends(b"\x7fELF").is_err());
        let good = fake_module(b"depends=a\0");
        // Every truncation is an error or a result, never a panic.
        for len in 0..good.len() {
            let _ = modinfo_depends(&good[..len]);
        }
        // Section header offset pointing far away.
        let mut bad = good.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(modinfo_depends(&bad).is_err());
        // shstrndx out of range.
        let mut bad = good.clone();
        bad[0x3e..0x40].copy_from_slice(&9u16.to_le_bytes());
        assert!(modinfo_depends(&bad).is_err());
        // Each byte flipped: no panic.
        for i in 0..good.len() {
            let mut m = good.clone();
            m[i] ^= 0xff;
            let _ = modinfo_depends(&m);
        }
    }

    #[test]
    fn module_closure_fake_tree_deps_first_and_dash_equals_underscore() {
        let dir = TestDir::new("modtree");
        fs::create_dir_all(dir.0.join("kernel/a")).unwrap();
        fs::write(
            dir.0.join("kernel/a/top-mod.ko"),
            fake_module(b"depends=mid,base\0"),
        )
        .unwrap();
        fs::write(
            dir.0.join("kernel/a/mid.ko"),
            fake_module(b"depends=base\0"),
        )
        .unwrap();
        fs::write(dir.0.join("kernel/a/base.ko"), fake_module(b"depends=\0")).unwrap();
        let names: Vec<_> = module_closure(&dir.0, &["top_mod", "base"])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["base", "mid", "top_mod"]);
    }

    #[test]
    fn module_closure_cycle_and_missing_error() {
        let dir = TestDir::new("modcycle");
        fs::write(dir.0.join("a.ko"), fake_module(b"depends=b\0")).unwrap();
        fs::write(dir.0.join("b.ko"), fake_module(b"depends=a\0")).unwrap();
        fs::write(dir.0.join("c.ko"), fake_module(b"depends=nope\0")).unwrap();
        assert!(matches!(
            module_closure(&dir.0, &["a"]),
            Err(InitramfsError::DependencyCycle(_))
        ));
        assert!(matches!(
            module_closure(&dir.0, &["c"]),
            Err(InitramfsError::ModuleNotFound { .. })
        ));
    }

    #[test]
    fn module_closure_builtin_skipped_compressed_reported() {
        let dir = TestDir::new("modbuiltin");
        fs::write(
            dir.0.join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        fs::write(dir.0.join("a.ko"), fake_module(b"depends=virtio\0")).unwrap();
        fs::write(dir.0.join("z.ko.xz"), b"\xfd7zXZ").unwrap();
        let names: Vec<_> = module_closure(&dir.0, &["a"])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["a"]);
        assert!(matches!(
            module_closure(&dir.0, &["z"]),
            Err(InitramfsError::CompressedModule { .. })
        ));
    }

    #[test]
    fn module_closure_malformed_module_errors() {
        let dir = TestDir::new("modbad");
        fs::write(dir.0.join("a.ko"), b"not an elf").unwrap();
        assert!(matches!(
            module_closure(&dir.0, &["a"]),
            Err(InitramfsError::BadModule { .. })
        ));
    }

    #[test]
    fn ensure_in_empty_init_refused() {
        let dir = TestDir::new("noinit");
        let k = KernelAssets {
            version: "v".into(),
            kernel: dir.0.join("k"),
            config: None,
            modules_dir: None,
        };
        assert!(matches!(
            ensure_in(&dir.0, &k, b"", &[]),
            Err(InitramfsError::NoGuestInit)
        ));
    }

    #[test]
    fn cache_key_changes_with_each_input() {
        let k = KernelAssets {
            version: "v".into(),
            kernel: "k".into(),
            config: None,
            modules_dir: None,
        };
        let base = cache_key(&k, b"init", &["a"]);
        assert_eq!(base, cache_key(&k, b"init", &["a"]));
        assert_ne!(base, cache_key(&k, b"init2", &["a"]));
        assert_ne!(base, cache_key(&k, b"init", &["a", "b"]));
        let k2 = KernelAssets {
            version: "w".into(),
            ..k.clone()
        };
        assert_ne!(base, cache_key(&k2, b"init", &["a"]));
    }

    #[test]
    fn guest_init_embedded_is_static_elf() {
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert_eq!(&GUEST_INIT[..4], b"\x7fELF");
        } else {
            assert!(GUEST_INIT.is_empty());
        }
    }

    #[test]
    fn module_closure_real_kernel_deps_before_users() {
        let Some(k) = shared_test_kernel() else {
            return;
        };
        let mods = module_closure(k.modules_dir.as_deref().unwrap(), DEFAULT_MODULES).unwrap();
        let names: Vec<&str> = mods.iter().map(|m| m.name.as_str()).collect();
        let pos = |n: &str| {
            names
                .iter()
                .position(|&x| x == n)
                .unwrap_or_else(|| panic!("{n} missing from {names:?}"))
        };
        // Built-in ones (ext4 in Debian's cloud kernel) are rightly left out.
        let builtin = builtin_modules(k.modules_dir.as_deref().unwrap());
        for wanted in DEFAULT_MODULES {
            if !builtin.iter().any(|b| b == wanted) {
                pos(wanted);
            }
        }
        // virtio_mmio depends on virtio and virtio_ring; the vsock transport on
        // vsock and the common transport; erofs on libcrc32c.
        assert!(pos("virtio") < pos("virtio_mmio"));
        assert!(pos("virtio_ring") < pos("virtio_mmio"));
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
        assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
        assert!(pos("libcrc32c") < pos("erofs"));
        // Each module appears once.
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }

    /// Boots the real kernel with the built initramfs under QEMU (TCG, no KVM
    /// needed) when QEMU is installed: guest-init must load every module without
    /// error, print the ready marker with the right CPU count and power off.
    /// QEMU's `pc` machine has its ACPI PM block at 0x600, so the status write is
    /// not observable here; the VMM's own tests check the status register.
    #[test]
    fn initramfs_real_kernel_boots_to_ready_marker_under_qemu() {
        let Some(k) = shared_test_kernel() else {
            return;
        };
        let qemu = "qemu-system-x86_64";
        if !cfg!(target_arch = "x86_64") || Command::new(qemu).arg("--version").output().is_err() {
            eprintln!("skipping: {qemu} is not installed (apt-get install -y qemu-system-x86)");
            return;
        }
        let cache = TestDir::new("initramfs-boot");
        let initrd = ensure_in(&cache.0, &k, GUEST_INIT, DEFAULT_MODULES).unwrap();
        let log = cache.0.join("console.log");
        let mut child = Command::new(qemu)
            .args(["-M", "pc", "-cpu", "max", "-m", "512", "-smp", "2"])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&k.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 sm.exit=0"])
            .stdin(std::process::Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "guest did not power off in 180 s:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let out = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
        assert!(status.success(), "qemu: {status}\n{out}");
        assert!(
            out.contains("supermachine: guest-init ready (cpus=2)"),
            "{out}"
        );
        assert!(
            !out.contains("supermachine: guest-init:"),
            "guest-init reported a failure:\n{out}"
        );
        assert!(
            out.contains("Registered PF_VSOCK"),
            "vsock module not loaded:\n{out}"
        );
        assert!(out.contains("reboot: Power down"), "{out}");
    }

    #[test]
    fn ensure_in_real_kernel_builds_once_and_lists_with_cpio() {
        let Some(k) = shared_test_kernel() else {
            return;
        };
        let cache = TestDir::new("initramfs-cache");
        let path = ensure_in(&cache.0, &k, GUEST_INIT, DEFAULT_MODULES).unwrap();
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(
            ensure_in(&cache.0, &k, GUEST_INIT, DEFAULT_MODULES).unwrap(),
            path
        );
        assert_eq!(
            fs::metadata(&path).unwrap().modified().unwrap(),
            mtime,
            "reused, not rebuilt"
        );

        let mods = module_closure(k.modules_dir.as_deref().unwrap(), DEFAULT_MODULES).unwrap();
        let mut expected: Vec<String> = [
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "lib",
            "lib/modules",
            "dev/console",
            "init",
        ]
        .map(String::from)
        .to_vec();
        expected.extend(mods.iter().map(|m| format!("lib/modules/{}.ko", m.name)));
        expected.push(ORDER_FILE.to_string());
        if let Some(list) = cpio_list(&path) {
            assert_eq!(list, expected);
            // cpio reads back the exact init bytes and the load order.
            let extract = |name: &str| {
                let out = Command::new("cpio")
                    .args(["-i", "--quiet", "--to-stdout", name])
                    .stdin(fs::File::open(&path).unwrap())
                    .output()
                    .unwrap();
                assert!(out.status.success());
                out.stdout
            };
            assert!(extract("init") == GUEST_INIT, "init bytes differ");
            let order: String = mods.iter().map(|m| format!("{}\n", m.name)).collect();
            assert_eq!(String::from_utf8(extract(ORDER_FILE)).unwrap(), order);
        }
        // Only the archive is left in the cache (no temp files).
        let names: Vec<_> = fs::read_dir(&cache.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }
}
