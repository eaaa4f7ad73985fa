//! The guest console's host side: forwards bytes to the user's output and notes the
//! moments the timings need (first byte, guest-init's ready marker).

use std::io::Write;
use std::sync::Arc;

use crate::timings::Timings;

/// The line guest-init prints once it reached userspace and loaded its modules.
pub const READY_MARKER: &[u8] = b"supermachine: guest-init ready";

/// A `Write` for the serial device that forwards to `out`.
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    timings: Arc<Timings>,
    /// How many bytes of `READY_MARKER` matched so far (the marker may arrive split).
    matched: usize,
    ready_seen: bool,
}

impl std::fmt::Debug for ConsoleOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOut")
            .field("ready_seen", &self.ready_seen)
            .finish()
    }
}

/// A console that discards what it is given: the stand-in while a restored
/// UART is rebuilt around the real one (`Serial::restore`).
impl Default for ConsoleOut {
    fn default() -> Self {
        Self::new(Box::new(std::io::sink()), Arc::new(Timings::off()))
    }
}

impl ConsoleOut {
    /// Forwards to `out`, recording into `timings`.
    pub fn new(out: Box<dyn Write + Send>, timings: Arc<Timings>) -> Self {
        Self {
            out,
            timings,
            matched: 0,
            ready_seen: false,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == READY_MARKER[self.matched] {
                self.matched += 1;
                if self.matched == READY_MARKER.len() {
                    self.ready_seen = true;
                    self.timings.init_ready();
                    return;
                }
            } else {
                self.matched = usize::from(b == READY_MARKER[0]);
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.timings.first_output();
        if !self.ready_seen {
            self.scan(buf);
        }
        self.out.write_all(buf)?;
        // The console is interactive output: the user sees each byte as the guest
        // writes it (stdout is line-buffered only when it is a terminal).
        self.out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The console UART on interrupt line `line` of `vm`, writing to `out`: in its
/// power-on state, or restored from `saved`.
pub(crate) fn serial<V: hypervisor::Vm>(
    vm: &V,
    line: u32,
    out: ConsoleOut,
    saved: Option<&devices::serial::SerialState>,
) -> Result<devices::serial::Serial<ConsoleOut>, crate::vmm::RunError> {
    let irq = Arc::new(crate::vmm::LineInterrupt::new(line, vm.irq_line(line)?));
    match saved {
        None => Ok(devices::serial::Serial::new(irq, out)),
        Some(s) => devices::serial::Serial::from_state(s, irq, out).map_err(|source| {
            crate::vmm::RunError::RestoreDevice {
                what: "the serial console".into(),
                source: Box::new(source),
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_marker_split_across_writes_is_seen() {
        let t = Arc::new(Timings::start());
        let mut c = ConsoleOut::new(Box::new(std::io::sink()), t.clone());
        c.write_all(b"noise\nsupermachine: guest-").unwrap();
        assert!(t.init_ready_us().is_none());
        c.write_all(b"init ready (cpus=2)\n").unwrap();
        assert!(t.init_ready_us().is_some());
    }

    #[test]
    fn console_near_miss_is_not_the_marker() {
        let t = Arc::new(Timings::start());
        let mut c = ConsoleOut::new(Box::new(std::io::sink()), t.clone());
        c.write_all(b"supermachine: guest-init read\n").unwrap();
        assert!(t.init_ready_us().is_none());
    }
}
