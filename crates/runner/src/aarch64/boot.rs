//! arm64 Linux boot, the platform-neutral part: reading the kernel `Image` (plain or
//! gzip-compressed), checking its header, deciding where kernel, initramfs and device
//! tree go, and the entry state. Follows Linux `Documentation/arch/arm64/booting.rst`.
//! Compiled and unit-tested on every host; only copying into guest memory
//! (`platform.rs`, linux-loader's PE loader) needs an aarch64 build.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::fdt::{self, FdtConfig, FdtError, GicV3, PsciVersion, Uart, UartKind};
use super::layout;

/// Largest kernel Image accepted, after decompression. Debian's cloud Image is about
/// 30 MiB; the cap stops a hostile gzip stream from filling host memory.
pub const MAX_IMAGE_SIZE: u64 = 256 << 20;
/// arm64 Image header magic "ARM\x64" at offset 56 (booting.rst §4).
const ARM64_IMAGE_MAGIC: u32 = 0x644d_5241;
/// Size of the arm64 Image header.
const IMAGE_HEADER_LEN: usize = 64;
/// text_offset booting.rst tells a loader to assume when `image_size` is 0 (kernels
/// before 3.17).
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
/// PSTATE at entry: EL1h (SPSel = 1, M = 0b0101) with D, A, I and F masked
/// (booting.rst §4: "all forms of interrupts must be masked").
pub const PSTATE_EL1H_DAIF_MASKED: u64 = 0x3c5;
/// Alignment of the initramfs (booting.rst asks nothing; a page keeps it simple).
const INITRD_ALIGN: u64 = 0x1000;

