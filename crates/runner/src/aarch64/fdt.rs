//! The flattened device tree an arm64 Linux guest boots with (Linux
//! `Documentation/arch/arm64/booting.rst`: x0 holds the DTB's guest-physical address).
//!
//! Describes memory, the CPUs (brought up with PSCI over HVC), the GICv3, the
//! architected timer, one UART and every virtio-mmio device, and `/chosen` (command
//! line, initrd, console). Bindings follow the Linux devicetree bindings named at each
//! node. Interrupt specifiers use the GICv3 three-cell form `<type number flags>`
//! (`arm,gic-v3.yaml`): type 0 = SPI (number is INTID - 32), 1 = PPI (INTID - 16).

use thiserror::Error;
use vm_fdt::{FdtWriter, FdtWriterNode};

/// GIC interrupt-specifier type for a shared peripheral interrupt.
const GIC_SPI: u32 = 0;
/// GIC interrupt-specifier type for a private peripheral interrupt.
const GIC_PPI: u32 = 1;
/// Interrupt flag: edge, rising (`include/dt-bindings/interrupt-controller/irq.h`).
const IRQ_TYPE_EDGE_RISING: u32 = 1;
/// Interrupt flag: level, active high.
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// Phandle of the GIC (the root's `interrupt-parent`).
const GIC_PHANDLE: u32 = 1;
/// Phandle of the fixed clock a PL011 needs.
const APB_CLOCK_PHANDLE: u32 = 2;

/// Architected timer PPIs as INTIDs (Arm Base System Architecture, "PPI assignments"):
/// secure physical 29, non-secure physical 30, virtual 27, hypervisor physical 26.
/// Hypervisor.framework reports the same numbers (`HV_GIC_INT_EL1_VIRTUAL_TIMER = 27`,
/// `HV_GIC_INT_EL1_PHYSICAL_TIMER = 30`).
pub const TIMER_INTIDS: [u32; 4] = [29, 30, 27, 26];

/// Errors building the device tree.
#[derive(Debug, Error)]
pub enum FdtError {
    /// The FDT writer refused a node or property.
    #[error("cannot write the device tree")]
    Write(#[from] vm_fdt::Error),
    /// A VM needs at least one vCPU.
    #[error("the device tree needs at least one vCPU")]
    NoCpus,
    /// An MPIDR uses Aff3, which this tree's one-cell CPU `reg` cannot express.
    #[error("vCPU {index} MPIDR {mpidr:#x} uses Aff3, which is not supported")]
    MpidrAff3 {
        /// vCPU index.
        index: usize,
        /// The MPIDR value.
        mpidr: u64,
    },
    /// Guest memory has zero size.
    #[error("guest memory size is zero")]
    NoMemory,
    /// Two devices share a base address (their node names would collide).
    #[error("two devices are at the same address {0:#x}")]
    DuplicateAddress(u64),
    /// An SPI number that the GIC cannot deliver (INTID 32..1019).
    #[error("interrupt SPI {0} is outside the GIC's SPI range 0..987")]
    BadSpi(u32),
    /// The initrd range is empty or reversed.
    #[error("initrd range {start:#x}..{end:#x} is empty or reversed")]
    BadInitrd {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

/// Highest SPI number (INTID 1019 - 32), GICv3 spec §2.2.1.
const MAX_SPI: u32 = 987;

/// PSCI version advertised in the `psci` node's compatible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciVersion {
    /// PSCI 0.2.
    V0_2,
    /// PSCI 1.0 (also lists 0.2, which it is compatible with).
    V1_0,
}

/// GICv3 frames (`arm,gic-v3.yaml`: `reg` = distributor, then redistributor regions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicV3 {
    /// GICD base.
    pub distributor_base: u64,
    /// GICD size (64 KiB).
    pub distributor_size: u64,
    /// First GICR frame.
    pub redistributor_base: u64,
    /// Size of the redistributor region (2 x 64 KiB per vCPU).
    pub redistributor_size: u64,
}

/// Which UART model is at the console address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UartKind {
    /// 16550A-compatible, byte registers (`ns16550a`, 8250.yaml).
    Ns16550a,
    /// Arm PL011 (`arm,pl011`, needs an APB clock).
    Pl011,
}

/// The console UART.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uart {
    /// Model.
    pub kind: UartKind,
    /// MMIO base.
    pub base: u64,
    /// MMIO size.
    pub size: u64,
    /// SPI number (INTID - 32).
    pub spi: u32,
    /// Input clock in Hz (1.8432 MHz for a 16550's classic divisors).
    pub clock_hz: u32,
    /// The interrupt is edge-rising rather than level-high (a device model that pulses
    /// its line needs edge, or the GIC may drop a pulse not yet taken).
    pub edge_triggered: bool,
}

