//! virtio-net (virtio 1.2 §5.1): one receive and one transmit queue, frames
//! carried by a host [`NetBackend`] (passt over a UNIX stream, or a TAP device).
//!
//! Offered features: `VIRTIO_NET_F_MAC` (the guest's MAC comes from the VMM),
//! `VIRTIO_NET_F_STATUS` (link up), `VIRTIO_F_VERSION_1`, indirect descriptors
//! and event index. No checksum or segmentation offloads: every frame crosses
//! the device whole, at most one MTU plus headers, so the backend gets plain
//! Ethernet frames and the 12-byte `virtio_net_hdr` (§5.1.6) is all zeros but
//! for `num_buffers = 1` on receive.
//!
//! Flow control:
//! - transmit: chains are copied out and returned at once; when the backend is
//!   full the one frame it refused waits in the device and the TX queue is left
//!   alone until the backend's fd is writable again;
//! - receive: frames are read from the backend only while the driver has
//!   receive buffers; a frame read without a buffer waits in the device until
//!   the driver adds one (its RX notification).
//!
//! Everything the guest supplies is checked: chains are walked with
//! [`walk_chain`] (bounds, loops, direction), transmit chains shorter than the
//! header or longer than a frame are returned unused, receive chains too small
//! for the frame drop the frame (counted), never write past the buffers.

use std::any::Any;
use std::io;

use virtio_queue::{QueueOwnedT, QueueT};

