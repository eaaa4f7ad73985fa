//! virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue of
//! device-writable buffers, filled from the host's getrandom.

use std::any::Any;

use vm_memory::{Address, Bytes};

use super::{
    device_type, walk_chain, DeviceContext, GuestMemoryMmap, VirtioDevice, VirtioError,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets, so a guest offering a 4 GiB buffer cannot
/// make the VMM spend seconds in getrandom. The driver asks again for more.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;
/// getrandom is called for at most this much at a time (bounded stack/heap use).
const CHUNK: usize = 4096;

/// The entropy device. Stateless: nothing to save but the transport's queues.
#[derive(Debug, Default)]
pub struct Rng {
    delivered: u64,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Random bytes handed to the guest so far.
    pub fn bytes_delivered(&self) -> u64 {
        self.delivered
    }

    /// Fills the chain's writable buffers, up to [`MAX_BYTES_PER_REQUEST`].
    /// Returns the used length. A malformed chain, one with a device-readable
    /// buffer (§5.4.6: requests are write-only), or a host getrandom failure gives
    /// back the buffer unused (length 0).
    fn fill(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let buffers = match walk_chain(mem, chain) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "virtio-rng request dropped");
                return 0;
            }
        };
        if !buffers.readable.is_empty() {
            tracing::debug!("virtio-rng request has a device-readable buffer; dropped");
            return 0;
        }
        let mut chunk = [0u8; CHUNK];
        let mut written: u32 = 0;
        for seg in &buffers.writable {
            let mut done: u32 = 0;
            while done < seg.len && written < MAX_BYTES_PER_REQUEST {
                let n = (seg.len - done)
                    .min(MAX_BYTES_PER_REQUEST - written)
                    .min(CHUNK as u32);
                let buf = &mut chunk[..n as usize];
                if let Err(e) = getrandom::fill(buf) {
                    tracing::warn!(error = %e, "host getrandom failed; virtio-rng request short");
                    return written;
                }
                // walk_chain checked the whole segment lies in guest memory.
                let addr = seg.addr.unchecked_add(u64::from(done));
                if mem.write_slice(buf, addr).is_err() {
                    return written;
                }
                done += n;
                written += n;
            }
        }
        self.delivered += u64::from(written);
        written
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }

    /// virtio-rng has no configuration space (§5.4.4).
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        if !ctx.queue_ready(0) {
            return Err(VirtioError::QueueNotReady { index: 0 });
        }
        Ok(())
    }

    fn process_queue(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        index: u16,
    ) -> Result<(), VirtioError> {
        if index != 0 {
            return Ok(());
        }
        let mem = ctx.mem();
        ctx.drain_queue(0, |chain| self.fill(mem, chain))?;
        Ok(())
    }

    fn reset(&mut self) {}

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::interrupt::test_util::CountingInterrupt;
    use crate::virtio::mmio::reg;
    use crate::virtio::test_util::{
        desc, guest_memory, read_reg, write_reg, Driver, DATA_BASE, F_NEXT, F_WRITE, MEM_SIZE,
    };
    use crate::virtio::{status, IrqMode, MmioTransport};

    fn rng() -> (MmioTransport, Driver, Arc<CountingInterrupt>) {
        let irq = Arc::new(CountingInterrupt::default());
        let mem = guest_memory();
        let mut t = MmioTransport::new(
            Box::new(Rng::new()),
            mem.clone(),
            irq.clone(),
            IrqMode::Edge,
        )
        .unwrap();
        let driver = Driver::new(mem);
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        (t, driver, irq)
    }

    fn read_guest(d: &Driver, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        d.mem().read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn rng_fills_writable_buffer_and_bytes_differ_between_requests() {
        let (mut t, d, irq) = rng();
        let vq = d.ring(0, 16);
        vq.add_chain(0, &[desc(DATA_BASE, 64, F_WRITE, 0)]);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        vq.add_chain(1, &[desc(DATA_BASE + 64, 64, F_WRITE, 0)]);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);

        assert_eq!(vq.used_idx(), 2);
        assert_eq!(vq.used(0), (0, 64));
        assert_eq!(vq.used(1), (1, 64));
        let a = read_guest(&d, DATA_BASE, 64);
        let b = read_guest(&d, DATA_BASE + 64, 64);
        assert_ne!(a, vec![0; 64]);
        assert_ne!(a, b);
        assert_eq!(irq.edges(), 2);
        assert_eq!(t.device::<Rng>().unwrap().bytes_delivered(), 128);
    }

    #[test]
    fn rng_huge_buffer_capped_per_request() {
        let (mut t, d, _) = rng();
        let vq = d.ring(0, 16);
        // Larger than guest memory: refused as out of memory, dropped.
        vq.add_chain(0, &[desc(DATA_BASE, u32::MAX, F_WRITE, 0)]);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used(0), (0, 0));
        // Inside memory but above the cap: gets exactly the cap.
        let len = (MEM_SIZE - DATA_BASE) as u32;
        vq.add_chain(1, &[desc(DATA_BASE, len, F_WRITE, 0)]);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used(1), (1, MAX_BYTES_PER_REQUEST));
    }

    #[test]
    fn rng_readable_buffer_dropped() {
        let (mut t, d, _) = rng();
        let vq = d.ring(0, 16);
        d.mem()
            .write_slice(&[7; 16], GuestAddress(DATA_BASE))
            .unwrap();
        vq.add_chain(0, &[desc(DATA_BASE, 16, 0, 0)]);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used(0), (0, 0));
        assert_eq!(read_guest(&d, DATA_BASE, 16), vec![7; 16]);
    }

    #[test]
    fn rng_descriptor_loop_dropped_without_hang() {
        let (mut t, d, _) = rng();
        let vq = d.ring(0, 16);
        vq.write_desc(0, desc(DATA_BASE, 8, F_WRITE | F_NEXT, 1));
        vq.write_desc(1, desc(DATA_BASE + 8, 8, F_WRITE | F_NEXT, 0));
        vq.publish(0);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used(0), (0, 0));
        assert_eq!(read_guest(&d, DATA_BASE, 16), vec![0; 16]);
    }

    #[test]
    fn rng_buffer_outside_memory_dropped() {
        let (mut t, d, _) = rng();
        let vq = d.ring(0, 16);
        vq.add_chain(0, &[desc(MEM_SIZE - 4, 8, F_WRITE, 0)]);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used(0), (0, 0));
        assert_eq!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn rng_head_index_past_table_needs_reset() {
        let (mut t, d, _) = rng();
        let vq = d.ring(0, 16);
        vq.publish(40);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_ne!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn rng_avail_index_jump_needs_reset() {
        let (mut t, d, _) = rng();
        let vq = d.ring(0, 16);
        vq.set_avail_idx(1000);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_ne!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
        assert_eq!(vq.used_idx(), 0);
    }

    #[test]
    fn rng_event_idx_suppresses_interrupt_until_used_event() {
        let irq = Arc::new(CountingInterrupt::default());
        let mem = guest_memory();
        let mut t = MmioTransport::new(
            Box::new(Rng::new()),
            mem.clone(),
            irq.clone(),
            IrqMode::Edge,
        )
        .unwrap();
        let d = Driver::new(mem);
        d.setup(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, 16)
            .unwrap();
        let vq = d.ring(0, 16);
        // used_event lives right after the avail ring entries: interrupt only once
        // the used index passes 1.
        let used_event = vq.avail_addr() + 4 + 2 * 16;
        d.mem().write_obj(1u16, GuestAddress(used_event)).unwrap();
        vq.add_chain(0, &[desc(DATA_BASE, 8, F_WRITE, 0)]);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(irq.edges(), 0, "used idx 1 has not passed used_event 1");
        vq.add_chain(1, &[desc(DATA_BASE, 8, F_WRITE, 0)]);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(irq.edges(), 1);
        // The device re-armed avail_event at its next available index.
        let avail_event = vq.used_addr() + 4 + 8 * 16;
        let armed: u16 = d.mem().read_obj(GuestAddress(avail_event)).unwrap();
        assert_eq!(armed, 2);
    }
}
