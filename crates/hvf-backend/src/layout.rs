//! Where the in-framework GICv3 sits in guest-physical space, and the checks that
//! keep it clear of the devices around it.
//!
//! The framework tells the sizes (`hv_gic_get_distributor_size`,
//! `hv_gic_get_redistributor_region_size` for all the redistributors it may
//! create, `hv_gic_get_redistributor_size` for one); the runner's device tree
//! puts the frames at fixed addresses with the UART right after them. A layout
//! whose frames overlap each other or reach the next device would have the GIC
//! swallow that device's accesses, so it is refused before the GIC exists, and
//! each vCPU's redistributor is checked to be where the device tree says.

use thiserror::Error;

/// The GICv3 frames' addresses; the device tree must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicLayout {
    /// GICD base (64 KiB aligned).
    pub distributor_base: u64,
    /// Base of the redistributor region (one redistributor per vCPU, contiguous).
    pub redistributor_base: u64,
    /// The first address past the GIC's window: the next device's base.
    pub limit: u64,
}

/// The layout used unless the runner says otherwise: QEMU `virt`'s addresses,
/// with the UART at 0x0900_0000 after the redistributors.
pub const DEFAULT_GIC_LAYOUT: GicLayout = GicLayout {
    distributor_base: 0x0800_0000,
    redistributor_base: 0x080a_0000,
    limit: 0x0900_0000,
};

/// The sizes the framework reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicSizes {
    /// The distributor.
    pub distributor: u64,
    /// The whole redistributor region.
    pub redistributor_region: u64,
    /// One vCPU's redistributor.
    pub redistributor: u64,
}

/// A layout the GIC cannot have.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// The distributor runs into the redistributors.
    #[error(
        "the GIC distributor {base:#x}..{end:#x} overlaps the redistributor region at {redist:#x}"
    )]
    DistributorOverlaps {
        /// Its base.
        base: u64,
        /// Its end.
        end: u64,
        /// The redistributor region's base.
        redist: u64,
    },
    /// The redistributor region reaches the next device.
    #[error(
        "the GIC frame {base:#x}..{end:#x} ({size} bytes, as Hypervisor.framework \
         sizes it) reaches the next device at {limit:#x}: move the devices after it"
    )]
    RegionReachesNextDevice {
        /// Its base.
        base: u64,
        /// Its end.
        end: u64,
        /// Its size.
        size: u64,
        /// The next device's base.
        limit: u64,
    },
    /// The region holds fewer redistributors than the VM has vCPUs.
    #[error("the GIC redistributor region holds {fits} redistributors of {size} bytes; the VM has {vcpus} vCPUs")]
    TooManyVcpus {
        /// How many fit.
        fits: u64,
        /// One redistributor's size.
        size: u64,
        /// The VM's vCPUs.
        vcpus: u32,
    },
    /// The framework put a vCPU's redistributor elsewhere than the layout says.
    #[error(
        "vCPU {id}'s GIC redistributor is at {actual:#x}, but the device tree says {expected:#x}"
    )]
    Misplaced {
        /// The vCPU.
        id: u32,
        /// Where the framework has it.
        actual: u64,
        /// Where the layout puts it.
        expected: u64,
    },
}

impl GicLayout {
    /// Checks the layout against the framework's sizes for a VM of `vcpus`.
    pub fn check(&self, sizes: &GicSizes, vcpus: u32) -> Result<(), LayoutError> {
        let dist_end = self.distributor_base.saturating_add(sizes.distributor);
        let end = self
            .redistributor_base
            .saturating_add(sizes.redistributor_region);
        // Two ranges overlap when each starts before the other ends.
        if self.distributor_base < end && self.redistributor_base < dist_end {
            return Err(LayoutError::DistributorOverlaps {
                base: self.distributor_base,
                end: dist_end,
                redist: self.redistributor_base,
            });
        }
        if dist_end > self.limit {
            return Err(LayoutError::RegionReachesNextDevice {
                base: self.distributor_base,
                end: dist_end,
                size: sizes.distributor,
                limit: self.limit,
            });
        }
        if end > self.limit {
            return Err(LayoutError::RegionReachesNextDevice {
                base: self.redistributor_base,
                end,
                size: sizes.redistributor_region,
                limit: self.limit,
            });
        }
        let fits = sizes
            .redistributor_region
            .checked_div(sizes.redistributor)
            .unwrap_or(0);
        if fits < u64::from(vcpus) {
            return Err(LayoutError::TooManyVcpus {
                fits,
                size: sizes.redistributor,
                vcpus,
            });
        }
        Ok(())
    }

