//! Queue notifications through ioeventfd, end to end on `/dev/kvm`: the runner
//! attaches a virtio device and starts its event loop, a tiny guest writes the
//! device's `QueueNotify`, and the device serves the queue although the vCPU
//! never exited for that write. Without a usable `/dev/kvm` the test prints why
//! and returns.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::mmio::{reg, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{status, GuestMemoryMmap};
use devices::Bus;
use hypervisor::x86_64::{BootState as X86BootState, DescriptorTable, Regs, Segment, Sregs};
use hypervisor::{BootState, Hypervisor, MemoryRegion, Vcpu, VcpuExit, Vm, VmConfig};

use common::hypervisor;
use runner::resources::VmResources;
use runner::virtio::{attach, DeviceEvents};
use runner::x86_64::layout::VIRTIO_SLOTS;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const RAM: usize = 0x20_0000;
const GDT: u64 = 0x500;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFER: u64 = 0x4000;
const BUFFER_LEN: u32 = 64;
const CODE: u64 = 0x10_0000;
/// The port the guest writes after its notification, to hand control back.
const DONE_PORT: u16 = 0x10;

fn segment(entry: u64, selector: u16) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: true,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        g: (entry >> 55) & 1 == 1,
        ..Default::default()
    }
}

/// 32-bit protected mode, flat 4 GiB segments (SDM vol. 3 §3.4.5), paging off.
fn protected_mode(mem: &GuestMemoryMmap) -> BootState {
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + i as u64 * 8)).unwrap();
    }
    let data = segment(gdt[2], 0x10);
    BootState::X86_64(X86BootState {
        regs: Regs {
            rip: CODE,
            rflags: 0x2,
            ..Default::default()
        },
        sregs: Sregs {
            cs: segment(gdt[1], 0x08),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: segment(gdt[3], 0x18),
            ldt: Segment {
                unusable: true,
                type_: 0x2,
                present: true,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: GDT,
                limit: 31,
            },
            idt: DescriptorTable { base: 0, limit: 0 },
            cr0: 0x11,
            ..Default::default()
        },
    })
}

/// Plays the driver's setup from the host (virtio 1.2 §3.1.1, §4.2.3): features,
/// queue 0 with one 64-byte device-writable buffer offered, DRIVER_OK.
fn set_up_driver(t: &mut devices::virtio::MmioTransport, mem: &GuestMemoryMmap) {
    let w = |t: &mut devices::virtio::MmioTransport, off: u64, v: u32| {
        devices::BusDevice::write(t, off, &v.to_le_bytes());
    };
    let s = status::ACKNOWLEDGE | status::DRIVER;
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, s);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w(t, reg::STATUS, s | status::FEATURES_OK);
    w(t, reg::QUEUE_SEL, 0);
    w(t, reg::QUEUE_NUM, 16);
    w(t, reg::QUEUE_DESC_LOW, DESC as u32);
    w(t, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
    w(t, reg::QUEUE_DEVICE_LOW, USED as u32);
    w(t, reg::QUEUE_READY, 1);
    w(t, reg::STATUS, s | status::FEATURES_OK | status::DRIVER_OK);
    assert!(t.is_active());
    // Descriptor 0 (virtq_desc: addr, len, flags = VIRTQ_DESC_F_WRITE, next).
    mem.write_obj(BUFFER, GuestAddress(DESC)).unwrap();
    mem.write_obj(BUFFER_LEN, GuestAddress(DESC + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(DESC + 12)).unwrap();
    // virtq_avail: flags 0, idx 1, ring[0] = 0.
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
}

#[test]
fn queue_notify_write_reaches_device_without_vcpu_exit() {
    let Some(hv) = hypervisor() else {
        return;
    };
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap());
    let vm = hv
        .create_vm(&VmConfig {
            vcpus: 1,
            start: hypervisor::VmStart::Boot,
        })
        .unwrap();
    let region = mem.iter().next().unwrap();
    // SAFETY: `mem` is a live mapping that outlives `vm` (dropped explicitly below,
    // before `mem`).
    unsafe {
        vm.map_memory(&MemoryRegion {
            slot: 0,
            guest_addr: 0,
            size: region.len(),
            host_addr: region.as_ptr() as usize,
            read_only: false,
        })
    }
    .unwrap();
    vm.create_irqchip().unwrap();

    // Only the entropy device: one queue.
    let res = VmResources::new("unused-kernel");
    let mut bus = Bus::new();
    let attached = attach(&vm, &mem, &res, &mut bus, &VIRTIO_SLOTS, None).unwrap();
    assert_eq!(attached.len(), 1);
    let events = DeviceEvents::start(&vm, &attached, |e| panic!("device event loop: {e}")).unwrap();
    assert_eq!(events.ioevents(), 1, "one I/O event per queue");
    set_up_driver(&mut attached[0].transport.lock().unwrap(), &mem);

    // mov dword [notify], 0 ; mov dx, DONE_PORT ; out dx, al ; hlt
    let notify = attached[0].placement.base + QUEUE_NOTIFY_OFFSET;
    let mut code = vec![0xc7, 0x05];
    code.extend_from_slice(&u32::try_from(notify).unwrap().to_le_bytes());
    code.extend_from_slice(&0u32.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba]);
    code.extend_from_slice(&DONE_PORT.to_le_bytes());
    code.extend_from_slice(&[0xee, 0xf4]);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_boot_state(&protected_mode(&mem)).unwrap();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::Interrupted => continue,
            VcpuExit::IoOut { port, .. } if port == DONE_PORT => break,
            other => panic!("expected no exit before the done port, got {other:?}"),
        }
    }
    // The device thread serves the queue: the buffer comes back used, filled.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        if used_idx == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the device never served the notified queue"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let used_len: u32 = mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
    assert_eq!(used_len, BUFFER_LEN);

    drop(vcpu);
    drop(events);
    drop(bus);
    drop(attached);
    drop(vm);
    drop(mem);
}
