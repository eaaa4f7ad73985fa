//! Knowing when a kernel cannot run usefully on a PVM host.
//!
//! On a host whose KVM is PVM (`kvm_pvm`, no VMX/SVM), a guest kernel built without
//! PVM-guest support is executed by KVM's instruction emulator: tiny guests work, a
//! general-purpose kernel never reaches userspace in reasonable time. The product
//! refuses such a kernel up front ([`refuse_emulated_kernel`]) instead of crawling.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Environment variable that lets a kernel without PVM-guest support boot on a
/// PVM host anyway (any value but `0`).
pub const ALLOW_EMULATED_ENV: &str = "SUPERMACHINE_ALLOW_EMULATED";

/// A Linux kernel without PVM-guest support, refused on a PVM host.
#[derive(Debug, thiserror::Error)]
#[error(
    "this host's /dev/kvm is PVM (kvm_pvm): a kernel without PVM-guest support runs in \
     KVM's instruction emulator and never reaches userspace in reasonable time. Boot it on \
     a host with hardware virtualization, in the nested test rig (tests/nested/rig), or use \
     a kernel built with CONFIG_PVM_GUEST=y. Set {ALLOW_EMULATED_ENV}=1 to try anyway. \
     (kernel: {})",
    kernel.display()
)]
pub struct EmulatedKernelRefused {
    /// The kernel path.
    pub kernel: PathBuf,
}

/// Refuses `kernel` when the host is PVM (`pvm_host`, from the hypervisor's
/// capabilities) and it is a Linux kernel not known to support PVM guests;
/// tiny non-Linux guests and [`ALLOW_EMULATED_ENV`] pass.
pub fn refuse_emulated_kernel(pvm_host: bool, kernel: &Path) -> Result<(), EmulatedKernelRefused> {
    if !pvm_host || std::env::var_os(ALLOW_EMULATED_ENV).is_some_and(|v| v != "0") {
        return Ok(());
    }
    if is_linux_kernel(kernel) && supports_pvm_guest(kernel) != Some(true) {
        return Err(EmulatedKernelRefused {
            kernel: kernel.to_owned(),
        });
    }
    Ok(())
}

