//! x86_64 kernel loading and the CPU state a kernel is entered with.
//!
//! Two entry protocols:
//! - Linux 64-bit boot protocol for bzImage (Documentation/arch/x86/boot.rst §"64-bit
//!   boot protocol"): long mode, identity-mapped page tables, `rsi` = `boot_params`.
//! - PVH for ELF images carrying `XEN_ELFNOTE_PHYS32_ENTRY` (xen/arch-x86/hvm/start_info.h):
//!   32-bit protected mode without paging, `ebx` = `hvm_start_info`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use hypervisor::x86_64::{BootState, DescriptorTable, Regs, Segment, Sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::*;

/// Errors loading a kernel or writing boot structures.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}")]
    ReadKernel {
        /// Kernel path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor an ELF with a PVH entry point.
    #[error("{path} is not a bootable x86_64 kernel (expected a bzImage, or an ELF vmlinux with a PVH entry note)")]
    NotAKernel {
        /// Kernel path.
        path: String,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}")]
    Load {
        /// Kernel path.
        path: String,
        /// Loader error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    ReadInitrd {
        /// Initramfs path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit in guest RAM below the kernel's limit.
    #[error("the initramfs ({size} bytes) does not fit in guest memory; give the VM more memory")]
    InitrdTooBig {
        /// Initramfs size.
        size: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing boot structures into guest memory failed (memory too small).
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        /// What was written.
        what: &'static str,
        /// vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Too many memory-map entries.
    #[error("too many memory map entries")]
    MemoryMap,
}

/// What kind of image a kernel file is, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Linux bzImage ("HdrS" at 0x202).
    BzImage,
    /// An ELF executable.
    Elf,
}

/// Identifies a kernel image by its magic numbers.
pub fn detect_format(path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::ReadKernel {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mut head = [0u8; 0x206];
    let n = read_up_to(&mut f, &mut head).map_err(read_err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel {
        path: path.display().to_string(),
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where the kernel was put and how to enter it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Linux 64-bit boot protocol at this address (startup_64).
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
    },
    /// PVH 32-bit entry point.
    Pvh {
        /// 32-bit entry point.
        entry: u64,
    },
}

/// A loaded kernel.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// How to enter it.
    pub entry: Entry,
    /// The bzImage setup header, to copy into `boot_params`.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

impl LoadedKernel {
    /// The highest address the kernel accepts for the initramfs' last byte (boot
    /// protocol 2.03+ `initrd_addr_max`; 0x37ffffff before that). PVH has no limit
    /// below 4 GiB.
    pub fn initrd_addr_max(&self) -> Option<u64> {
        let h = self.setup_header.as_ref()?;
        Some(if h.version >= 0x0203 {
            u64::from(h.initrd_addr_max)
        } else {
            0x37ff_ffff
        })
    }
}

/// Loads a kernel image into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let format = detect_format(path)?;
    let p = || path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::ReadKernel { path: p(), source })?;
    let high = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut f, high)
                .map_err(|source| BootError::Load { path: p(), source })?;
            Ok(LoadedKernel {
                // startup_64 is 0x200 bytes into the protected-mode kernel (boot.rst).
                entry: Entry::Linux64 {
                    entry: r.kernel_load.0 + 0x200,
                },
                setup_header: r.setup_header,
            })
        }
        KernelFormat::Elf => {
            f.seek(SeekFrom::Start(0))
                .map_err(|source| BootError::ReadKernel { path: p(), source })?;
            let r = Elf::load(mem, None, &mut f, high)
                .map_err(|source| BootError::Load { path: p(), source })?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Ok(LoadedKernel {
                    entry: Entry::Pvh { entry: a.0 },
                    setup_header: None,
                }),
                _ => Err(BootError::NotAKernel { path: p() }),
            }
        }
    }
}