    /// Where vCPU `id`'s redistributor is: the region's base plus `id` of them.
    pub fn redistributor_of(&self, sizes: &GicSizes, id: u32) -> u64 {
        self.redistributor_base
            .saturating_add(u64::from(id).saturating_mul(sizes.redistributor))
    }

    /// Checks that the framework placed vCPU `id`'s redistributor at `actual`.
    pub fn check_redistributor(
        &self,
        sizes: &GicSizes,
        id: u32,
        actual: u64,
    ) -> Result<(), LayoutError> {
        let expected = self.redistributor_of(sizes, id);
        if actual == expected {
            Ok(())
        } else {
            Err(LayoutError::Misplaced {
                id,
                actual,
                expected,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plausible framework sizes: a 64 KiB distributor, 128 KiB per
    /// redistributor, room for 64 of them (8 MiB).
    const SIZES: GicSizes = GicSizes {
        distributor: 0x1_0000,
        redistributor_region: 64 * 0x2_0000,
        redistributor: 0x2_0000,
    };

    #[test]
    fn the_default_layout_fits_the_framework_sizes() {
        DEFAULT_GIC_LAYOUT.check(&SIZES, 2).unwrap();
        DEFAULT_GIC_LAYOUT.check(&SIZES, 64).unwrap();
        assert_eq!(DEFAULT_GIC_LAYOUT.redistributor_of(&SIZES, 1), 0x080c_0000);
    }

    #[test]
    fn a_redistributor_region_that_reaches_the_uart_is_refused() {
        // 128 redistributors of 128 KiB = 16 MiB from 0x080a_0000 ends at
        // 0x090a_0000, past the UART at 0x0900_0000.
        let big = GicSizes {
            redistributor_region: 128 * 0x2_0000,
            ..SIZES
        };
        let err = DEFAULT_GIC_LAYOUT.check(&big, 2).unwrap_err();
        assert_eq!(
            err,
            LayoutError::RegionReachesNextDevice {
                base: 0x080a_0000,
                end: 0x090a_0000,
                size: 0x100_0000,
                limit: 0x0900_0000,
            }
        );
        assert!(err
            .to_string()
            .contains("reaches the next device at 0x9000000"));
        // Exactly up to the UART is fine.
        let exact = GicSizes {
            redistributor_region: 0x0900_0000 - 0x080a_0000,
            ..SIZES
        };
        DEFAULT_GIC_LAYOUT.check(&exact, 2).unwrap();
    }

    #[test]
    fn a_distributor_overlapping_the_redistributors_or_too_few_redistributors_are_refused() {
        let cramped = GicLayout {
            redistributor_base: 0x0800_8000,
            ..DEFAULT_GIC_LAYOUT
        };
        assert!(matches!(
            cramped.check(&SIZES, 1),
            Err(LayoutError::DistributorOverlaps { .. })
        ));
        // A distributor above the redistributors, inside their region, or past the
        // next device.
        let inside = GicLayout {
            distributor_base: 0x080c_0000,
            ..DEFAULT_GIC_LAYOUT
        };
        assert!(matches!(
            inside.check(&SIZES, 1),
            Err(LayoutError::DistributorOverlaps { .. })
        ));
        let past = GicLayout {
            distributor_base: 0x08ff_8000,
            ..DEFAULT_GIC_LAYOUT
        };
        assert!(matches!(
            past.check(&SIZES, 1),
            Err(LayoutError::RegionReachesNextDevice {
                base: 0x08ff_8000,
                ..
            })
        ));
        assert_eq!(
            DEFAULT_GIC_LAYOUT.check(&SIZES, 65),
            Err(LayoutError::TooManyVcpus {
                fits: 64,
                size: 0x2_0000,
                vcpus: 65
            })
        );
        let none = GicSizes {
            redistributor: 0,
            ..SIZES
        };
        assert!(matches!(
            DEFAULT_GIC_LAYOUT.check(&none, 1),
            Err(LayoutError::TooManyVcpus { fits: 0, .. })
        ));
    }

    #[test]
    fn each_vcpus_redistributor_is_checked_against_the_layout() {
        DEFAULT_GIC_LAYOUT
            .check_redistributor(&SIZES, 3, 0x080a_0000 + 3 * 0x2_0000)
            .unwrap();
        let err = DEFAULT_GIC_LAYOUT
            .check_redistributor(&SIZES, 1, 0x080a_0000)
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("vCPU 1's GIC redistributor is at 0x80a0000"));
    }
}