/// Whether the file is a Linux kernel: a bzImage, an arm64 `Image` (magic "ARM\x64" at
/// 0x38, Documentation/arch/arm64/booting.rst), or an ELF carrying a `Linux` note.
pub fn is_linux_kernel(path: &Path) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let mut head = [0u8; 0x400];
    let n = read_up_to(&mut f, &mut head);
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return true;
    }
    if n >= 0x40 && head[0x38..0x3c] == *b"ARM\x64" {
        return true;
    }
    n >= 64 && head[..4] == *b"\x7fELF" && elf_has_linux_note(&mut f, &head[..n])
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Walks the PT_NOTE segments of an ELF64 file looking for an owner named "Linux".
/// Every size is bounded: a malformed file is simply "not Linux".
fn elf_has_linux_note(f: &mut File, ehdr: &[u8]) -> bool {
    if ehdr.get(4) != Some(&2) {
        return false; // not ELFCLASS64
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        u64_at(ehdr, 32),
        ehdr.get(54..56).map(|b| u16::from_le_bytes([b[0], b[1]])),
        ehdr.get(56..58).map(|b| u16::from_le_bytes([b[0], b[1]])),
    ) else {
        return false;
    };
    if phentsize != 56 || phnum > 64 {
        return false;
    }
    let mut phdrs = vec![0u8; 56 * usize::from(phnum)];
    if f.seek(SeekFrom::Start(phoff)).is_err() || f.read_exact(&mut phdrs).is_err() {
        return false;
    }
    for ph in phdrs.chunks_exact(56) {
        if u32_at(ph, 0) != Some(4) {
            continue; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (u64_at(ph, 8), u64_at(ph, 32)) else {
            continue;
        };
        if size > 1 << 20 {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        if f.seek(SeekFrom::Start(off)).is_err() || f.read_exact(&mut notes).is_err() {
            continue;
        }
        let mut pos = 0usize;
        while let (Some(namesz), Some(descsz)) = (u32_at(&notes, pos), u32_at(&notes, pos + 4)) {
            let name_start = pos + 12;
            let name_len = namesz as usize;
            if notes.get(name_start..name_start + name_len.min(5)) == Some(b"Linux") {
                return true;
            }
            let next = name_start
                .checked_add(name_len.next_multiple_of(4))
                .and_then(|p| p.checked_add((descsz as usize).next_multiple_of(4)));
            match next {
                Some(p) if p > pos => pos = p,
                _ => break,
            }
        }
    }
    false
}

/// The version string a bzImage carries (boot protocol `kernel_version` field),
/// e.g. "6.1.0-56-cloud-amd64".
pub fn bzimage_version(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let mut head = [0u8; 0x210];
    f.read_exact(&mut head).ok()?;
    if head[0x202..0x206] != *b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([head[0x20e], head[0x20f]]);
    if ptr == 0 {
        return None;
    }
    f.seek(SeekFrom::Start(0x200 + u64::from(ptr))).ok()?;
    let mut s = [0u8; 128];
    let n = read_up_to(&mut f, &mut s);
    let text = &s[..n];
    let end = text.iter().position(|&b| b == 0 || b == b' ')?;
    String::from_utf8(text[..end].to_vec()).ok()
}

/// Where the kernel's build config might be: `config-<version>` beside it (Debian's
/// `/boot` layout, which supermachine's kernel cache keeps) or in `/boot`.
fn config_candidates(kernel: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let dir = kernel.parent().unwrap_or(Path::new("."));
    let from_name = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| {
            n.strip_prefix("vmlinuz-")
                .or_else(|| n.strip_prefix("vmlinux-"))
        })
        .map(str::to_string);
    for v in from_name.into_iter().chain(bzimage_version(kernel)) {
        out.push(dir.join(format!("config-{v}")));
        out.push(Path::new("/boot").join(format!("config-{v}")));
    }
    out.push(dir.join("config"));
    out
}

/// Whether the kernel was built with PVM-guest support (`CONFIG_PVM_GUEST=y`), if its
/// config can be found.
pub fn supports_pvm_guest(kernel: &Path) -> Option<bool> {
    let cfg = config_candidates(kernel)
        .into_iter()
        .find_map(|p| std::fs::read_to_string(p).ok())?;
    Some(cfg.lines().any(|l| l.trim() == "CONFIG_PVM_GUEST=y"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sm-pvm-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn fake_bzimage(version: &str) -> Vec<u8> {
        let mut k = vec![0u8; 0x1000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        let ptr: u16 = 0x300;
        k[0x20e..0x210].copy_from_slice(&ptr.to_le_bytes());
        let at = 0x200 + usize::from(ptr);
        k[at..at + version.len()].copy_from_slice(version.as_bytes());
        k
    }

    #[test]
    fn bzimage_is_linux_and_reports_its_version() {
        let d = tmpdir("bz");
        let k = d.join("kernel");
        std::fs::write(&k, fake_bzimage("6.1.0-99-cloud-amd64 (debian-kernel@...)")).unwrap();
        assert!(is_linux_kernel(&k));
        assert_eq!(bzimage_version(&k).as_deref(), Some("6.1.0-99-cloud-amd64"));
    }

    #[test]
    fn supports_pvm_guest_reads_config_beside_kernel() {
        let d = tmpdir("cfg");
        let k = d.join("vmlinuz-6.1.0-99-cloud-amd64");
        std::fs::write(&k, fake_bzimage("6.1.0-99-cloud-amd64")).unwrap();
        assert_eq!(supports_pvm_guest(&k), None);
        std::fs::write(
            d.join("config-6.1.0-99-cloud-amd64"),
            "CONFIG_KVM_GUEST=y\n",
        )
        .unwrap();
        assert_eq!(supports_pvm_guest(&k), Some(false));
        std::fs::write(
            d.join("config-6.1.0-99-cloud-amd64"),
            "CONFIG_PVM_GUEST=y\n",
        )
        .unwrap();
        assert_eq!(supports_pvm_guest(&k), Some(true));
    }

    #[test]
    fn pvh_test_guest_is_not_linux() {
        let d = tmpdir("pvh");
        let k = d.join("tiny.elf");
        std::fs::write(
            &k,
            test_guests::pvh_elf(&test_guests::hello_and_poweroff_code(b'x', 0)),
        )
        .unwrap();
        assert!(!is_linux_kernel(&k));
    }

    #[test]
    fn elf_with_linux_note_is_linux() {
        // A PVH ELF whose note owner is renamed to "Linux" (same length is not needed:
        // rebuild the note by hand).
        let mut elf = test_guests::pvh_elf(&[0xf4]);
        let pos = elf.windows(4).position(|w| w == b"Xen\0").unwrap();
        // namesz 4 -> keep, but owner "Linux" needs 6 bytes: rewrite as a 4-byte-name
        // note would not match, so patch namesz and shift.
        let mut note = Vec::new();
        note.extend_from_slice(&6u32.to_le_bytes());
        note.extend_from_slice(&0u32.to_le_bytes());
        note.extend_from_slice(&1u32.to_le_bytes());
        note.extend_from_slice(b"Linux\0\0\0");
        let note_start = pos - 12;
        elf.splice(note_start..pos + 8, note.iter().copied());
        // Fix the PT_NOTE size (second program header at 64+56, p_filesz at +32).
        let ph = 64 + 56;
        elf[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        let d = tmpdir("linuxnote");
        let k = d.join("vmlinux");
        std::fs::write(&k, &elf).unwrap();
        assert!(is_linux_kernel(&k));
    }

    #[test]
    fn arm64_image_is_linux() {
        let d = tmpdir("arm64");
        let k = d.join("Image");
        let mut img = vec![0u8; 0x1000];
        img[0x38..0x3c].copy_from_slice(b"ARM\x64");
        std::fs::write(&k, &img).unwrap();
        assert!(is_linux_kernel(&k));
    }

    #[test]
    fn truncated_or_garbage_files_are_not_linux() {
        let d = tmpdir("garbage");
        let k = d.join("g");
        std::fs::write(&k, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(!is_linux_kernel(&k));
        std::fs::write(&k, vec![0xffu8; 4096]).unwrap();
        assert!(!is_linux_kernel(&k));
    }
}
