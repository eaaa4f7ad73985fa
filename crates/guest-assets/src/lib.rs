//! What a supermachine guest boots from, obtained and cached on the host: the guest
//! kernel (Debian's cloud kernel, provisioned through the system's package manager,
//! or one the user names), the initramfs (the embedded static `guest-init` plus the
//! kernel modules it loads), the cache directory layout every crate's files live in,
//! and the check that refuses a kernel a PVM host would only emulate.
//!
//! This crate knows nothing of VMs: it never depends on a hypervisor backend, the
//! runner or the image crate; they are handed paths from here.

pub mod cache;
pub mod initramfs;
pub mod kernel;
pub mod pvm;
