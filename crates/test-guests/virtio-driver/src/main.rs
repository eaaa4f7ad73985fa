//! A freestanding guest that drives supermachine's virtio-mmio devices end to end
//! through real vCPU exits: it discovers the windows, initializes each block and
//! entropy device (virtio 1.2 §3.1.1), sets up a split virtqueue, submits
//! requests, sleeps in `hlt` until the device's interrupt arrives through the
//! IOAPIC and local APIC, and checks the used ring. It prints what it sees on COM1
//! and reports through supermachine's exit status register, then powers off.
//!
//! Entry is PVH (xen/include/public/arch-x86/hvm/start_info.h): 32-bit protected
//! mode, paging off, `%ebx` = `hvm_start_info`. The stub below identity-maps the
//! low 4 GiB with 2 MiB pages (the top GiB, the MMIO hole, uncached), enters long
//! mode and calls [`rust_main`].
//!
//! Exit status: 0 when every check passed; otherwise the code of the first failed
//! check (see the `EXIT_*` constants; a request step's code adds 0 for "no
//! interrupt in time", 1 for a malformed used ring, 2 for a wrong used length, 3
//! for a wrong status byte; an init step adds [`virtio::InitError::code`]),
//! 99 for a panic, 100 + vector for a CPU exception.

#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

mod hw;
mod virtio;

use core::sync::atomic::{AtomicU32, Ordering};

use hw::Shared;
use virtio::{Buf, Completion, Queue, Ring, Transport};

// No device answered at the first window.
const EXIT_NO_DEVICES: u32 = 10;
// A window answered with the magic value but not version 2.
const EXIT_BAD_VERSION: u32 = 11;
// No writable block device to read and write.
const EXIT_NO_RW_DISK: u32 = 12;
// The LAPIC timer (the watchdog for every wait) never ticked.
const EXIT_TIMER_DEAD: u32 = 13;
// The IOAPIC has no pin for a device's GSI, or the route did not stick.
const EXIT_IOAPIC: u32 = 14;
// Interrupts arrived on vectors nothing was routed to.
const EXIT_UNEXPECTED_IRQ: u32 = 15;
// Device interrupts do not add up to one per request.
const EXIT_IRQ_COUNT: u32 = 16;
// The PVH start info does not carry its magic value.
const EXIT_START_INFO: u32 = 17;
// Block capacity below the two sectors the test uses.
const EXIT_CAPACITY: u32 = 18;
// Device initialization, per role (+ InitError::code()).
const EXIT_RW_DISK_INIT: u32 = 20;
const EXIT_RO_DISK_INIT: u32 = 24;
const EXIT_RNG_INIT: u32 = 28;
// Requests (+0 timeout, +1 used ring, +2 used length, +3 status byte).
const EXIT_READ: u32 = 30;
const EXIT_WRITE: u32 = 40;
const EXIT_RO_WRITE: u32 = 50;
const EXIT_RNG: u32 = 60;
// Panics and CPU exceptions.
const EXIT_PANIC: u32 = 99;
pub const EXIT_EXCEPTION_BASE: u32 = 100;

/// supermachine's virtio-mmio slots (crates/runner/src/x86_64/layout.rs):
/// window `n` at `MMIO_BASE + n * MMIO_STRIDE`, on GSI `FIRST_GSI + n`.
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_STRIDE: u64 = 0x1000;
const FIRST_GSI: u32 = 5;
const MAX_SLOTS: usize = hw::MAX_DEVICE_VECTORS;

/// virtio device ids (§5).
const DEVICE_BLOCK: u32 = 2;
const DEVICE_ENTROPY: u32 = 4;

/// virtio-blk (§5.2): feature, request types, statuses.
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const SECTOR: usize = 512;
/// Bytes the entropy request asks for.
const RNG_LEN: usize = 16;

/// `hvm_start_info.magic`.
const PVH_START_MAGIC: u32 = 0x336e_c578;
/// How long one request may take before the guest gives up (watchdog ticks).
const REQUEST_TIMEOUT_TICKS: u32 = 5 * hw::TICK_HZ;
/// TSC cycles to wait for the watchdog's first ticks (a few seconds at any clock).
const TIMER_PROBE_CYCLES: u64 = 10_000_000_000;