use super::vsock::packet::{gather, scatter};
use super::{
    device_type, walk_chain, DeviceContext, GuestMemoryMmap, HostFd, VirtioDevice, VirtioError,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

pub mod backend;
pub mod egress;

pub use backend::{NetBackend, StreamBackend, MAX_FRAME_LEN};

/// §5.1.3: the device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// §5.1.3: the configuration space has a link status field.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// §5.1.4: `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Receive queue index (§5.1.2).
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index (§5.1.2).
pub const TX_QUEUE: u16 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr` with VERSION_1 (§5.1.6): always 12 bytes.
pub const NET_HDR_LEN: usize = 12;

/// The event-loop token of the backend fd.
const BACKEND_TOKEN: u32 = 0;

/// Counters, for tests and messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Transmit chains returned unused (malformed, too short, too long).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the backend dropped (no receive chain could hold them).
    pub rx_dropped: u64,
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    backend: Option<Box<dyn NetBackend>>,
    /// A frame the backend refused (`tx_buf[..len]`): sent before any more
    /// transmit chains are taken.
    tx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    /// A frame read from the backend waiting for a receive chain (`rx_buf[..len]`).
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    active: bool,
    stats: NetStats,
    /// The egress policy and the flows it let through ([`egress`]).
    egress: egress::Filter,
    /// Frames the device itself answers the guest with (a denied connection's
    /// RST or ICMP unreachable), delivered before the backend's.
    answers: std::collections::VecDeque<Vec<u8>>,
}

/// Answers waiting for a receive buffer beyond this many are dropped (the
/// guest retries, or times out, as on a lossy link).
const MAX_ANSWERS: usize = 64;

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &format_args!("{}", format_mac(&self.mac)))
            .field(
                "backend",
                &self.backend.as_ref().map(|b| b.name().to_string()),
            )
            .field("stats", &self.stats)
            .finish()
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The saved state of a [`Net`]: what the guest driver knows of the device. The
/// backend is the VMM's to start again; frames in flight are lost, as on a real
/// link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// The guest-visible MAC address.
    pub mac: [u8; 6],
}

impl Net {
    /// The saved state.
    pub fn state(&self) -> NetState {
        NetState { mac: self.mac }
    }

    /// A device restored from `state` over a fresh `backend`.
    pub fn from_state(state: &NetState, backend: Box<dyn NetBackend>) -> Self {
        Self::new(state.mac, backend)
    }

    /// A device with MAC `mac` whose frames go through `backend`.
    pub fn new(mac: [u8; 6], backend: Box<dyn NetBackend>) -> Self {
        Self {
            mac,
            backend: Some(backend),
            tx_pending: None,
            tx_buf: vec![0; NET_HDR_LEN + MAX_FRAME_LEN],
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            active: false,
            stats: NetStats::default(),
            egress: egress::Filter::default(),
            answers: std::collections::VecDeque::new(),
        }
    }

    /// Enforces `policy` on the frames the guest sends from now on: new
    /// flows are judged by it, the ones an earlier policy let through carry
    /// on.
    pub fn set_egress(&mut self, policy: egress::Policy) {
        self.egress.set_policy(policy);
    }

    /// The egress policy in force.
    pub fn egress_policy(&self) -> &egress::Policy {
        self.egress.policy()
    }

    /// The egress filter's counters.
    pub fn egress_stats(&self) -> egress::EgressStats {
        self.egress.stats()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the backend is still usable (it has not failed or closed).
    pub fn backend_alive(&self) -> bool {
        self.backend.is_some()
    }

    /// The backend failed for good: log once and carry no more frames (the
    /// guest sees a silent link, the VM keeps running).
    fn backend_failed(&mut self, e: &io::Error) {
        if let Some(mut b) = self.backend.take() {
            let why = b
                .exit_status()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            tracing::warn!(
                "the guest's network is down: its {} backend stopped: {e}{why}",
                b.name()
            );
        }
        self.tx_pending = None;
        self.rx_pending = None;
    }

    /// Sends the pending frame, if any. `true`: nothing pending any more.
    fn flush_tx_pending(&mut self) -> bool {
        let Some(len) = self.tx_pending else {
            return true;
        };
        let Some(b) = self.backend.as_mut() else {
            self.tx_pending = None;
            return true;
        };
        match b.send(&self.tx_buf[NET_HDR_LEN..NET_HDR_LEN + len]) {
            Ok(true) => {
                self.tx_pending = None;
                self.stats.tx_frames += 1;
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.backend_failed(&e);
                true
            }
        }
    }

    /// Copies a transmit chain's frame into `tx_buf[NET_HDR_LEN..]`; its length,
    /// or `None` if the chain is unusable.
    fn read_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<usize> {
        let buffers = match walk_chain(mem, chain) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "virtio-net TX chain dropped");
                return None;
            }
        };
        // §5.1.6.2: transmit buffers are device-readable only; a writable part
        // is a driver bug, ignored (nothing is written into it).
        let total = super::segments_len(&buffers.readable);
        let frame_len = usize::try_from(total)
            .ok()
            .and_then(|t| t.checked_sub(NET_HDR_LEN))
            .filter(|&l| l > 0 && l <= MAX_FRAME_LEN)?;
        let buf = &mut self.tx_buf[..NET_HDR_LEN + frame_len];
        gather(mem, &buffers.readable, 0, buf).ok()?;
        Some(frame_len)
    }

    /// Drains the transmit queue into the backend until it is empty or the
    /// backend is full.
    fn process_tx(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        if !self.flush_tx_pending() {
            return Ok(());
        }
        let queue_err = |source| VirtioError::Queue {
            index: TX_QUEUE,
            source,
        };
        let mut used = 0usize;
        {
            let Some((mem, queue)) = ctx.queue_mut(TX_QUEUE) else {
                return Ok(());
            };
            'outer: loop {
                queue.disable_notification(mem).map_err(queue_err)?;
                loop {
                    let next = queue.iter(mem).map_err(queue_err)?.next();
                    let Some(chain) = next else { break };
                    let head = chain.head_index();
                    let frame = self.read_tx_chain(mem, chain);
                    // The bytes are copied: the chain goes back at once (§5.1.6.2
                    // lets the device complete a transmit before it is on the wire).
                    queue.add_used(mem, head, 0).map_err(queue_err)?;
                    used += 1;
                    let verdict = frame.map(|len| {
                        self.egress
                            .check(&self.tx_buf[NET_HDR_LEN..NET_HDR_LEN + len])
                    });
                    let frame = match verdict {
                        Some(egress::Verdict::Pass) => frame,
                        Some(egress::Verdict::Drop) => None,
                        Some(egress::Verdict::Answer(a)) => {
                            if self.answers.len() < MAX_ANSWERS {
                                self.answers.push_back(a);
                            }
                            None
                        }
                        None => {
                            self.stats.tx_dropped += 1;
                            None
                        }
                    };
                    match frame {
                        None => {}
                        Some(len) if self.backend.is_some() => {
                            self.tx_pending = Some(len);
                            if !self.flush_tx_pending() {
                                // Full: resume when the backend fd is writable.
                                break 'outer;
                            }
                        }
                        Some(_) => self.stats.tx_dropped += 1,
                    }
                }
                if !queue.enable_notification(mem).map_err(queue_err)? {
                    break;
                }
            }
        }
        if used > 0 {
            ctx.signal_used(TX_QUEUE)?;
        }
        if !self.answers.is_empty() {
            self.process_rx(ctx)?;
        }
        Ok(())
    }

    /// Moves frames from the backend into receive chains while both have some.
    fn process_rx(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        let queue_err = |source| VirtioError::Queue {
            index: RX_QUEUE,
            source,
        };
        let mut used = 0usize;
        {
            let Some((mem, queue)) = ctx.queue_mut(RX_QUEUE) else {
                return Ok(());
            };
            loop {
                let answer = if self.rx_pending.is_none() {
                    self.answers.pop_front()
                } else {
                    None
                };
                let len = match (self.rx_pending.take(), answer) {
                    (Some(l), _) => l,
                    (None, Some(a)) => {
                        let n = a.len().min(self.rx_buf.len());
                        self.rx_buf[..n].copy_from_slice(&a[..n]);
                        n
                    }
                    (None, None) => {
                        let Some(b) = self.backend.as_mut() else {
                            break;
                        };
                        match b.recv(&mut self.rx_buf) {
                            Ok(Some(l)) => l,
                            Ok(None) => break,
                            Err(e) => {
                                self.backend_failed(&e);
                                break;
                            }
                        }
                    }
                };
                // A receive chain, skipping (and returning) unusable ones.
                let target = loop {
                    let next = queue.iter(mem).map_err(queue_err)?.next();
                    let Some(chain) = next else {
                        // §2.7.10: re-arm, then look again for a late buffer.
                        if queue.enable_notification(mem).map_err(queue_err)? {
                            continue;
                        }
                        break None;
                    };
                    let head = chain.head_index();
                    match walk_chain(mem, chain) {
                        Ok(b) if b.readable.is_empty() => break Some((head, b.writable)),
                        Ok(_) | Err(_) => {
                            tracing::debug!(head, "unusable virtio-net RX chain returned empty");
                            queue.add_used(mem, head, 0).map_err(queue_err)?;
                            used += 1;
                        }
                    }
                };
                let Some((head, writable)) = target else {
                    self.rx_pending = Some(len);
                    break;
                };
                let capacity = super::segments_len(&writable);
                let written = if capacity >= (NET_HDR_LEN + len) as u64 {
                    let mut hdr = [0u8; NET_HDR_LEN];
                    // §5.1.6.4: num_buffers is 1 without VIRTIO_NET_F_MRG_RXBUF.
                    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
                    let n = scatter(mem, &writable, 0, &hdr)
                        + scatter(mem, &writable, NET_HDR_LEN as u64, &self.rx_buf[..len]);
                    self.stats.rx_frames += 1;
                    n
                } else {
                    // The driver's buffers are smaller than the frame: the frame
                    // is lost (as on a wire), the buffer goes back empty.
                    self.stats.rx_dropped += 1;
                    0
                };
                queue
                    .add_used(mem, head, u32::try_from(written).unwrap_or(0))
                    .map_err(queue_err)?;
                used += 1;
            }
        }
        if used > 0 {
            ctx.signal_used(RX_QUEUE)?;
        }
        Ok(())
    }

    fn config_bytes(&self) -> [u8; 10] {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; }
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        for index in [RX_QUEUE, TX_QUEUE] {
            if !ctx.queue_ready(index) {
                return Err(VirtioError::QueueNotReady { index });
            }
        }
        self.active = true;
        self.process_rx(ctx)
    }

    fn process_queue(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        index: u16,
    ) -> Result<(), VirtioError> {
        match index {
            TX_QUEUE => self.process_tx(ctx),
            RX_QUEUE => self.process_rx(ctx),
            _ => Ok(()),
        }
    }

    fn process_event(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        _token: u32,
    ) -> Result<(), VirtioError> {
        // Readable or writable, or a wake: both directions may move now.
        self.process_tx(ctx)?;
        self.process_rx(ctx)
    }

    fn host_fds(&self, out: &mut Vec<HostFd>) {
        if let Some(b) = &self.backend {
            out.push(HostFd {
                fd: b.fd(),
                token: BACKEND_TOKEN,
            });
        }
    }

    fn reset(&mut self) {
        // Frames in flight are lost, as on a link reset; the backend stays.
        self.tx_pending = None;
        self.rx_pending = None;
        self.answers.clear();
        self.active = false;
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests;
