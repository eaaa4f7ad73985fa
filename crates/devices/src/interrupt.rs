//! The interrupt line a device raises.
//!
//! The VMM implements [`Interrupt`] over its backend's interrupt controller input
//! (a KVM irqfd or `KVM_IRQ_LINE`, an HVF GIC SPI, ...); devices only call it.

use std::error::Error as StdError;

/// Raising or lowering an interrupt line failed in the VMM's backend.
#[derive(Debug, thiserror::Error)]
#[error("interrupt line {line}")]
pub struct InterruptError {
    /// Which line (GSI / SPI number) failed, for the message.
    pub line: u32,
    /// The backend's error.
    #[source]
    pub source: Box<dyn StdError + Send + Sync>,
}

impl InterruptError {
    /// Wraps a backend error for line `line`.
    pub fn new(line: u32, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            line,
            source: source.into(),
        }
    }
}

/// An interrupt controller input a device drives.
///
/// Edge-triggered devices (the 16550A on the IOAPIC, virtio-mmio as Linux configures
/// it from ACPI) call [`Interrupt::trigger`]; level-triggered ones call
/// [`Interrupt::set_level`].
pub trait Interrupt: Send + Sync {
    /// Signals one edge.
    fn trigger(&self) -> Result<(), InterruptError>;

    /// Drives a level-triggered line high (`true`) or low (`false`).
    fn set_level(&self, asserted: bool) -> Result<(), InterruptError>;
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::{Interrupt, InterruptError};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Counts edges and records the level, for tests.
    #[derive(Debug, Default)]
    pub struct CountingInterrupt {
        pub edges: AtomicUsize,
        pub level: AtomicBool,
    }

    impl CountingInterrupt {
        pub fn edges(&self) -> usize {
            self.edges.load(Ordering::SeqCst)
        }
    }

    impl Interrupt for CountingInterrupt {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.edges.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn set_level(&self, asserted: bool) -> Result<(), InterruptError> {
            self.level.store(asserted, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Always fails, for error-path tests.
    #[derive(Debug, Default)]
    pub struct FailingInterrupt;

    impl Interrupt for FailingInterrupt {
        fn trigger(&self) -> Result<(), InterruptError> {
            Err(InterruptError::new(4, "backend refused"))
        }

        fn set_level(&self, _asserted: bool) -> Result<(), InterruptError> {
            Err(InterruptError::new(4, "backend refused"))
        }
    }
}
