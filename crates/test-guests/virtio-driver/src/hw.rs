//! The platform pieces the driver needs: port I/O, COM1, the power block, MMIO
//! accessors, the IDT, the local APIC (with its timer as a watchdog) and the
//! IOAPIC. Addresses and ports are supermachine's x86_64 platform
//! (crates/runner/src/x86_64/layout.rs, crates/devices/src/power.rs).

use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

/// COM1 data register.
const COM1: u16 = 0x3f8;
/// supermachine's ACPI sleep control register (FADT `SLEEP_CONTROL_REG`).
const SLEEP_CONTROL: u16 = 0x600;
/// supermachine's exit status register (32-bit).
const EXIT_STATUS: u16 = 0x604;
/// ACPI 6.5 §4.8.3.7: `SLP_TYP` = 5 (the DSDT's `_S5_`) in bits 2-4 and `SLP_EN`
/// (bit 5) power the machine off.
const SLEEP_S5: u8 = (5 << 2) | (1 << 5);

/// Local APIC registers (Intel SDM vol. 3 §11.4.1, table 11-1).
const LAPIC_DEFAULT_BASE: u64 = 0xfee0_0000;
const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_LVT_LINT1: u64 = 0x360;
const LAPIC_LVT_ERROR: u64 = 0x370;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const SVR_APIC_ENABLE: u32 = 1 << 8;

/// IOAPIC (82093AA datasheet §3.0): index and data registers, and the
/// redirection table from register 0x10, two 32-bit registers per pin.
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_REGSEL: u64 = 0x00;
const IOAPIC_WIN: u64 = 0x10;
const IOAPIC_VER: u32 = 0x01;
const IOAPIC_REDTBL: u32 = 0x10;

/// Vector of the LAPIC timer (the watchdog tick).
pub const TIMER_VECTOR: u8 = 0x30;
/// Vector of the virtio device in slot 0; slot `n` uses `DEVICE_VECTOR_BASE + n`.
pub const DEVICE_VECTOR_BASE: u8 = 0x40;
/// The LAPIC spurious-interrupt vector (no EOI for it, SDM §11.9).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Ticks per second of the watchdog timer.
pub const TICK_HZ: u32 = 100;

/// State shared with interrupt handlers or written once during setup. The guest
/// has one vCPU and handlers touch only atomics, so plain cells suffice.
pub struct Shared<T>(UnsafeCell<T>);

// SAFETY: one vCPU; the contents are only reached through raw pointers by code that
// does not run concurrently with itself (setup, or the single request in flight).
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// A cell holding `v`.
    pub const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }

    /// The address of the contents.
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects the compiler must know about; the
    // guest owns the machine, and the ports used are the platform's devices.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// The first serial port, as a `fmt::Write` sink. Bytes go straight to the data
/// register: supermachine's UART never reports a full transmitter.
pub struct Com1;

impl fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(COM1, b);
        }
        Ok(())
    }
}

/// Prints a line on COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::hw::Com1, $($arg)*);
    }};
}

/// Reports `status` through the exit status register and powers off; halts if
/// the power-off write does not end the VM.
pub fn power_off(status: u32) -> ! {
    outl(EXIT_STATUS, status);
    outb(SLEEP_CONTROL, SLEEP_S5);
    loop {
        // SAFETY: masking interrupts and halting touches no memory.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}

/// Reads a 32-bit device register.
///
/// # Safety
/// `addr` must be a 4-byte aligned MMIO register (or RAM) address mapped by the
/// boot page tables.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees a mapped, aligned address; volatile keeps the
    // access a single 32-bit load, as virtio-mmio requires (virtio 1.2 §4.2.2.2).
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit device register.
///
/// # Safety
/// As for [`mmio_read32`].
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU with an APIC; reading it has
    // no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only used to set the APIC global-enable bit in IA32_APIC_BASE, keeping
    // its base address.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack, preserves_flags))
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads a counter; CR4.TSD is clear, so it is allowed at CPL 0 anyway.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Enables interrupts and halts until one arrives. `sti` delays recognition by one
/// instruction (SDM vol. 3 §6.8.3), so an interrupt pending before `sti` wakes
/// the `hlt` instead of being lost.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT, LAPIC and stack are set up before anything waits. Not
    // `nomem`: handlers change memory meanwhile, so this is a compiler barrier.
    unsafe { asm!("sti; hlt; cli", options(nostack)) }
}

/// Masks interrupts.
pub fn cli() {
    // SAFETY: masking interrupts has no memory effects.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

// ---- interrupt bookkeeping -------------------------------------------------

/// Watchdog ticks so far.
pub static TICKS: AtomicU32 = AtomicU32::new(0);
/// Interrupts taken on a vector nothing was routed to.
pub static UNEXPECTED: AtomicU32 = AtomicU32::new(0);
/// The last unexpected vector.
pub static LAST_UNEXPECTED: AtomicU32 = AtomicU32::new(0);
/// Spurious LAPIC interrupts (harmless, counted for the report).
pub static SPURIOUS: AtomicU32 = AtomicU32::new(0);

/// The per-slot device interrupt handler the driver installs: given the slot, it
/// reads and acknowledges the device's interrupt status.
pub static DEVICE_HANDLER: Shared<Option<fn(usize)>> = Shared::new(None);

/// Slots with a device interrupt routed (vectors `DEVICE_VECTOR_BASE ..`).
pub const MAX_DEVICE_VECTORS: usize = 19;

fn lapic_base() -> u64 {
    rdmsr(IA32_APIC_BASE) & 0x000f_ffff_ffff_f000
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page lies in the uncached top GiB of the boot identity map.
    unsafe { mmio_read32(lapic_base() + reg) }
}

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: as for `lapic_read`.
    unsafe { mmio_write32(lapic_base() + reg, value) }
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: the IOAPIC window lies in the uncached top GiB of the identity map;
    // index then data is the IOAPIC's access protocol.
    unsafe {
        mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
        mmio_read32(IOAPIC_BASE + IOAPIC_WIN)
    }
}

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: as for `ioapic_read`.
    unsafe {
        mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
        mmio_write32(IOAPIC_BASE + IOAPIC_WIN, value);
    }
}

