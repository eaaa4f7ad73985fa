//! Backend-neutral x86-64 vCPU and VM state.
//!
//! Field names and meanings follow the Intel SDM; nothing here is a KVM type. A
//! backend converts to and from its own structures.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// General-purpose registers, instruction pointer and flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache (SDM vol. 3 §3.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Descriptor type: code/data (true) or system (false).
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity: limit in 4 KiB units.
    pub g: bool,
    pub avl: bool,
    /// The register holds no usable segment.
    pub unusable: bool,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and system registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// Where a vCPU starts at boot. The backend also gives the vCPU the FPU, MSR and
/// local-APIC defaults a freshly reset CPU has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootState {
    /// General-purpose registers (entry point, boot-protocol arguments).
    pub regs: Regs,
    /// Mode, paging and segment state.
    pub sregs: Sregs,
}

/// Interrupt/exception state that is in flight (pending or injected events).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Events {
    pub exception_injected: bool,
    pub exception_nr: u8,
    pub exception_has_error_code: bool,
    pub exception_error_code: u32,
    pub interrupt_injected: bool,
    pub interrupt_nr: u8,
    pub interrupt_soft: bool,
    pub interrupt_shadow: u8,
    pub nmi_injected: bool,
    pub nmi_pending: bool,
    pub nmi_masked: bool,
    pub sipi_vector: u32,
    pub smi_pending: bool,
    pub smm: bool,
}

/// A vCPU's run state (SDM: wait-for-SIPI, halted, running).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MpState {
    /// Executing.
    #[default]
    Runnable,
    /// An application processor waiting for INIT/SIPI.
    Uninitialized,
    /// Received INIT, waiting for SIPI.
    InitReceived,
    /// Executed HLT.
    Halted,
    /// Received SIPI.
    SipiReceived,
}

/// One CPUID leaf as the vCPU reports it (SDM vol. 2A, CPUID): the values of
/// EAX..EDX for `function` (EAX on input) and, where `index_significant`,
/// `index` (ECX on input).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// The leaf has subleaves, told apart by `index`.
    pub index_significant: bool,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The whole state of one x86-64 vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPU model the guest saw (every leaf of its CPUID): a restored vCPU
    /// must report what the guest's kernel read at boot, and MSRs are accepted
    /// or refused by what CPUID says the CPU has.
    pub cpuid: Vec<CpuidEntry>,
    /// General-purpose registers.
    pub regs: Regs,
    /// Segment and control registers.
    pub sregs: Sregs,
    /// The XSAVE area (legacy FXSAVE region, header and extended components) exactly
    /// as the XSAVE instruction lays it out.
    pub xsave: Vec<u8>,
    /// Extended control registers (XCR0, ...), by index.
    pub xcrs: BTreeMap<u32, u64>,
    /// Model-specific registers, by index.
    pub msrs: BTreeMap<u32, u64>,
    /// Debug registers DR0-DR3, DR6, DR7.
    pub debug_regs: [u64; 6],
    /// The local APIC register page (1 KiB as KVM and the SDM's xAPIC layout give it).
    pub lapic: Vec<u8>,
    /// Run state.
    pub mp_state: MpState,
    /// In-flight events.
    pub events: Events,
    /// Guest TSC frequency in kHz, so a restore on another host can keep it.
    pub tsc_khz: Option<u32>,
}

/// The whole VM-wide x86-64 state: legacy PICs, IOAPIC, PIT and the guest clock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The interrupt controllers and PIT, when the VM has them (an in-kernel
    /// irqchip on KVM).
    pub irqchip: Option<IrqchipState>,
    /// kvmclock / guest clock in nanoseconds.
    pub clock_ns: u64,
}

/// The legacy interrupt controllers and timer of a PC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqchipState {
    /// Master 8259A.
    pub pic_master: PicState,
    /// Slave 8259A.
    pub pic_slave: PicState,
    /// The I/O APIC.
    pub ioapic: IoapicState,
    /// The 8254 PIT.
    pub pit: PitState,
}

/// One 8259A programmable interrupt controller (its registers and the
/// initialization sequence's progress, as the 8259A datasheet names them).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    pub last_irr: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    pub priority_add: u8,
    /// Vector of IRQ 0 (ICW2).
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    /// Which ICW the chip expects next.
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    /// ICW4 expected.
    pub init4: u8,
    /// Edge/level control register.
    pub elcr: u8,
    /// Which ELCR bits are writable.
    pub elcr_mask: u8,
}

/// Redirection-table entries of the I/O APIC (82093AA).
pub const IOAPIC_PINS: usize = 24;

/// The I/O APIC (82093AA datasheet §3.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// Guest-physical base of its registers.
    pub base_address: u64,
    /// The register-select register.
    pub ioregsel: u32,
    /// APIC ID.
    pub id: u32,
    /// Pending level-triggered requests, one bit per pin.
    pub irr: u32,
    /// Each pin's redirection entry, in the datasheet's §3.2.4 bit layout.
    pub redirection: [u64; IOAPIC_PINS],
}

/// One 8254 counter (8254 datasheet: count, latch and mode state).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    /// The count loaded.
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    /// Counter mode 0-5.
    pub mode: u8,
    pub bcd: u8,
    /// The gate input.
    pub gate: u8,
    /// When the count was loaded (host monotonic nanoseconds, KVM's meaning).
    pub count_load_time: i64,
}

/// The 8254 programmable interval timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Counters 0-2.
    pub channels: [PitChannelState; 3],
    /// Backend flags (KVM: HPET legacy mode).
    pub flags: u32,
}