/// One virtio-mmio transport (`virtio,mmio`, virtio-mmio.yaml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmio {
    /// MMIO base.
    pub base: u64,
    /// MMIO size (0x200 is enough for the register block).
    pub size: u64,
    /// SPI number (INTID - 32).
    pub spi: u32,
}

/// Everything the device tree describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdtConfig {
    /// Guest RAM base (guest-physical).
    pub memory_base: u64,
    /// Guest RAM size in bytes.
    pub memory_size: u64,
    /// MPIDR_EL1 of each vCPU, in vCPU index order (as the backend programs them).
    pub cpu_mpidrs: Vec<u64>,
    /// Advertised PSCI version.
    pub psci: PsciVersion,
    /// The interrupt controller.
    pub gic: GicV3,
    /// The console UART, if any.
    pub uart: Option<Uart>,
    /// virtio-mmio devices.
    pub virtio: Vec<VirtioMmio>,
    /// Kernel command line.
    pub cmdline: String,
    /// initrd as guest-physical `start..end`.
    pub initrd: Option<(u64, u64)>,
}

fn begin(fdt: &mut FdtWriter, name: &str) -> Result<FdtWriterNode, FdtError> {
    Ok(fdt.begin_node(name)?)
}

/// Builds the DTB.
pub fn build(cfg: &FdtConfig) -> Result<Vec<u8>, FdtError> {
    validate(cfg)?;
    let mut fdt = FdtWriter::new()?;
    let root = begin(&mut fdt, "")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_string("model", "supermachine")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    write_chosen(&mut fdt, cfg)?;

    let memory = begin(&mut fdt, &format!("memory@{:x}", cfg.memory_base))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[cfg.memory_base, cfg.memory_size])?;
    fdt.end_node(memory)?;

    write_cpus(&mut fdt, &cfg.cpu_mpidrs)?;

    // PSCI binding (psci.yaml): with 0.2+ the function IDs are the standard ones, so
    // no cpu_on/cpu_off properties; the conduit is HVC because the hypervisor, not
    // EL3 firmware, implements it.
    let psci = begin(&mut fdt, "psci")?;
    let compatible = match cfg.psci {
        PsciVersion::V0_2 => vec!["arm,psci-0.2".to_string()],
        PsciVersion::V1_0 => vec!["arm,psci-1.0".to_string(), "arm,psci-0.2".to_string()],
    };
    fdt.property_string_list("compatible", compatible)?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let gic = &cfg.gic;
    let intc = begin(&mut fdt, &format!("intc@{:x}", gic.distributor_base))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    // dtc's interrupt_provider check wants #address-cells on every interrupt
    // controller; 2/2 with an identity `ranges` is the binding's own example and
    // leaves room for an ITS child later.
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_array_u64(
        "reg",
        &[
            gic.distributor_base,
            gic.distributor_size,
            gic.redistributor_base,
            gic.redistributor_size,
        ],
    )?;
    fdt.property_u32("#redistributor-regions", 1)?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.end_node(intc)?;

    // arm,arch_timer.yaml: the four PPIs in the order secure, non-secure, virtual,
    // hypervisor; level-high as for any GICv3 PPI (the CPU-mask bits are GICv2 only).
    let timer = begin(&mut fdt, "timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    let mut cells = Vec::with_capacity(12);
    for intid in TIMER_INTIDS {
        cells.extend_from_slice(&[GIC_PPI, intid - 16, IRQ_TYPE_LEVEL_HIGH]);
    }
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.property_null("always-on")?;
    fdt.end_node(timer)?;

    if let Some(uart) = &cfg.uart {
        write_uart(&mut fdt, uart)?;
    }

    for dev in &cfg.virtio {
        let node = begin(&mut fdt, &format!("virtio_mmio@{:x}", dev.base))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[dev.base, dev.size])?;
        // Edge: the backend's interrupt line pulses the SPI for each notification.
        fdt.property_array_u32("interrupts", &[GIC_SPI, dev.spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    fdt.end_node(root)?;
    Ok(fdt.finish()?)
}

fn validate(cfg: &FdtConfig) -> Result<(), FdtError> {
    if cfg.cpu_mpidrs.is_empty() {
        return Err(FdtError::NoCpus);
    }
    for (index, &mpidr) in cfg.cpu_mpidrs.iter().enumerate() {
        if mpidr & 0xff_0000_0000 != 0 {
            return Err(FdtError::MpidrAff3 { index, mpidr });
        }
    }
    if cfg.memory_size == 0 {
        return Err(FdtError::NoMemory);
    }
    if let Some((start, end)) = cfg.initrd {
        if end <= start {
            return Err(FdtError::BadInitrd { start, end });
        }
    }
    let mut bases: Vec<u64> = cfg.virtio.iter().map(|d| d.base).collect();
    bases.extend(cfg.uart.iter().map(|u| u.base));
    bases.sort_unstable();
    if let Some(w) = bases.windows(2).find(|w| w[0] == w[1]) {
        return Err(FdtError::DuplicateAddress(w[0]));
    }
    let spis = cfg
        .virtio
        .iter()
        .map(|d| d.spi)
        .chain(cfg.uart.map(|u| u.spi));
    for spi in spis {
        if spi > MAX_SPI {
            return Err(FdtError::BadSpi(spi));
        }
    }
    Ok(())
}

fn uart_node_name(uart: &Uart) -> String {
    match uart.kind {
        UartKind::Ns16550a => format!("serial@{:x}", uart.base),
        UartKind::Pl011 => format!("pl011@{:x}", uart.base),
    }
}

fn write_chosen(fdt: &mut FdtWriter, cfg: &FdtConfig) -> Result<(), FdtError> {
    let chosen = begin(fdt, "chosen")?;
    fdt.property_string("bootargs", &cfg.cmdline)?;
    if let Some((start, end)) = cfg.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    if let Some(uart) = &cfg.uart {
        fdt.property_string("stdout-path", &format!("/{}", uart_node_name(uart)))?;
    }
    fdt.end_node(chosen)?;
    Ok(())
}

fn write_cpus(fdt: &mut FdtWriter, mpidrs: &[u64]) -> Result<(), FdtError> {
    // arm/cpus.yaml: with #address-cells = 1, reg is MPIDR_EL1[23:0].
    let cpus = begin(fdt, "cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for &mpidr in mpidrs {
        let reg = (mpidr & 0x00ff_ffff) as u32;
        let cpu = begin(fdt, &format!("cpu@{reg:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u32("reg", reg)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;
    Ok(())
}

fn write_uart(fdt: &mut FdtWriter, uart: &Uart) -> Result<(), FdtError> {
    if uart.kind == UartKind::Pl011 {
        // arm,primecell.yaml requires an APB clock: a fixed clock is all a VM needs.
        let clk = begin(fdt, "apb-pclk")?;
        fdt.property_string("compatible", "fixed-clock")?;
        fdt.property_u32("#clock-cells", 0)?;
        fdt.property_u32("clock-frequency", uart.clock_hz)?;
        fdt.property_string("clock-output-names", "clk24mhz")?;
        fdt.property_phandle(APB_CLOCK_PHANDLE)?;
        fdt.end_node(clk)?;
    }
    let node = begin(fdt, &uart_node_name(uart))?;
    match uart.kind {
        UartKind::Ns16550a => {
            fdt.property_string("compatible", "ns16550a")?;
            fdt.property_u32("clock-frequency", uart.clock_hz)?;
        }
        UartKind::Pl011 => {
            fdt.property_string_list(
                "compatible",
                vec!["arm,pl011".to_string(), "arm,primecell".to_string()],
            )?;
            fdt.property_array_u32("clocks", &[APB_CLOCK_PHANDLE, APB_CLOCK_PHANDLE])?;
            fdt.property_string_list(
                "clock-names",
                vec!["uartclk".to_string(), "apb_pclk".to_string()],
            )?;
        }
    }
    fdt.property_array_u64("reg", &[uart.base, uart.size])?;
    let flags = if uart.edge_triggered {
        IRQ_TYPE_EDGE_RISING
    } else {
        IRQ_TYPE_LEVEL_HIGH
    };
    fdt.property_array_u32("interrupts", &[GIC_SPI, uart.spi, flags])?;
    fdt.end_node(node)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use fdt::Fdt;

    fn sample() -> FdtConfig {
        FdtConfig {
            memory_base: 0x8000_0000,
            memory_size: 256 << 20,
            cpu_mpidrs: vec![0x8000_0000, 0x8000_0001],
            psci: PsciVersion::V1_0,
            gic: GicV3 {
                distributor_base: 0x0800_0000,
                distributor_size: 0x1_0000,
                redistributor_base: 0x080a_0000,
                redistributor_size: 2 * 0x2_0000,
            },
            uart: Some(Uart {
                kind: UartKind::Ns16550a,
                base: 0x0900_0000,
                size: 0x1000,
                spi: 1,
                clock_hz: 1_843_200,
                edge_triggered: false,
            }),
            virtio: vec![
                VirtioMmio {
                    base: 0x0a00_0000,
                    size: 0x200,
                    spi: 16,
                },
                VirtioMmio {
                    base: 0x0a00_0200,
                    size: 0x200,
                    spi: 17,
                },
            ],
            cmdline: "console=ttyS0 panic=-1".into(),
            initrd: Some((0x8800_0000, 0x8810_0000)),
        }
    }

    fn be32s(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn be64s(bytes: &[u8]) -> Vec<u64> {
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn prop<'a>(fdt: &'a Fdt<'a>, path: &str, name: &str) -> &'a [u8] {
        fdt.find_node(path)
            .unwrap_or_else(|| panic!("node {path} missing"))
            .property(name)
            .unwrap_or_else(|| panic!("{path}:{name} missing"))
            .value
    }

    fn str_list(bytes: &[u8]) -> Vec<&str> {
        bytes
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| std::str::from_utf8(s).unwrap())
            .collect()
    }

    #[test]
    fn build_root_and_memory_parse_back() {
        let blob = build(&sample()).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(
            str_list(prop(&fdt, "/", "compatible")),
            ["linux,dummy-virt"]
        );
        assert_eq!(be32s(prop(&fdt, "/", "interrupt-parent")), [GIC_PHANDLE]);
        let mem = fdt.find_node("/memory@80000000").unwrap();
        assert_eq!(
            str_list(mem.property("device_type").unwrap().value),
            ["memory"]
        );
        assert_eq!(
            be64s(mem.property("reg").unwrap().value),
            [0x8000_0000, 256 << 20]
        );
    }

    #[test]
    fn build_cpus_use_psci_and_mpidr_reg() {
        let blob = build(&sample()).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        for (i, reg) in [0u32, 1].iter().enumerate() {
            let path = format!("/cpus/cpu@{reg:x}");
            assert_eq!(
                str_list(prop(&fdt, &path, "enable-method")),
                ["psci"],
                "cpu {i}"
            );
            assert_eq!(be32s(prop(&fdt, &path, "reg")), [*reg]);
            assert_eq!(str_list(prop(&fdt, &path, "device_type")), ["cpu"]);
        }
        assert_eq!(fdt.find_node("/cpus").unwrap().children().count(), 2);
    }

    #[test]
    fn build_psci_node_lists_versions_and_hvc() {
        let blob = build(&sample()).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(
            str_list(prop(&fdt, "/psci", "compatible")),
            ["arm,psci-1.0", "arm,psci-0.2"]
        );
        assert_eq!(str_list(prop(&fdt, "/psci", "method")), ["hvc"]);

        let mut v02 = sample();
        v02.psci = PsciVersion::V0_2;
        let blob = build(&v02).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(
            str_list(prop(&fdt, "/psci", "compatible")),
            ["arm,psci-0.2"]
        );
    }

    #[test]
    fn build_gic_has_distributor_and_redistributor_regions() {
        let blob = build(&sample()).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let gic = fdt.find_node("/intc@8000000").unwrap();
        assert_eq!(
            str_list(gic.property("compatible").unwrap().value),
            ["arm,gic-v3"]
        );
        assert!(gic.property("interrupt-controller").is_some());
        assert_eq!(gic.interrupt_cells(), Some(3));
        assert_eq!(
            be64s(gic.property("reg").unwrap().value),
            [0x0800_0000, 0x1_0000, 0x080a_0000, 0x4_0000]
        );
        assert_eq!(be32s(gic.property("phandle").unwrap().value), [GIC_PHANDLE]);
        assert_eq!(fdt.find_phandle(GIC_PHANDLE).unwrap().name, "intc@8000000");
    }

    #[test]
    fn build_timer_has_four_ppis() {
        let blob = build(&sample()).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(
            str_list(prop(&fdt, "/timer", "compatible")),
            ["arm,armv8-timer"]
        );
        assert_eq!(
            be32s(prop(&fdt, "/timer", "interrupts")),
            [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );
    }

    #[test]
    fn build_uart_and_stdout_path_match() {
        let blob = build(&sample()).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let uart = fdt.find_node("/serial@9000000").unwrap();
        assert_eq!(
            str_list(uart.property("compatible").unwrap().value),
            ["ns16550a"]
        );
        assert_eq!(
            be64s(uart.property("reg").unwrap().value),
            [0x0900_0000, 0x1000]
        );
        assert_eq!(be32s(uart.property("interrupts").unwrap().value), [0, 1, 4]);
        assert_eq!(fdt.chosen().stdout().unwrap().name, "serial@9000000");
    }

    #[test]
    fn build_edge_triggered_uart_gets_edge_rising_flags() {
        let mut cfg = sample();
        if let Some(u) = cfg.uart.as_mut() {
            u.edge_triggered = true;
        }
        let blob = build(&cfg).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(
            be32s(prop(&fdt, "/serial@9000000", "interrupts")),
            [0, 1, 1]
        );
    }

    #[test]
    fn build_pl011_gets_clock_node() {
        let mut cfg = sample();
        cfg.uart = Some(Uart {
            kind: UartKind::Pl011,
            base: 0x0900_0000,
            size: 0x1000,
            spi: 1,
            clock_hz: 24_000_000,
            edge_triggered: false,
        });
        let blob = build(&cfg).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(
            str_list(prop(&fdt, "/pl011@9000000", "compatible")),
            ["arm,pl011", "arm,primecell"]
        );
        let clocks = be32s(prop(&fdt, "/pl011@9000000", "clocks"));
        assert_eq!(
            fdt.find_phandle(clocks[0]).unwrap().name,
            "apb-pclk",
            "clock phandle resolves"
        );
    }

    #[test]
    fn build_each_virtio_device_has_reg_and_spi() {
        let blob = build(&sample()).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        for (base, spi) in [(0x0a00_0000u64, 16u32), (0x0a00_0200, 17)] {
            let path = format!("/virtio_mmio@{base:x}");
            assert_eq!(str_list(prop(&fdt, &path, "compatible")), ["virtio,mmio"]);
            assert_eq!(be64s(prop(&fdt, &path, "reg")), [base, 0x200]);
            assert_eq!(be32s(prop(&fdt, &path, "interrupts")), [0, spi, 1]);
        }
    }

    #[test]
    fn build_chosen_has_bootargs_and_initrd() {
        let blob = build(&sample()).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(fdt.chosen().bootargs(), Some("console=ttyS0 panic=-1"));
        assert_eq!(
            be64s(prop(&fdt, "/chosen", "linux,initrd-start")),
            [0x8800_0000]
        );
        assert_eq!(
            be64s(prop(&fdt, "/chosen", "linux,initrd-end")),
            [0x8810_0000]
        );

        let mut no_initrd = sample();
        no_initrd.initrd = None;
        no_initrd.uart = None;
        let blob = build(&no_initrd).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let chosen = fdt.find_node("/chosen").unwrap();
        assert!(chosen.property("linux,initrd-start").is_none());
        assert!(chosen.property("stdout-path").is_none());
    }

    #[test]
    fn build_invalid_configs_are_refused() {
        let mut c = sample();
        c.cpu_mpidrs.clear();
        assert!(matches!(build(&c), Err(FdtError::NoCpus)));

        let mut c = sample();
        c.cpu_mpidrs.push(1 << 32);
        assert!(matches!(
            build(&c),
            Err(FdtError::MpidrAff3 { index: 2, .. })
        ));

        let mut c = sample();
        c.memory_size = 0;
        assert!(matches!(build(&c), Err(FdtError::NoMemory)));

        let mut c = sample();
        c.initrd = Some((0x9000, 0x9000));
        assert!(matches!(build(&c), Err(FdtError::BadInitrd { .. })));

        let mut c = sample();
        c.virtio[1].base = c.virtio[0].base;
        assert!(matches!(
            build(&c),
            Err(FdtError::DuplicateAddress(0x0a00_0000))
        ));

        let mut c = sample();
        c.virtio[0].spi = 988;
        assert!(matches!(build(&c), Err(FdtError::BadSpi(988))));
    }

    #[test]
    fn build_blob_is_accepted_by_dtc() {
        use std::io::Write;
        use std::process::{Command, Stdio};

        let blob = build(&sample()).unwrap();
        let child = Command::new("dtc")
            .args(["-I", "dtb", "-O", "dts", "-o", "-", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping: dtc (device-tree-compiler) is not installed: {e}");
                return;
            }
        };
        child.stdin.take().unwrap().write_all(&blob).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dtc refused the blob: {stderr}");
        assert!(!stderr.contains("ERROR"), "dtc reported: {stderr}");
        assert!(stderr.is_empty(), "dtc warned: {stderr}");
        let dts = String::from_utf8(out.stdout).unwrap();
        assert!(dts.contains("compatible = \"arm,gic-v3\";"), "{dts}");
        assert!(
            dts.contains("bootargs = \"console=ttyS0 panic=-1\";"),
            "{dts}"
        );
    }
}