/// The byte the guest writes at `i` of sector 1; the host test checks the file
/// for exactly this pattern.
fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(3) ^ 0xa5
}

/// Device interrupts taken, in total and per slot with a used-buffer reason.
static IRQS: AtomicU32 = AtomicU32::new(0);
static USED_IRQS: [AtomicU32; MAX_SLOTS] = [const { AtomicU32::new(0) }; MAX_SLOTS];
/// Device interrupts whose InterruptStatus had no used-buffer bit.
static OTHER_IRQS: AtomicU32 = AtomicU32::new(0);

/// Queue memory, one page per slot, and the request buffers.
static RINGS: Shared<[Ring; MAX_SLOTS]> = Shared::new([Ring::ZERO; MAX_SLOTS]);

#[repr(C, align(4096))]
struct Buffers {
    data: [u8; SECTOR],
    header: [u8; 16],
    status: u8,
}
static BUFFERS: Shared<Buffers> = Shared::new(Buffers {
    data: [0; SECTOR],
    header: [0; 16],
    status: 0,
});

fn slot_transport(slot: usize) -> Transport {
    Transport {
        base: MMIO_BASE + slot as u64 * MMIO_STRIDE,
    }
}

/// The device half of the interrupt handler: InterruptStatus, InterruptACK
/// (virtio 1.2 §4.2.3.3); hw::isr sends the LAPIC EOI.
fn device_interrupt(slot: usize) {
    let status = slot_transport(slot).ack_interrupt();
    IRQS.fetch_add(1, Ordering::Relaxed);
    if status & virtio::INT_USED_BUFFER != 0 {
        if let Some(c) = USED_IRQS.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        OTHER_IRQS.fetch_add(1, Ordering::Relaxed);
    }
}

fn fail(code: u32, what: core::fmt::Arguments<'_>) -> ! {
    println!("FAIL({code}): {what}");
    hw::power_off(code)
}

/// Submits `bufs` on `slot`'s queue, sleeps until the device's used-buffer
/// interrupt (bounded by the watchdog), and returns the used length.
fn request(slot: usize, q: &mut Queue, bufs: &[Buf], step: u32) -> u32 {
    let t = slot_transport(slot);
    let before = USED_IRQS[slot].load(Ordering::Relaxed);
    let head = q.submit(&t, bufs);
    let deadline = hw::TICKS
        .load(Ordering::Relaxed)
        .wrapping_add(REQUEST_TIMEOUT_TICKS);
    while USED_IRQS[slot].load(Ordering::Relaxed) == before {
        if hw::TICKS.load(Ordering::Relaxed).wrapping_sub(deadline) < u32::MAX / 2 {
            fail(
                step,
                format_args!("slot {slot}: no interrupt within {REQUEST_TIMEOUT_TICKS} ticks"),
            );
        }
        hw::wait_for_interrupt();
    }
    match q.completion(head) {
        Completion::Done { len } => len,
        Completion::Pending => fail(
            step + 1,
            format_args!("slot {slot}: interrupt but the used ring did not advance"),
        ),
        Completion::Malformed { used_idx, id } => fail(
            step + 1,
            format_args!("slot {slot}: used ring idx {used_idx} id {id} is not our one request"),
        ),
    }
}

