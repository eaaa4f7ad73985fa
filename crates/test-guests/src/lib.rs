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

/// Where [`touch_code`] starts writing: above the code and its tables.
pub const TOUCH_FROM: u64 = 2 << 20;

/// 32-bit code that writes `bytes` bytes of guest RAM from [`TOUCH_FROM`] (so
/// that many are dirty), writes `!` to COM1, then spins forever: a guest whose
/// touched memory a snapshot's cost can be measured against.
pub fn touch_code(bytes: u32) -> Vec<u8> {
    let mut c = Vec::new();
    // mov edi, TOUCH_FROM ; mov ecx, bytes / 4 ; mov eax, 0x5a5a5a5a ; rep stosd
    c.push(0xbf);
    c.extend_from_slice(&(TOUCH_FROM as u32).to_le_bytes());
    c.push(0xb9);
    c.extend_from_slice(&(bytes / 4).to_le_bytes());
    c.push(0xb8);
    c.extend_from_slice(&0x5a5a_5a5au32.to_le_bytes());
    c.extend_from_slice(&[0xf3, 0xab]);
    // mov dx, 0x3f8 ; mov al, '!' ; out dx, al
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee]);
    // 1: pause ; jmp 1b
    c.extend_from_slice(&[0xf3, 0x90, 0xeb, 0xfc]);
    c
}

/// Where [`heartbeat_code`] keeps its COM1 lock (a byte) and, from
/// `HEARTBEAT_COUNTERS`, each vCPU's counter (a `u32` per vCPU index).
pub const HEARTBEAT_LOCK: u64 = 0x1_1000;
/// See [`HEARTBEAT_LOCK`].
pub const HEARTBEAT_COUNTERS: u64 = 0x1_1004;
/// Where [`heartbeat_code`] copies its application-processor trampoline (SIPI
/// vector 0x10); free RAM in supermachine's x86_64 layout.
pub const HEARTBEAT_AP_TRAMPOLINE: u64 = 0x1_0000;

/// 32-bit code for a heartbeat guest of one or two vCPUs: every vCPU counts
/// 1, 2, 3, ... forever, and for each count prints a line `<vcpu>:<count as 8
/// lowercase hex digits>\n` on COM1 (under a spinlock in guest memory, so lines
/// never interleave) and stores the count at `HEARTBEAT_COUNTERS + 4 * vcpu`, then
/// spins `delay_loops` iterations of `loop`. The boot CPU first copies a real-mode
/// trampoline to [`HEARTBEAT_AP_TRAMPOLINE`], enables its local APIC and sends
/// INIT and a start-up IPI to all other CPUs; the trampoline enters 32-bit
/// protected mode with its own flat GDT and joins the loop as vCPU 1. With one
/// vCPU the IPIs reach nobody.
///
/// ```text
/// _start:  mov esi, tramp ; mov edi, 0x10000 ; mov ecx, tramp_len ; cld ; rep movsb
///          mov dword [0xfee000f0], 0x1ff            ; APIC software enable
///          mov dword [0xfee00300], 0x000c4500       ; INIT, all but self
///          mov dword [0xfee00300], 0x000c4610       ; SIPI vector 0x10, all but self
///          xor ebp, ebp ; jmp heartbeat
/// ap32:    mov ax, 0x10 ; mov ds, ax ; mov es, ax ; mov ss, ax ; mov ebp, 1
/// heartbeat: xor esi, esi
/// beat:    inc esi ; mov [0x11004 + ebp*4], esi
/// acquire: mov al, 1 ; xchg al, [0x11000] ; test al, al ; jz locked ; pause ; jmp acquire
/// locked:  mov dx, 0x3f8 ; mov eax, ebp ; add al, '0' ; out dx, al ; mov al, ':' ; out dx, al
///          mov ecx, 8 ; mov edi, esi
/// digit:   rol edi, 4 ; mov eax, edi ; and al, 0xf ; cmp al, 10 ; jb dec ; add al, 0x27
/// dec:     add al, '0' ; out dx, al ; loop digit
///          mov al, 10 ; out dx, al ; mov byte [0x11000], 0
///          mov ecx, delay_loops
/// delay:   loop delay ; jmp beat
/// tramp (16-bit, copied to 0x10000, entered at 1000:0000):
///          cli ; mov ax, cs ; mov ds, ax ; lgdt [gdtr - tramp]
///          mov eax, cr0 ; or eax, 1 ; mov cr0, eax ; jmp dword 0x08:ap32
///          gdt: null, flat 32-bit code (0x08), flat data (0x10) ; gdtr: 23, 0x10000 + gdt - tramp
/// ```
pub fn heartbeat_code(delay_loops: u32) -> Vec<u8> {
    // Assembled for LOAD_ADDR (absolute addresses of `tramp` and `ap32` inside).
    const CODE: [u8; 214] = [
        0xbe, 0x95, 0x00, 0x10, 0x00, 0xbf, 0x00, 0x00, 0x01, 0x00, 0xb9, 0x41, 0x00, 0x00, 0x00,
        0xfc, 0xf3, 0xa4, 0xc7, 0x05, 0xf0, 0x00, 0xe0, 0xfe, 0xff, 0x01, 0x00, 0x00, 0xc7, 0x05,
        0x00, 0x03, 0xe0, 0xfe, 0x00, 0x45, 0x0c, 0x00, 0xc7, 0x05, 0x00, 0x03, 0xe0, 0xfe, 0x10,
        0x46, 0x0c, 0x00, 0x31, 0xed, 0xeb, 0x0f, 0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xc0,
        0x8e, 0xd0, 0xbd, 0x01, 0x00, 0x00, 0x00, 0x31, 0xf6, 0x46, 0x89, 0x34, 0xad, 0x04, 0x10,
        0x01, 0x00, 0xb0, 0x01, 0x86, 0x05, 0x00, 0x10, 0x01, 0x00, 0x84, 0xc0, 0x74, 0x04, 0xf3,
        0x90, 0xeb, 0xf0, 0x66, 0xba, 0xf8, 0x03, 0x89, 0xe8, 0x04, 0x30, 0xee, 0xb0, 0x3a, 0xee,
        0xb9, 0x08, 0x00, 0x00, 0x00, 0x89, 0xf7, 0xc1, 0xc7, 0x04, 0x89, 0xf8, 0x24, 0x0f, 0x3c,
        0x0a, 0x72, 0x02, 0x04, 0x27, 0x04, 0x30, 0xee, 0xe2, 0xee, 0xb0, 0x0a, 0xee, 0xc6, 0x05,
        0x00, 0x10, 0x01, 0x00, 0x00, 0xb9, 0x78, 0x56, 0x34, 0x12, 0xe2, 0xfe, 0xeb, 0xb0, 0xfa,
        0x8c, 0xc8, 0x8e, 0xd8, 0x66, 0x0f, 0x01, 0x16, 0x3b, 0x00, 0x0f, 0x20, 0xc0, 0x66, 0x83,
        0xc8, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x34, 0x00, 0x10, 0x00, 0x08, 0x00, 0x8d, 0xb4,
        0x00, 0x00, 0x66, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00,
        0x00, 0x00, 0x9a, 0xcf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00, 0x17, 0x00,
        0x23, 0x00, 0x01, 0x00,
    ];
    /// Offset of the `mov ecx, delay_loops` immediate.
    const DELAY_IMM: usize = 0x8d;
    let mut c = CODE.to_vec();
    c[DELAY_IMM..DELAY_IMM + 4].copy_from_slice(&delay_loops.to_le_bytes());
    c
}

