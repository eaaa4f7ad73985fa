//! Tiny guests for tests and benchmarks that run directly on `/dev/kvm` where a full
//! Linux guest cannot (PVM hosts) or would drown the number being measured in kernel
//! boot time: hand-assembled snippets, and [`VIRTIO_DRIVER_ELF`], a freestanding
//! Rust guest program that drives the virtio-mmio devices.
//!
//! [`pvh_elf`] wraps 32-bit code into an ELF64 executable with a
//! `XEN_ELFNOTE_PHYS32_ENTRY` note, so the VMM's PVH loading path boots it exactly as
//! it boots a PVH Linux vmlinux. Code runs in 32-bit protected mode, paging off,
//! `ebx` = address of `hvm_start_info`.

/// A freestanding Rust guest (`virtio-driver/`, built for `x86_64-unknown-none` by
/// this crate's build script) that drives every virtio-mmio device it finds
/// through real MMIO exits and interrupts: virtio 1.2 §3.1.1 initialization, a
/// split virtqueue, block reads and writes, a write refused by a read-only disk,
/// an entropy request. It prints its findings on COM1 and exits 0 when every check
/// passed (see its crate docs for the failure codes). Boot it with a writable disk
/// first and a read-only one second.
pub const VIRTIO_DRIVER_ELF: &[u8] = include_bytes!(env!("SUPERMACHINE_VIRTIO_DRIVER_GUEST"));

/// The 512 bytes [`VIRTIO_DRIVER_ELF`] writes to sector 1 of its writable disk
/// (the same formula as `pattern` in `virtio-driver/src/main.rs`).
pub fn virtio_driver_sector1_pattern() -> Vec<u8> {
    (0..512usize)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(3) ^ 0xa5)
        .collect()
}

/// Where the guest's code is loaded and entered (1 MiB, like a kernel).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// 32-bit code: writes `byte` to COM1's data register, then requests ACPI S5
/// power-off through supermachine's sleep-control port (0x600, SLP_TYP=5 | SLP_EN),
/// then halts forever.
pub fn hello_and_poweroff_code(byte: u8, exit_status: u32) -> Vec<u8> {
    let mut c = Vec::new();
    // mov dx, 0x3f8 ; mov al, byte ; out dx, al
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, byte, 0xee]);
    // mov dx, 0x604 ; mov eax, exit_status ; out dx, eax
    c.extend_from_slice(&[0x66, 0xba, 0x04, 0x06, 0xb8]);
    c.extend_from_slice(&exit_status.to_le_bytes());
    c.push(0xef);
    // mov dx, 0x600 ; mov al, 0x34 ; out dx, al
    c.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee]);
    // 1: hlt ; jmp 1b
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    c
}

/// 32-bit code that writes each byte of `text` and a newline to COM1 and powers off
/// with `exit_status`.
pub fn print_and_poweroff_code(text: &[u8], exit_status: u32) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b ; out dx, al
    }
    let tail = hello_and_poweroff_code(b'\n', exit_status);
    // `dx` already holds COM1: skip the tail's leading `mov dx, 0x3f8` (4 bytes).
    c.extend_from_slice(&tail[4..]);
    c
}

/// Builds an ELF64 x86-64 executable that loads `code` at [`LOAD_ADDR`] and declares
/// it as the PVH 32-bit entry point.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note = pvh_note(LOAD_ADDR as u32);
    let phoff = EHDR;
    let note_off = EHDR + 2 * PHDR;
    let code_off = (note_off + note.len()).next_multiple_of(16);
    let mut f = Vec::with_capacity(code_off + code.len());

    // ELF header (System V ABI gABI, "ELF Header").
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, little endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&(phoff as u64).to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // phnum
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx

    // PT_LOAD for the code.
    phdr(
        &mut f,
        1,
        5,
        code_off as u64,
        LOAD_ADDR,
        code.len() as u64,
        16,
    );
    // PT_NOTE for the PVH entry.
    phdr(&mut f, 4, 4, note_off as u64, 0, note.len() as u64, 4);
    f.extend_from_slice(&note);
    f.resize(code_off, 0);
    f.extend_from_slice(code);
    f
}

fn phdr(f: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64) {
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&off.to_le_bytes());
    f.extend_from_slice(&addr.to_le_bytes()); // vaddr
    f.extend_from_slice(&addr.to_le_bytes()); // paddr
    f.extend_from_slice(&size.to_le_bytes()); // filesz
    f.extend_from_slice(&size.to_le_bytes()); // memsz
    f.extend_from_slice(&align.to_le_bytes());
}

/// `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, owner "Xen") with a 32-bit address.
fn pvh_note(entry: u32) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
    n.extend_from_slice(&4u32.to_le_bytes()); // descsz
    n.extend_from_slice(&18u32.to_le_bytes()); // type
    n.extend_from_slice(b"Xen\0");
    n.extend_from_slice(&entry.to_le_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_elf_has_magic_entry_and_note() {
        let code = hello_and_poweroff_code(b'X', 0);
        let elf = pvh_elf(&code);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(
            u64::from_le_bytes(elf[24..32].try_into().unwrap()),
            LOAD_ADDR
        );
        assert!(elf.windows(4).any(|w| w == b"Xen\0"));
        assert!(elf.ends_with(&code));
    }

    #[test]
    fn virtio_driver_elf_is_pvh_elf_linked_at_1mib() {
        let elf = VIRTIO_DRIVER_ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(
            u16::from_le_bytes([elf[16], elf[17]]),
            2,
            "ET_EXEC, not PIE"
        );
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "EM_X86_64");
        // The PVH note: namesz 4, descsz 4, type 18, "Xen\0", entry at or above 1 MiB.
        let mut note = Vec::new();
        for v in [4u32, 4, 18] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        let at = elf
            .windows(note.len())
            .position(|w| w == note.as_slice())
            .expect("PVH note present");
        let entry = u32::from_le_bytes(elf[at + 16..at + 20].try_into().unwrap());
        assert!(u64::from(entry) >= LOAD_ADDR, "entry {entry:#x}");
    }

    #[test]
    fn virtio_driver_pattern_is_not_constant() {
        let p = virtio_driver_sector1_pattern();
        assert_eq!(p.len(), 512);
        assert_ne!(p[0], p[1]);
    }

    #[test]
    fn hello_code_writes_the_byte_to_com1() {
        let code = hello_and_poweroff_code(b'Q', 7);
        assert_eq!(&code[..7], &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'Q', 0xee]);
        assert_eq!(&code[12..16], &7u32.to_le_bytes());
    }
}