/// One virtio-blk request on sector `sector`: header, 512 data bytes (device-
/// writable for IN), status byte (§5.2.6). Returns (used length, status byte).
fn blk_request(slot: usize, q: &mut Queue, kind: u32, sector: u64, step: u32) -> (u32, u8) {
    let b = BUFFERS.get();
    // SAFETY: no request is in flight, so the device does not touch the buffers.
    unsafe {
        let header = &mut (*b).header;
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[4..8].copy_from_slice(&0u32.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        // A value no device writes, so an untouched status byte is seen.
        core::ptr::addr_of_mut!((*b).status).write_volatile(0xff);
    }
    let addr = |p: *const u8| p as u64;
    // SAFETY: only addresses are taken.
    let (header, data, status) = unsafe {
        (
            addr(core::ptr::addr_of!((*b).header).cast()),
            addr(core::ptr::addr_of!((*b).data).cast()),
            addr(core::ptr::addr_of!((*b).status)),
        )
    };
    let bufs = [
        Buf {
            addr: header,
            len: 16,
            writable: false,
        },
        Buf {
            addr: data,
            len: SECTOR as u32,
            writable: kind == VIRTIO_BLK_T_IN,
        },
        Buf {
            addr: status,
            len: 1,
            writable: true,
        },
    ];
    let len = request(slot, q, &bufs, step);
    // SAFETY: the device is done with the request (it is on the used ring).
    let st = unsafe { core::ptr::addr_of!((*b).status).read_volatile() };
    (len, st)
}

fn capacity(t: &Transport) -> u64 {
    // virtio_blk_config.capacity, le64 at config offset 0 (§5.2.4), read as two
    // 32-bit words, retried while the config generation moves (§4.2.2.2).
    for _ in 0..10 {
        let gen = t.read(virtio::reg::CONFIG_GENERATION);
        let lo = t.read(virtio::reg::CONFIG);
        let hi = t.read(virtio::reg::CONFIG + 4);
        if t.read(virtio::reg::CONFIG_GENERATION) == gen {
            return (u64::from(hi) << 32) | u64::from(lo);
        }
    }
    0
}

/// Drives one block device; returns the number of requests made.
fn drive_block(slot: usize, ring: *mut Ring) -> (u32, bool) {
    let t = slot_transport(slot);
    // Tell the roles apart before init: the RO bit is in the offered features.
    let ro = t.device_features() & VIRTIO_BLK_F_RO != 0;
    let init_step = if ro {
        EXIT_RO_DISK_INIT
    } else {
        EXIT_RW_DISK_INIT
    };
    let features = match virtio::init(&t, ring) {
        Ok(f) => f,
        Err(e) => fail(
            init_step + e.code(),
            format_args!("slot {slot}: block device init failed: {e:?}"),
        ),
    };
    let cap = capacity(&t);
    println!(
        "slot {slot}: features {features:#x} ro {} capacity {cap} sectors",
        u8::from(ro)
    );
    if cap < 2 {
        fail(
            EXIT_CAPACITY,
            format_args!("slot {slot}: capacity {cap} below 2 sectors"),
        );
    }
    let mut q = Queue::new(ring);
    if ro {
        let (len, st) = blk_request(slot, &mut q, VIRTIO_BLK_T_OUT, 1, EXIT_RO_WRITE);
        println!("slot {slot}: write sector 1 on read-only disk status {st} len {len}");
        if len != 1 {
            fail(EXIT_RO_WRITE + 2, format_args!("used length {len}, want 1"));
        }
        if st != VIRTIO_BLK_S_IOERR {
            fail(
                EXIT_RO_WRITE + 3,
                format_args!("status {st}, want IOERR (1)"),
            );
        }
        return (1, false);
    }

    let (len, st) = blk_request(slot, &mut q, VIRTIO_BLK_T_IN, 0, EXIT_READ);
    let mut hex = [0u8; 32];
    // SAFETY: the read completed; the device no longer writes the data buffer.
    let data = unsafe { &(*BUFFERS.get()).data };
    for (i, b) in data.iter().take(16).enumerate() {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        hex[2 * i] = DIGITS[usize::from(b >> 4)];
        hex[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    let hex = core::str::from_utf8(&hex).unwrap_or("?");
    println!("slot {slot}: read sector 0 status {st} len {len} data {hex}");
    if len != SECTOR as u32 + 1 {
        fail(EXIT_READ + 2, format_args!("used length {len}, want 513"));
    }
    if st != VIRTIO_BLK_S_OK {
        fail(EXIT_READ + 3, format_args!("status {st}, want OK (0)"));
    }

    // SAFETY: no request in flight.
    let data = unsafe { &mut (*BUFFERS.get()).data };
    for (i, b) in data.iter_mut().enumerate() {
        *b = pattern(i);
    }
    let (len, st) = blk_request(slot, &mut q, VIRTIO_BLK_T_OUT, 1, EXIT_WRITE);
    println!("slot {slot}: write sector 1 status {st} len {len}");
    if len != 1 {
        fail(EXIT_WRITE + 2, format_args!("used length {len}, want 1"));
    }
    if st != VIRTIO_BLK_S_OK {
        fail(EXIT_WRITE + 3, format_args!("status {st}, want OK (0)"));
    }
    (2, true)
}

/// One entropy request of [`RNG_LEN`] bytes (§5.4.6).
fn drive_entropy(slot: usize, ring: *mut Ring) -> u32 {
    let t = slot_transport(slot);
    if let Err(e) = virtio::init(&t, ring) {
        fail(
            EXIT_RNG_INIT + e.code(),
            format_args!("slot {slot}: entropy device init failed: {e:?}"),
        );
    }
    let mut q = Queue::new(ring);
    let data = BUFFERS.get();
    // SAFETY: only the address is taken.
    let addr = unsafe { core::ptr::addr_of!((*data).data) } as u64;
    let bufs = [Buf {
        addr,
        len: RNG_LEN as u32,
        writable: true,
    }];
    let len = request(slot, &mut q, &bufs, EXIT_RNG);
    println!("slot {slot}: entropy {len} bytes");
    if len as usize != RNG_LEN {
        fail(
            EXIT_RNG + 2,
            format_args!("used length {len}, want {RNG_LEN}"),
        );
    }
    1
}

/// Waits (interrupts on, bounded by the TSC) until the watchdog has ticked twice.
fn probe_timer() {
    let start = hw::rdtsc();
    let first = hw::TICKS.load(Ordering::Relaxed);
    while hw::TICKS.load(Ordering::Relaxed).wrapping_sub(first) < 2 {
        if hw::rdtsc().wrapping_sub(start) > TIMER_PROBE_CYCLES {
            fail(EXIT_TIMER_DEAD, format_args!("LAPIC timer never ticked"));
        }
        // SAFETY: a window for the pending timer interrupt; the IDT is live.
        unsafe { core::arch::asm!("sti; pause; cli", options(nostack)) }
    }
}

#[no_mangle]
extern "C" fn rust_main(start_info: u32) -> ! {
    // SAFETY: the PVH loader put `hvm_start_info` at %ebx, in identity-mapped RAM.
    let magic = unsafe { hw::mmio_read32(u64::from(start_info)) };
    println!("virtio-driver: start_info {start_info:#x} magic {magic:#x}");
    if magic != PVH_START_MAGIC {
        fail(EXIT_START_INFO, format_args!("bad PVH start_info magic"));
    }

    hw::cli();
    hw::install_idt();
    // SAFETY: interrupts are masked; nothing reads the handler yet.
    unsafe { *hw::DEVICE_HANDLER.get() = Some(device_interrupt) };
    hw::mask_pic();
    let apic_id = hw::enable_lapic();
    let pins = hw::ioapic_pins();
    println!("apic id {apic_id}, ioapic pins {pins}");
    probe_timer();

    // Discovery (§4.2.3.1.1): magic, version, device id per window.
    let mut ids = [0u32; MAX_SLOTS];
    let mut found = 0;
    for (slot, id) in ids.iter_mut().enumerate() {
        let t = slot_transport(slot);
        let gsi = FIRST_GSI + slot as u32;
        if t.read(virtio::reg::MAGIC_VALUE) != virtio::MAGIC {
            println!("slot {slot} at {:#x}: no device", t.base);
            break;
        }
        let version = t.read(virtio::reg::VERSION);
        *id = t.read(virtio::reg::DEVICE_ID);
        let vendor = t.read(virtio::reg::VENDOR_ID);
        let name = match *id {
            DEVICE_BLOCK => "block",
            DEVICE_ENTROPY => "entropy",
            0 => "placeholder",
            _ => "other",
        };
        println!(
            "slot {slot} at {:#x} gsi {gsi}: virtio-mmio version {version} device {} ({name}) vendor {vendor:#x}",
            t.base, *id
        );
        if version != 2 {
            fail(
                EXIT_BAD_VERSION,
                format_args!("slot {slot}: version {version}"),
            );
        }
        if gsi >= pins {
            fail(EXIT_IOAPIC, format_args!("no IOAPIC pin for GSI {gsi}"));
        }
        let vector = hw::DEVICE_VECTOR_BASE + slot as u8;
        hw::route_gsi(gsi, vector, apic_id);
        if hw::gsi_route(gsi) & 0x1_ffff != u32::from(vector) {
            fail(
                EXIT_IOAPIC,
                format_args!("IOAPIC pin {gsi} route did not stick"),
            );
        }
        found += 1;
    }
    if found == 0 {
        fail(EXIT_NO_DEVICES, format_args!("no virtio-mmio device"));
    }

    let mut requests = 0;
    let mut rw_disks = 0;
    // SAFETY: only element addresses are taken; each ring belongs to one slot.
    let ring = |slot: usize| unsafe { core::ptr::addr_of_mut!((*RINGS.get())[slot]) };
    for (slot, &id) in ids.iter().enumerate().take(found) {
        match id {
            DEVICE_BLOCK => {
                let (n, rw) = drive_block(slot, ring(slot));
                requests += n;
                rw_disks += u32::from(rw);
            }
            DEVICE_ENTROPY => requests += drive_entropy(slot, ring(slot)),
            _ => {}
        }
    }
    if rw_disks == 0 {
        fail(EXIT_NO_RW_DISK, format_args!("no writable block device"));
    }

    let irqs = IRQS.load(Ordering::Relaxed);
    println!(
        "irqs={irqs} requests={requests} other={} unexpected={} spurious={} ticks={}",
        OTHER_IRQS.load(Ordering::Relaxed),
        hw::UNEXPECTED.load(Ordering::Relaxed),
        hw::SPURIOUS.load(Ordering::Relaxed),
        hw::TICKS.load(Ordering::Relaxed),
    );
    if hw::UNEXPECTED.load(Ordering::Relaxed) != 0 {
        fail(
            EXIT_UNEXPECTED_IRQ,
            format_args!(
                "interrupt on unrouted vector {}",
                hw::LAST_UNEXPECTED.load(Ordering::Relaxed)
            ),
        );
    }
    if irqs != requests {
        fail(
            EXIT_IRQ_COUNT,
            format_args!("{irqs} device interrupts for {requests} requests"),
        );
    }
    println!("virtio-driver: all checks passed");
    hw::power_off(0)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("FAIL({EXIT_PANIC}): panic: {info}");
    hw::power_off(EXIT_PANIC)
}

// PVH note, 32-bit entry, long-mode switch, and the interrupt stubs.
core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %esi             /* hvm_start_info, kept for rust_main */

    /* Zero .bss: page tables, stack, rings (the loader copies file bytes only). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories. */
    movl $boot_pdpt, %eax
    orl $3, %eax
    movl %eax, boot_pml4
    xorl %ecx, %ecx
.Lpdpt:
    movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb .Lpdpt

    /* 2048 2 MiB pages (PS|RW|P) identity-map 4 GiB; from 3 GiB (the MMIO hole,
       IOAPIC, LAPIC) also PCD|PWT. */
    xorl %ecx, %ecx
.Lpd:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    cmpl $1536, %ecx
    jb .Lcached
    orl $0x18, %eax
.Lcached:
    movl %eax, boot_pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb .Lpd

    /* Long mode (SDM vol. 3 §9.8.5): CR3, CR4.PAE, EFER.LME, CR0.PG. */
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl %esi, %edi
    call {main}
.Lhang:
    cli
    hlt
    jmp .Lhang

    /* Common interrupt path: save the caller-saved registers, call
       hw::isr(vector, frame) on a 16-byte aligned stack, restore, iretq. */
    .section .text.isr, "ax"
    .p2align 4
isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbp
    movq %rsp, %rbp
    movq 80(%rsp), %rdi
    leaq 88(%rsp), %rsi
    andq $-16, %rsp
    cld
    call {isr}
    movq %rbp, %rsp
    popq %rbp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp
    iretq

    /* One stub per vector pushes its number; isr_table lists their addresses. */
    .section .rodata.isr_table, "a"
    .p2align 3
    .global isr_table
isr_table:
    .section .text.isr, "ax"
    .set vec, 0
    .rept 256
    .p2align 4
0:
    pushq $vec
    jmp isr_common
    .pushsection .rodata.isr_table, "a"
    .quad 0b
    .popsection
    .set vec, vec + 1
    .endr

    .section .rodata.boot, "a"
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .p2align 12
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
boot_stack:
    .skip 64 * 1024
boot_stack_top:
"#,
    main = sym rust_main,
    isr = sym hw::isr,
    options(att_syntax)
);