/// Errors preparing an arm64 boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}")]
    ReadKernel {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel is gzip-compressed but the stream is corrupt.
    #[error("cannot decompress kernel {path} (gzip)")]
    Decompress {
        /// The path.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The kernel (after decompression) is larger than [`MAX_IMAGE_SIZE`].
    #[error("kernel {path} is larger than {MAX_IMAGE_SIZE} bytes")]
    KernelTooLarge {
        /// The path.
        path: PathBuf,
    },
    /// The kernel is an EFI zboot image (`CONFIG_EFI_ZBOOT`), which needs EFI firmware.
    #[error(
        "kernel {path} is an EFI zboot image (CONFIG_EFI_ZBOOT): supermachine boots a \
         plain arm64 Image or a gzip'd one, such as Debian's linux-image-cloud-arm64 vmlinuz"
    )]
    EfiZboot {
        /// The path.
        path: PathBuf,
    },
    /// The file is not an arm64 Image.
    #[error("kernel {path} is not an arm64 Linux Image: {reason}")]
    NotArm64Image {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The initramfs could not be opened or read.
    #[error("cannot read initramfs {path}")]
    ReadInitrd {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// More vCPUs than the GIC redistributor region has room for.
    #[error("{vcpus} vCPUs requested; the aarch64 layout supports at most {max}")]
    TooManyVcpus {
        /// Requested.
        vcpus: u32,
        /// Supported.
        max: u32,
    },
    /// Kernel, initramfs and device tree do not fit into guest RAM.
    #[error(
        "guest RAM ({ram} bytes) is too small for the kernel ({kernel} bytes), the initramfs \
         ({initrd} bytes) and the 2 MiB device tree; give the VM more memory"
    )]
    NoRoom {
        /// RAM size.
        ram: u64,
        /// Kernel footprint (image_size).
        kernel: u64,
        /// initramfs size.
        initrd: u64,
    },
    /// The device tree could not be built.
    #[error(transparent)]
    Fdt(#[from] FdtError),
    /// The device tree is larger than the 2 MiB the layout reserves.
    #[error("the device tree is {0} bytes, more than the 2 MiB reserved for it")]
    FdtTooLarge(usize),
    /// linux-loader refused the Image.
    #[error("cannot load the kernel Image")]
    Load(#[source] linux_loader::loader::Error),
    /// Writing to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    WriteMemory {
        /// What was written.
        what: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The fields of the arm64 Image header a loader needs (booting.rst §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset of the image from a 2 MiB-aligned base.
    pub text_offset: u64,
    /// Bytes the kernel occupies once running, including BSS (the file is shorter).
    pub image_size: u64,
    /// Bit 0: big-endian kernel; bits 1-2: page size; bit 3: physical placement.
    pub flags: u64,
}

impl ImageHeader {
    /// Parses and checks the header at the start of `image`.
    pub fn parse(image: &[u8]) -> Result<Self, &'static str> {
        let Some(h) = image.get(..IMAGE_HEADER_LEN) else {
            return Err("shorter than the 64-byte Image header");
        };
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut m = [0u8; 4];
        m.copy_from_slice(&h[56..60]);
        if u32::from_le_bytes(m) != ARM64_IMAGE_MAGIC {
            return Err("no \"ARM\\x64\" magic at offset 56 (an x86 bzImage or another format?)");
        }
        let header = Self {
            text_offset: u64_at(8),
            image_size: u64_at(16),
            flags: u64_at(24),
        };
        if header.flags & 1 != 0 {
            return Err("it is a big-endian kernel");
        }
        if header.text_offset >= layout::KERNEL_ALIGN {
            return Err("text_offset is not below 2 MiB");
        }
        Ok(header)
    }

    /// Where the kernel's first byte goes for a 2 MiB-aligned `base`.
    pub fn load_offset(&self) -> u64 {
        if self.image_size == 0 {
            LEGACY_TEXT_OFFSET
        } else {
            self.text_offset
        }
    }
}

/// Reads a kernel file into memory, decompressing it when it is gzip (`Image.gz`, the
/// form many distributions ship as `vmlinuz`), and checks the Image header.
pub fn read_kernel(path: &Path) -> Result<(Vec<u8>, ImageHeader), BootError> {
    let read_err = |source| BootError::ReadKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut raw = Vec::new();
    File::open(path)
        .map_err(read_err)?
        .take(MAX_IMAGE_SIZE + 1)
        .read_to_end(&mut raw)
        .map_err(read_err)?;
    let image = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .take(MAX_IMAGE_SIZE + 1)
            .read_to_end(&mut out)
            .map_err(|source| BootError::Decompress {
                path: path.to_path_buf(),
                source,
            })?;
        out
    } else {
        raw
    };
    if image.len() as u64 > MAX_IMAGE_SIZE {
        return Err(BootError::KernelTooLarge {
            path: path.to_path_buf(),
        });
    }
    // EFI zboot: a PE/COFF "MZ" stub whose bytes 4..8 are "zimg" (drivers/firmware/efi/
    // libstub/zboot-header.S); it decompresses itself only under EFI boot services.
    if image.starts_with(b"MZ") && image.get(4..8) == Some(b"zimg") {
        return Err(BootError::EfiZboot {
            path: path.to_path_buf(),
        });
    }
    let header = ImageHeader::parse(&image).map_err(|reason| BootError::NotArm64Image {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok((image, header))
}

/// Where everything goes in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// 2 MiB-aligned base the Image is loaded relative to (RAM base).
    pub kernel_base: u64,
    /// Entry point: `kernel_base + text_offset`.
    pub kernel_entry: u64,
    /// One past the kernel's running footprint (image_size or file size, larger).
    pub kernel_end: u64,
    /// initramfs `start..end`, if any.
    pub initrd: Option<(u64, u64)>,
    /// Device tree address (2 MiB aligned, 2 MiB reserved).
    pub fdt: u64,
}

/// Plans kernel, initramfs and device tree for `ram_size` bytes of RAM: the kernel at
/// the start of RAM, the device tree in the last 2 MiB block, the initramfs just below
/// it (booting.rst: anywhere in RAM that the kernel does not overwrite).
pub fn plan(
    ram_size: u64,
    header: &ImageHeader,
    image_len: u64,
    initrd_len: Option<u64>,
) -> Result<Placement, BootError> {
    let footprint = header.image_size.max(image_len);
    let no_room = || BootError::NoRoom {
        ram: ram_size,
        kernel: footprint,
        initrd: initrd_len.unwrap_or(0),
    };
    let kernel_base = layout::RAM_BASE;
    let kernel_entry = kernel_base + header.load_offset();
    let kernel_end = kernel_entry.checked_add(footprint).ok_or_else(no_room)?;
    let fdt = layout::fdt_addr(ram_size).ok_or_else(no_room)?;
    if kernel_end > fdt {
        return Err(no_room());
    }
    let initrd = match initrd_len {
        None | Some(0) => None,
        Some(len) => {
            let start = fdt.checked_sub(len).ok_or_else(no_room)? & !(INITRD_ALIGN - 1);
            if start < kernel_end {
                return Err(no_room());
            }
            Some((start, start + len))
        }
    };
    Ok(Placement {
        kernel_base,
        kernel_entry,
        kernel_end,
        initrd,
        fdt,
    })
}

/// The device tree description of a VM with `vcpus` vCPUs, `ram_size` bytes of RAM,
/// the console UART and `virtio` devices.
pub fn fdt_config(
    vcpus: u32,
    ram_size: u64,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    virtio: Vec<fdt::VirtioMmio>,
) -> FdtConfig {
    FdtConfig {
        memory_base: layout::RAM_BASE,
        memory_size: ram_size,
        cpu_mpidrs: (0..vcpus).map(layout::mpidr).collect(),
        psci: PsciVersion::V1_0,
        gic: GicV3 {
            distributor_base: layout::GIC_DIST_BASE,
            distributor_size: layout::GIC_DIST_SIZE,
            redistributor_base: layout::GIC_REDIST_BASE,
            redistributor_size: u64::from(vcpus) * layout::GIC_REDIST_SIZE_PER_CPU,
        },
        uart: Some(Uart {
            kind: UartKind::Ns16550a,
            base: layout::UART_BASE,
            size: layout::UART_SIZE,
            spi: layout::UART_SPI,
            clock_hz: layout::UART_CLOCK_HZ,
            // devices::serial raises its interrupt as an edge (vm-superio's Trigger),
            // and HVF's line pulses the SPI: a level-high description would let the
            // GIC drop a pulse the CPU has not taken yet.
            edge_triggered: true,
        }),
        virtio,
        cmdline: cmdline.to_string(),
        initrd,
    }
}

/// Builds the DTB and checks it fits the space the layout reserves.
pub fn build_fdt(cfg: &FdtConfig) -> Result<Vec<u8>, BootError> {
    let dtb = fdt::build(cfg)?;
    if dtb.len() as u64 > layout::FDT_MAX_SIZE {
        return Err(BootError::FdtTooLarge(dtb.len()));
    }
    Ok(dtb)
}

/// The boot CPU's entry state: PC at the kernel entry, x0 = device tree, EL1h with
/// interrupts masked (booting.rst §4; the MMU and caches off is the backend's reset
/// state).
pub fn boot_state(p: &Placement) -> hypervisor::aarch64::BootState {
    hypervisor::aarch64::BootState {
        pc: p.kernel_entry,
        x0: p.fdt,
        pstate: PSTATE_EL1H_DAIF_MASKED,
    }
}

/// Checks the vCPU count against the layout.
pub fn check_vcpus(vcpus: u32) -> Result<(), BootError> {
    if vcpus > layout::MAX_VCPUS {
        return Err(BootError::TooManyVcpus {
            vcpus,
            max: layout::MAX_VCPUS,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::io::Write;

    use super::*;

    fn image(text_offset: u64, image_size: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len.max(IMAGE_HEADER_LEN)];
        v[8..16].copy_from_slice(&text_offset.to_le_bytes());
        v[16..24].copy_from_slice(&image_size.to_le_bytes());
        v[24..32].copy_from_slice(&0xau64.to_le_bytes());
        v[56..60].copy_from_slice(&ARM64_IMAGE_MAGIC.to_le_bytes());
        v
    }

    fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sm-a64boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn image_header_valid_is_parsed() {
        let h = ImageHeader::parse(&image(0, 0x1ab_0000, 4096)).unwrap();
        assert_eq!(h.text_offset, 0);
        assert_eq!(h.image_size, 0x1ab_0000);
        assert_eq!(h.load_offset(), 0);
    }

    #[test]
    fn image_header_zero_image_size_uses_legacy_text_offset() {
        let h = ImageHeader::parse(&image(0, 0, 4096)).unwrap();
        assert_eq!(h.load_offset(), 0x8_0000);
    }

    #[test]
    fn image_header_bad_magic_is_refused() {
        let mut v = image(0, 0x1000, 4096);
        v[56] = b'X';
        assert!(ImageHeader::parse(&v).unwrap_err().contains("magic"));
    }

    #[test]
    fn image_header_truncated_is_refused() {
        assert!(ImageHeader::parse(&[0u8; 10]).is_err());
    }

    #[test]
    fn image_header_big_endian_is_refused() {
        let mut v = image(0, 0x1000, 4096);
        v[24] = 1;
        assert!(ImageHeader::parse(&v).unwrap_err().contains("big-endian"));
    }

    #[test]
    fn image_header_huge_text_offset_is_refused() {
        assert!(ImageHeader::parse(&image(0x20_0000, 0x1000, 4096)).is_err());
    }

    #[test]
    fn read_kernel_gzip_is_decompressed() {
        let img = image(0, 0x2000, 8192);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&img).unwrap();
        let p = write_temp("Image.gz", &gz.finish().unwrap());
        let (bytes, h) = read_kernel(&p).unwrap();
        assert_eq!(bytes, img);
        assert_eq!(h.image_size, 0x2000);
    }

    #[test]
    fn read_kernel_plain_image_is_read_as_is() {
        let img = image(0, 0x2000, 8192);
        let p = write_temp("Image", &img);
        assert_eq!(read_kernel(&p).unwrap().0, img);
    }

    #[test]
    fn read_kernel_corrupt_gzip_is_an_error() {
        let p = write_temp("bad.gz", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xde, 0xad]);
        assert!(matches!(read_kernel(&p), Err(BootError::Decompress { .. })));
    }

    #[test]
    fn read_kernel_gzip_bomb_is_refused() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..=(MAX_IMAGE_SIZE >> 20) {
            gz.write_all(&zeros).unwrap();
        }
        let p = write_temp("bomb.gz", &gz.finish().unwrap());
        assert!(matches!(
            read_kernel(&p),
            Err(BootError::KernelTooLarge { .. })
        ));
    }

    #[test]
    fn read_kernel_efi_zboot_is_named() {
        let mut v = vec![0u8; 4096];
        v[..2].copy_from_slice(b"MZ");
        v[4..8].copy_from_slice(b"zimg");
        let p = write_temp("zboot", &v);
        assert!(matches!(read_kernel(&p), Err(BootError::EfiZboot { .. })));
    }

    #[test]
    fn read_kernel_x86_bzimage_is_not_an_arm64_image() {
        let mut v = vec![0u8; 4096];
        v[0x202..0x206].copy_from_slice(b"HdrS");
        let p = write_temp("bzImage", &v);
        assert!(matches!(
            read_kernel(&p),
            Err(BootError::NotArm64Image { .. })
        ));
    }

    #[test]
    fn read_kernel_missing_file_names_it() {
        let e = read_kernel(Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinuz"));
    }

    #[test]
    fn plan_places_kernel_initrd_and_fdt_without_overlap() {
        let h = ImageHeader::parse(&image(0, 0x1ab_0000, 64)).unwrap();
        let p = plan(256 << 20, &h, 0x100_0000, Some(0x80_1234)).unwrap();
        assert_eq!(p.kernel_entry, layout::RAM_BASE);
        assert_eq!(p.kernel_end, layout::RAM_BASE + 0x1ab_0000);
        assert_eq!(p.fdt, layout::RAM_BASE + (254 << 20));
        let (s, e) = p.initrd.unwrap();
        assert_eq!(e - s, 0x80_1234);
        assert_eq!(s % INITRD_ALIGN, 0);
        assert!(s >= p.kernel_end && e <= p.fdt);
    }

    #[test]
    fn plan_file_longer_than_image_size_counts_the_file() {
        let h = ImageHeader::parse(&image(0, 0x1000, 64)).unwrap();
        let p = plan(64 << 20, &h, 0x20_0000, None).unwrap();
        assert_eq!(p.kernel_end, layout::RAM_BASE + 0x20_0000);
        assert_eq!(p.initrd, None);
    }

    #[test]
    fn plan_initrd_too_large_is_no_room() {
        let h = ImageHeader::parse(&image(0, 0x100_0000, 64)).unwrap();
        assert!(matches!(
            plan(32 << 20, &h, 0x100_0000, Some(15 << 20)),
            Err(BootError::NoRoom { .. })
        ));
    }

    #[test]
    fn plan_kernel_larger_than_ram_is_no_room() {
        let h = ImageHeader::parse(&image(0, 0x1000_0000, 64)).unwrap();
        assert!(matches!(
            plan(64 << 20, &h, 64, None),
            Err(BootError::NoRoom { .. })
        ));
    }

    #[test]
    fn boot_state_enters_el1h_masked_with_fdt_in_x0() {
        let h = ImageHeader::parse(&image(0, 0x1000, 64)).unwrap();
        let p = plan(64 << 20, &h, 64, None).unwrap();
        let s = boot_state(&p);
        assert_eq!(s.pc, layout::RAM_BASE);
        assert_eq!(s.x0, p.fdt);
        // M[3:0] = 0b0101 (EL1h), DAIF = 0b1111.
        assert_eq!(s.pstate & 0xf, 0b0101);
        assert_eq!((s.pstate >> 6) & 0xf, 0b1111);
    }

    #[test]
    fn fdt_config_matches_layout_and_builds() {
        let cfg = fdt_config(
            2,
            256 << 20,
            "console=ttyS0",
            Some((0x5000_0000, 0x5010_0000)),
            vec![],
        );
        assert_eq!(cfg.cpu_mpidrs, vec![0x8000_0000, 0x8000_0001]);
        assert_eq!(
            cfg.gic.redistributor_size,
            2 * layout::GIC_REDIST_SIZE_PER_CPU
        );
        let dtb = build_fdt(&cfg).unwrap();
        let parsed = ::fdt::Fdt::new(&dtb).unwrap();
        assert_eq!(
            parsed.memory().regions().next().unwrap().starting_address as u64,
            layout::RAM_BASE
        );
        let uart = parsed.find_node("/serial@9000000").unwrap();
        // Edge rising (1), SPI 1.
        assert_eq!(
            uart.property("interrupts").unwrap().value,
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]
        );
    }

    #[test]
    fn check_vcpus_over_layout_limit_is_refused() {
        assert!(check_vcpus(layout::MAX_VCPUS).is_ok());
        assert!(matches!(
            check_vcpus(layout::MAX_VCPUS + 1),
            Err(BootError::TooManyVcpus { .. })
        ));
    }
}