/// One heartbeat line: which vCPU printed it and its count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// vCPU index.
    pub vcpu: u32,
    /// The count (1 for the first line).
    pub count: u32,
}

/// Parses the complete lines of [`heartbeat_code`]'s output; a trailing partial
/// line is left out. `None` if a complete line is malformed.
pub fn parse_heartbeats(output: &[u8]) -> Option<Vec<Beat>> {
    let complete = match output.iter().rposition(|&b| b == b'\n') {
        Some(end) => &output[..end],
        None => return Some(Vec::new()),
    };
    complete
        .split(|&b| b == b'\n')
        .map(|line| {
            let line = std::str::from_utf8(line).ok()?;
            let (vcpu, count) = line.split_once(':')?;
            if count.len() != 8 {
                return None;
            }
            Some(Beat {
                vcpu: vcpu.parse().ok()?,
                count: u32::from_str_radix(count, 16).ok()?,
            })
        })
        .collect()
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
    fn heartbeat_code_patches_the_delay_immediate() {
        let c = heartbeat_code(0xdead_beef);
        // `mov ecx, imm32` (0xb9) right before the delay's `loop $` (0xe2 0xfe).
        assert_eq!(c[0x8c], 0xb9);
        assert_eq!(&c[0x8d..0x91], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&c[0x91..0x93], &[0xe2, 0xfe]);
    }

    #[test]
    fn parse_heartbeats_reads_complete_lines_only() {
        let beats = parse_heartbeats(b"0:00000001\n1:0000000a\n0:0000").unwrap();
        assert_eq!(
            beats,
            vec![Beat { vcpu: 0, count: 1 }, Beat { vcpu: 1, count: 10 }]
        );
        assert_eq!(parse_heartbeats(b"0:0000").unwrap(), vec![]);
    }

    #[test]
    fn parse_heartbeats_malformed_line_is_none() {
        assert_eq!(parse_heartbeats(b"0:xyz\n"), None);
        assert_eq!(parse_heartbeats(b"0:000000001\n"), None);
    }

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