/// Rust side of every interrupt and exception (`isr_common` in main.rs).
/// `frame` points at what the CPU pushed (error code first for the exceptions
/// that have one).
pub extern "C" fn isr(vector: u64, frame: *const u64) {
    let vector = vector as u8;
    match vector {
        0..=31 => {
            let has_error = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
            // SAFETY: the CPU pushed at least RIP, CS, RFLAGS (and the error code).
            let (error, rip) = unsafe {
                if has_error {
                    (*frame, *frame.add(1))
                } else {
                    (0, *frame)
                }
            };
            let cr2: u64;
            // SAFETY: reading CR2 has no side effects.
            unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) }
            println!("FAIL: exception {vector} at rip {rip:#x} error {error:#x} cr2 {cr2:#x}");
            power_off(crate::EXIT_EXCEPTION_BASE + u32::from(vector));
        }
        TIMER_VECTOR => {
            TICKS.fetch_add(1, Ordering::Relaxed);
            lapic_write(LAPIC_EOI, 0);
        }
        SPURIOUS_VECTOR => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
        v if v >= DEVICE_VECTOR_BASE
            && usize::from(v - DEVICE_VECTOR_BASE) < MAX_DEVICE_VECTORS =>
        {
            // SAFETY: written once before interrupts are enabled.
            let handler = unsafe { *DEVICE_HANDLER.get() };
            match handler {
                Some(h) => h(usize::from(v - DEVICE_VECTOR_BASE)),
                None => {
                    UNEXPECTED.fetch_add(1, Ordering::Relaxed);
                }
            }
            lapic_write(LAPIC_EOI, 0);
        }
        v => {
            UNEXPECTED.fetch_add(1, Ordering::Relaxed);
            LAST_UNEXPECTED.store(u32::from(v), Ordering::Relaxed);
            lapic_write(LAPIC_EOI, 0);
        }
    }
}

/// One 64-bit IDT gate (SDM vol. 3 §6.14.1).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const NO_GATE: Gate = Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
};

static IDT: Shared<[Gate; 256]> = Shared::new([NO_GATE; 256]);

/// Code segment selector of the boot GDT (main.rs).
const KERNEL_CS: u16 = 0x08;

extern "C" {
    /// 256 entry stubs' addresses, built by main.rs's assembly.
    static isr_table: [u64; 256];
}

/// Installs the IDT: every vector goes through its stub to [`isr`].
pub fn install_idt() {
    // SAFETY: `isr_table` is immutable data emitted by the assembly; the IDT is
    // written before `lidt` with interrupts masked, nothing else references it.
    unsafe {
        let idt = &mut *IDT.get();
        for (gate, &handler) in idt.iter_mut().zip(isr_table.iter()) {
            *gate = Gate {
                offset_low: handler as u16,
                selector: KERNEL_CS,
                ist: 0,
                type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        #[repr(C, packed)]
        struct Idtr {
            limit: u16,
            base: u64,
        }
        let idtr = Idtr {
            limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
            base: IDT.get() as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
}

/// Masks both 8259 PICs (OCW1). KVM's in-kernel PIC sees GSIs below 16 too and,
/// unprogrammed, would deliver a device's line as vector (0 + IRQ) through LINT0.
pub fn mask_pic() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// Enables the local APIC (software enable in the spurious-vector register,
/// SDM §11.4.7), masks LINT0/LINT1/error, accepts every priority, and starts the
/// timer as a periodic watchdog at [`TICK_HZ`]. Returns the APIC id.
pub fn enable_lapic() -> u32 {
    let base = rdmsr(IA32_APIC_BASE);
    if base & APIC_BASE_ENABLE == 0 {
        wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
    }
    if lapic_base() != LAPIC_DEFAULT_BASE {
        println!("note: LAPIC at {:#x}", lapic_base());
    }
    lapic_write(LAPIC_SVR, SVR_APIC_ENABLE | u32::from(SPURIOUS_VECTOR));
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
    lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
    // KVM's APIC bus runs at 1 GHz; divide by 16 (DCR 0b0011) gives 62.5 MHz.
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(
        LAPIC_LVT_TIMER,
        LVT_TIMER_PERIODIC | u32::from(TIMER_VECTOR),
    );
    lapic_write(LAPIC_TIMER_INIT, 62_500_000 / TICK_HZ);
    lapic_read(LAPIC_ID) >> 24
}

/// Number of IOAPIC pins (redirection entries).
pub fn ioapic_pins() -> u32 {
    ((ioapic_read(IOAPIC_VER) >> 16) & 0xff) + 1
}

/// Routes IOAPIC pin `gsi` to `vector` on APIC `dest`: fixed delivery, physical
/// destination, active high, edge triggered, unmasked (82093AA §3.2.4). The high
/// half goes first so the entry is complete when the low write unmasks it.
pub fn route_gsi(gsi: u32, vector: u8, dest: u32) {
    let reg = IOAPIC_REDTBL + 2 * gsi;
    ioapic_write(reg + 1, (dest & 0xff) << 24);
    ioapic_write(reg, u32::from(vector));
}

/// Reads back the low half of pin `gsi`'s redirection entry.
pub fn gsi_route(gsi: u32) -> u32 {
    ioapic_read(IOAPIC_REDTBL + 2 * gsi)
}