/// An initramfs placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Reads the initramfs to the top of low RAM (page aligned), below `max_addr`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    max_addr: u64,
) -> Result<InitrdRegion, BootError> {
    let p = || path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::ReadInitrd { path: p(), source })?;
    let size = f
        .metadata()
        .map_err(|source| BootError::ReadInitrd { path: p(), source })?
        .len();
    let low_end = low_ram_end(mem).min(max_addr);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= HIMEM_START)
        .ok_or(BootError::InitrdTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => {
                BootError::ReadInitrd { path: p(), source }
            }
            other => BootError::GuestWrite {
                what: "initramfs",
                source: other,
            },
        })?;
    Ok(InitrdRegion { addr, size })
}

/// End of the RAM range that starts at 0 (never beyond the MMIO gap).
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    let last = mem.last_addr().0 + 1;
    last.min(MMIO_GAP_START)
}

/// E820 types (ACPI 6.5 §15, "Address Range Types").
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The guest's physical memory map.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let total = mem.iter().map(|r| r.len()).sum::<u64>();
    for (start, len) in super::layout::ram_ranges(total) {
        if start == 0 {
            map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

/// Writes the command line, the boot structures the entry protocol needs and the
/// identity-mapped page tables, and returns the boot vCPU's entry state.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<InitrdRegion>,
    rsdp: Option<u64>,
) -> Result<BootState, BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let write = |what, bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| BootError::GuestWrite { what, source })
    };
    write("command line", cmdline.as_bytes(), CMDLINE)?;
    write("command line", &[0], CMDLINE + cmdline.len() as u64)?;
    let map = memory_map(mem);

    match kernel.entry {
        Entry::Linux64 { entry } => {
            let mut params = boot_params::default();
            if let Some(h) = kernel.setup_header {
                params.hdr = h;
            }
            params.hdr.type_of_loader = 0xff; // "undefined" boot loader
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.cmd_line_ptr = CMDLINE as u32;
            params.hdr.cmdline_size = cmdline.len() as u32 + 1;
            params.hdr.kernel_alignment = 0x0100_0000;
            if let Some(i) = initrd {
                params.hdr.ramdisk_image = i.addr as u32;
                params.hdr.ramdisk_size = i.size as u32;
            }
            if let Some(r) = rsdp {
                params.acpi_rsdp_addr = r;
            }
            if map.len() > params.e820_table.len() {
                return Err(BootError::MemoryMap);
            }
            for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
                *slot = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: *type_,
                };
            }
            params.e820_entries = map.len() as u8;
            mem.write_obj(params, GuestAddress(ZERO_PAGE))
                .map_err(|source| BootError::GuestWrite {
                    what: "boot_params",
                    source,
                })?;
            write_gdt(mem, &GDT_64)?;
            write_page_tables(mem)?;
            Ok(long_mode_state(entry))
        }
        Entry::Pvh { entry } => {
            if map.len() > PVH_MEMMAP_MAX {
                return Err(BootError::MemoryMap);
            }
            let mut info = hvm_start_info {
                magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
                version: 1,
                cmdline_paddr: CMDLINE,
                rsdp_paddr: rsdp.unwrap_or(0),
                memmap_paddr: PVH_MEMMAP,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            if let Some(i) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST;
                let module = hvm_modlist_entry {
                    paddr: i.addr,
                    size: i.size,
                    ..Default::default()
                };
                mem.write_obj(module, GuestAddress(PVH_MODLIST))
                    .map_err(|source| BootError::GuestWrite {
                        what: "PVH module list",
                        source,
                    })?;
            }
            for (i, (addr, size, type_)) in map.iter().enumerate() {
                let e = hvm_memmap_table_entry {
                    addr: *addr,
                    size: *size,
                    type_: *type_,
                    reserved: 0,
                };
                mem.write_obj(e, GuestAddress(PVH_MEMMAP + 24 * i as u64))
                    .map_err(|source| BootError::GuestWrite {
                        what: "PVH memory map",
                        source,
                    })?;
            }
            mem.write_obj(info, GuestAddress(PVH_INFO))
                .map_err(|source| BootError::GuestWrite {
                    what: "PVH start info",
                    source,
                })?;
            write_gdt(mem, &GDT_32)?;
            Ok(protected_mode_state(entry))
        }
    }
}

