//! The Linux KVM backend of supermachine's hypervisor seam (x86-64).
//!
//! It implements the [`hypervisor`] traits on `/dev/kvm` through rust-vmm's
//! `kvm-ioctls`: VM creation, guest memory slots, the in-kernel interrupt
//! controllers (PIC, IOAPIC, LAPIC) and PIT, irqfd/ioeventfd, vCPUs with a
//! normalized CPUID, the two-step I/O exits, a signal-based vCPU kicker, and
//! the conversion of KVM's register structures to and from the seam's neutral
//! state types (no `kvm_*` type leaves this crate).
//!
//! This crate must never depend on `devices`, `runner` or any other backend.
//! On hosts other than Linux x86-64 it compiles to an empty crate, so the
//! workspace builds everywhere and the runner picks a backend in one place.
//!
//! Entry point: [`KvmHypervisor::new`] (Linux x86-64 only).

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod x86_64;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub use x86_64::{
    convert, kick_signal, seccomp, KvmHypervisor, KvmIrqLine, KvmKicker, KvmVcpu, KvmVm,
    IDENTITY_MAP_ADDRESS, TSS_ADDRESS,
};
