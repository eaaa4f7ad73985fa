//! The state a [`super::Vmm`] saves and is restored from: plain serializable
//! structs (no backend type crosses the hypervisor seam). Guest RAM travels in
//! the snapshot file beside it (`super::snapshot`).

use devices::virtio::block::{Block, BlockState};
use devices::virtio::mmio::{MmioTransport, MmioTransportState};
use devices::virtio::net::{Net, NetState};
use devices::virtio::vsock::{Vsock, VsockState};
use hypervisor::{VcpuState, VmState};
use serde::{Deserialize, Serialize};

/// Everything of a paused VM but its RAM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmmState {
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, timers and clock.
    pub vm: VmState,
    /// Every device.
    pub devices: DeviceStates,
}

/// The devices' state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The console UART.
    pub serial: devices::serial::SerialState,
    /// The i8042 (x86 only).
    pub i8042: Option<devices::i8042::I8042State>,
    /// The power block.
    pub power: devices::power::PowerState,
    /// The virtio devices, in guest discovery order.
    pub virtio: Vec<VirtioState>,
}

/// One virtio-mmio device: its transport and the device behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// Registers and queues.
    pub transport: MmioTransportState,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

/// The state of the device behind a virtio-mmio transport, by kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// A disk (the image is reopened from the resources).
    Block(BlockState),
    /// The vsock device (its host sockets are made anew; the guest gets a
    /// transport reset).
    Vsock(VsockState),
    /// The network device (its backend is started anew).
    Net(NetState),
    /// The entropy device, which keeps no state of its own.
    Rng,
}

impl VirtioDeviceState {
    /// The kind's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block(_) => "block",
            Self::Vsock(_) => "vsock",
            Self::Net(_) => "net",
            Self::Rng => "rng",
        }
    }
}

/// Saves one attached virtio device.
pub(crate) fn save_virtio(t: &MmioTransport) -> VirtioState {
    let device = if let Some(b) = t.device::<Block>() {
        VirtioDeviceState::Block(b.state())
    } else if let Some(v) = t.device::<Vsock>() {
        VirtioDeviceState::Vsock(v.state())
    } else if let Some(n) = t.device::<Net>() {
        VirtioDeviceState::Net(n.state())
    } else {
        VirtioDeviceState::Rng
    };
    VirtioState {
        transport: t.state(),
        device,
    }
}