/// GDT entries: null, code, data, TSS (SDM vol. 3 §3.4.5).
const GDT_64: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // 64-bit code, present, DPL 0
    0x00cf_9300_0000_ffff, // data, 4 GiB, writable
    0x008f_8b00_0000_ffff, // busy 32-bit TSS
];
const GDT_32: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff, // 32-bit code, 4 GiB
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64; 4]) -> Result<(), BootError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT + 8 * i as u64))
            .map_err(|source| BootError::GuestWrite {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))
        .map_err(|source| BootError::GuestWrite {
            what: "IDT",
            source,
        })
}

/// Identity-maps the first 4 GiB with 2 MiB pages (PML4 -> PDPT -> 4 PDs).
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|source| BootError::GuestWrite {
                what: "page tables",
                source,
            })
    };
    w(PDPT | 0x3, PML4)?; // present | writable
    for i in 0..4u64 {
        w((PD + i * 0x1000) | 0x3, PDPT + i * 8)?;
    }
    let mut table = vec![0u8; 4 * 512 * 8];
    for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
        // present | writable | page size (2 MiB)
        let entry = ((i as u64) << 21) | 0x83;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&table, GuestAddress(PD))
        .map_err(|source| BootError::GuestWrite {
            what: "page tables",
            source,
        })
}

/// Decodes a GDT entry into a segment register with the given selector.
fn segment_from_gdt(entry: u64, selector: u16) -> Segment {
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = (entry >> 55) & 1 == 1;
    Segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: (entry >> 47) & 1 == 1,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        g,
        avl: (entry >> 52) & 1 == 1,
        unusable: false,
    }
}

fn flat_sregs(gdt: &[u64; 4]) -> Sregs {
    let code = segment_from_gdt(gdt[1], 0x08);
    let data = segment_from_gdt(gdt[2], 0x10);
    Sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: segment_from_gdt(gdt[3], 0x18),
        ldt: Segment {
            unusable: true,
            type_: 0x2,
            present: true,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: BOOT_GDT,
            limit: (gdt.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: BOOT_IDT,
            limit: 7,
        },
        ..Default::default()
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn long_mode_state(entry: u64) -> BootState {
    let mut sregs = flat_sregs(&GDT_64);
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    BootState {
        regs: Regs {
            rip: entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: ZERO_PAGE,
            rflags: 0x2,
            ..Default::default()
        },
        sregs,
    }
}

fn protected_mode_state(entry: u64) -> BootState {
    let mut sregs = flat_sregs(&GDT_32);
    sregs.cr0 = CR0_PE | CR0_ET;
    BootState {
        regs: Regs {
            rip: entry,
            rbx: PVH_INFO,
            rflags: 0x2,
            ..Default::default()
        },
        sregs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_from_gdt_64bit_code_is_long_mode() {
        let s = segment_from_gdt(GDT_64[1], 8);
        assert!(s.l && s.present && s.s && s.g && !s.db);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
    }

    #[test]
    fn segment_from_gdt_32bit_code_is_default_32() {
        let s = segment_from_gdt(GDT_32[1], 8);
        assert!(!s.l && s.db);
    }

    #[test]
    fn memory_map_reserves_ebda_to_1mib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn detect_format_text_file_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("sm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("notakernel");
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(
            detect_format(&p),
            Err(BootError::NotAKernel { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_too_big_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("sm-initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("big");
        std::fs::write(&p, vec![0u8; 3 << 20]).unwrap();
        assert!(matches!(
            load_initrd(&mem, &p, u64::MAX),
            Err(BootError::InitrdTooBig { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn configure_boot_pvh_writes_start_info_and_cmdline() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let k = LoadedKernel {
            entry: Entry::Pvh { entry: 0x10_0000 },
            setup_header: None,
        };
        let st = configure_boot(&mem, &k, "console=ttyS0", None, Some(0xe0000)).unwrap();
        assert_eq!(st.regs.rbx, PVH_INFO);
        assert_eq!(st.regs.rip, 0x10_0000);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }
}
