//! The device event loop: one thread that waits on the host side of the virtio
//! devices and routes what happens to them, on Linux (epoll) and macOS (kqueue)
//! alike, through `mio` (docs/architecture.md says why that crate).
//!
//! It watches three kinds of fd:
//! - each device's own host fds ([`MmioTransport::host_fds`]: vsock sockets, a
//!   net backend), edge-triggered for readable and writable, each tagged with
//!   the device's token; an event locks the transport and calls
//!   [`MmioTransport::process_event`] with that token;
//! - queue-notify I/O events ([`EventLoop::add_ioevent`], KVM ioeventfds) the
//!   VMM registered with the backend at `QueueNotify`; an event calls
//!   [`MmioTransport::notify`], so the vCPU does not exit to userspace for a
//!   notification. The loop owns them: they are unregistered when it ends. A
//!   backend without them (Hypervisor.framework) has queue notifications arrive
//!   as MMIO exits instead;
//! - the loop's own waker: devices call it through the [`HostWaker`] they got
//!   when their fd set changes or they have deferred work, and
//!   [`EventLoopHandle::stop`] uses it to end the loop.
//!
//! After a wake the loop re-reads every device's fd set, brings the poller in
//! line, and calls `process_event(TOKEN_WAKE)`. A device with timed work
//! ([`MmioTransport::deadline`]) gets the same call once its deadline passes; the
//! loop waits no longer than the earliest one. A device closing a socket needs
//! no care: the poller forgets a closed fd by itself, and the next re-sync
//! forgets it in our table too (the fd number may meanwhile belong to a new
//! socket of the same device, which is then added again under its new token).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use devices::virtio::{HostFd, HostWaker, MmioTransport, TOKEN_WAKE};
use hypervisor::IoEvent;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

/// Most events taken from the poller per wait.
const EVENTS_PER_WAIT: usize = 64;
/// The token of the loop's own waker; sources are numbered from 1.
const CONTROL: Token = Token(0);

/// Errors of the device event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll_create1 / kqueue failed.
    #[error("cannot create the device event loop's poller")]
    CreatePoller(#[source] io::Error),
    /// The waker (an eventfd, or a kqueue user event) could not be made.
    #[error("cannot create the device event loop's waker")]
    CreateWaker(#[source] io::Error),
    /// The poller refused an fd.
    #[error("cannot watch fd {fd} in the device event loop")]
    Watch {
        /// The fd.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Waiting on the poller failed.
    #[error("waiting for device events failed")]
    Wait(#[source] io::Error),
    /// The thread could not be started.
    #[error("cannot start the device event loop thread")]
    Spawn(#[source] io::Error),
}

/// The loop's waker, shared with devices (as their [`HostWaker`]) and handles.
#[derive(Debug)]
struct Control {
    waker: Waker,
    stop: AtomicBool,
    hold: Mutex<Hold>,
    held: Condvar,
}
/// Work for the loop's own thread ([`EventLoopHandle::run_on_loop`]).
type Task = Box<dyn FnOnce() + Send>;

/// Whether the loop is asked to hold, and whether it does.
#[derive(Default)]
struct Hold {
    requested: bool,
    holding: bool,
    /// The loop's thread is alive (or about to be): a hold request waits for it.
    alive: bool,
    /// Work to run on the loop's thread at its next wake.
    tasks: Vec<Task>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("requested", &self.requested)
            .field("holding", &self.holding)
            .field("alive", &self.alive)
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

impl Control {
    fn hold_state(&self) -> std::sync::MutexGuard<'_, Hold> {
        self.hold.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds the calling loop while a hold is requested (and no stop).
    fn hold_while_requested(&self) {
        let mut h = self.hold_state();
        if !h.requested {
            return;
        }
        h.holding = true;
        self.held.notify_all();
        while h.requested && !self.stop.load(Ordering::SeqCst) {
            h = self.held.wait(h).unwrap_or_else(PoisonError::into_inner);
        }
        h.holding = false;
    }

    fn set_alive(&self, alive: bool) {
        let mut h = self.hold_state();
        h.alive = alive;
        if !alive {
            // Dropping a task drops its answer channel: the caller learns the
            // loop is gone.
            h.tasks.clear();
        }
        drop(h);
        self.held.notify_all();
    }

    /// Runs the tasks handed to the loop, on its thread.
    fn run_tasks(&self) {
        let tasks = std::mem::take(&mut self.hold_state().tasks);
        for t in tasks {
            t();
        }
    }
}

impl HostWaker for Control {
    fn wake(&self) {
        // A failed wake leaves the loop waiting for its next event; nothing to
        // report it to here, and the waker only fails if the poller is gone.
        if let Err(e) = self.waker.wake() {
            tracing::warn!("waking the device event loop: {e}");
        }
    }
}

/// Stops or wakes a running [`EventLoop`] from any thread.
#[derive(Clone, Debug)]
pub struct EventLoopHandle {
    control: Arc<Control>,
}

impl EventLoopHandle {
    /// Ends the loop after the events it is handling.
    pub fn stop(&self) {
        self.control.stop.store(true, Ordering::SeqCst);
        // Under the hold lock, so a loop about to wait for a resume sees it.
        drop(self.control.hold_state());
        self.control.held.notify_all();
        self.control.wake();
    }

    /// Makes the loop re-read every device's fd set and kick the devices.
    pub fn wake(&self) {
        self.control.wake();
    }

    /// Holds the loop after the events it is handling and returns once it is
    /// held (or has ended): until [`EventLoopHandle::resume`] no device runs.
    pub fn pause(&self) {
        self.request_pause();
        self.wait_paused();
    }

    /// Asks the loop to hold, without waiting ([`EventLoopHandle::wait_paused`]
    /// waits), so a caller can pause other threads meanwhile.
    pub fn request_pause(&self) {
        self.control.hold_state().requested = true;
        self.control.wake();
    }

    /// Waits until a requested hold is in effect (or the loop has ended).
    pub fn wait_paused(&self) {
        let mut h = self.control.hold_state();
        while h.requested && !h.holding && h.alive && !self.control.stop.load(Ordering::SeqCst) {
            h = self
                .control
                .held
                .wait(h)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Runs `f` on the loop's own thread (between events) and returns its
    /// result; `None` if the loop has ended (or ends before it gets to it).
    pub fn run_on_loop<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        self.send_to_loop(f)?.recv().ok()
    }

    /// Hands `f` to the loop's own thread without waiting; its result arrives
    /// on the receiver (which reports a disconnect if the loop ends first).
    /// `None` if the loop has ended.
    pub fn send_to_loop<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<std::sync::mpsc::Receiver<R>> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut h = self.control.hold_state();
            if !h.alive || self.control.stop.load(Ordering::SeqCst) {
                return None;
            }
            h.tasks.push(Box::new(move || {
                let _ = tx.send(f());
            }));
        }
        self.control.wake();
        Some(rx)
    }

    /// Lets a held loop go on; it then re-reads every device's fd set.
    pub fn resume(&self) {
        self.control.hold_state().requested = false;
        self.control.held.notify_all();
        self.control.wake();
    }
}

enum Source {
    Transport {
        transport: Arc<Mutex<MmioTransport>>,
        /// What the poller holds for this device: fd -> token.
        watched: HashMap<RawFd, u32>,
    },
    Ioevent {
        event: IoEvent,
        transport: Arc<Mutex<MmioTransport>>,
        queue: u32,
    },
}

/// The device event loop; build it, add transports and ioeventfds, then
/// [`EventLoop::spawn`] it.
pub struct EventLoop {
    poll: Poll,
    control: Arc<Control>,
    sources: Vec<Source>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("sources", &self.sources.len())
            .finish()
    }
}

fn lock(t: &Mutex<MmioTransport>) -> std::sync::MutexGuard<'_, MmioTransport> {
    // A device that panicked under the lock left its state as it was; the
    // transport's own invariants do not depend on the panicking call finishing.
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `fd` under `token`, or updates it if the poller already has that
/// fd (epoll says EEXIST; kqueue updates in place).
fn watch(poll: &Poll, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
    let registry = poll.registry();
    match registry.register(&mut SourceFd(&fd), token, interest) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            registry.reregister(&mut SourceFd(&fd), token, interest)
        }
        other => other,
    }
}

impl EventLoop {
    /// An empty loop.
    pub fn new() -> Result<Self, EventLoopError> {
        let poll = Poll::new().map_err(EventLoopError::CreatePoller)?;
        let waker = Waker::new(poll.registry(), CONTROL).map_err(EventLoopError::CreateWaker)?;
        Ok(Self {
            poll,
            control: Arc::new(Control {
                waker,
                stop: AtomicBool::new(false),
                hold: Mutex::new(Hold::default()),
                held: Condvar::new(),
            }),
            sources: Vec::new(),
        })
    }

    /// A handle to stop or wake the loop.
    pub fn handle(&self) -> EventLoopHandle {
        EventLoopHandle {
            control: self.control.clone(),
        }
    }

    /// Watches `transport`'s host fds and gives its device the loop's waker.
    pub fn add_transport(
        &mut self,
        transport: Arc<Mutex<MmioTransport>>,
    ) -> Result<(), EventLoopError> {
        lock(&transport).set_host_waker(self.control.clone());
        self.sources.push(Source::Transport {
            transport,
            watched: HashMap::new(),
        });
        self.sync(self.sources.len() - 1)
    }

    /// Watches `event`, registered with the backend for `QueueNotify` of
    /// `transport` with datamatch `queue`: each event notifies that queue. The
    /// loop keeps it (registered) until it ends.
    pub fn add_ioevent(
        &mut self,
        event: IoEvent,
        transport: Arc<Mutex<MmioTransport>>,
        queue: u32,
    ) -> Result<(), EventLoopError> {
        let token = source_token(self.sources.len(), 0);
        let fd = event.file().as_raw_fd();
        watch(&self.poll, fd, token, Interest::READABLE)
            .map_err(|source| EventLoopError::Watch { fd, source })?;
        self.sources.push(Source::Ioevent {
            event,
            transport,
            queue,
        });
        Ok(())
    }

    /// Runs the loop on a thread named `sm-devices`; if it fails, `on_error`
    /// gets the error on that thread. The thread's result is the loop's I/O
    /// events, still registered: whoever joins it decides when they are dropped
    /// (a VMM tearing the VM down drops them after the VM, which releases them
    /// without a grace period each).
    pub fn spawn(
        self,
        on_error: impl FnOnce(EventLoopError) + Send + 'static,
    ) -> Result<JoinHandle<Vec<IoEvent>>, EventLoopError> {
        let control = self.control.clone();
        control.set_alive(true);
        std::thread::Builder::new()
            .name("sm-devices".into())
            .spawn(move || {
                let (ioevents, r) = self.run();
                if let Err(e) = r {
                    on_error(e);
                }
                ioevents
            })
            .inspect_err(|_| control.set_alive(false))
            .map_err(EventLoopError::Spawn)
    }

    /// Runs the loop on this thread until [`EventLoopHandle::stop`] (or until it
    /// fails); returns its I/O events, still registered, and how it ended.
    pub fn run(mut self) -> (Vec<IoEvent>, Result<(), EventLoopError>) {
        let control = self.control.clone();
        control.set_alive(true);
        let r = self.serve();
        control.set_alive(false);
        let ioevents = std::mem::take(&mut self.sources)
            .into_iter()
            .filter_map(|s| match s {
                Source::Ioevent { event, .. } => Some(event),
                Source::Transport { .. } => None,
            })
            .collect();
        (ioevents, r)
    }

    fn serve(&mut self) -> Result<(), EventLoopError> {
        let mut events = Events::with_capacity(EVENTS_PER_WAIT);
        loop {
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EventLoopError::Wait(e)),
            }
            let mut woken = false;
            for ev in events.iter() {
                if ev.token() == CONTROL {
                    woken = true;
                } else {
                    self.dispatch(ev.token());
                }
            }
            if self.control.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if woken {
                self.control.run_tasks();
                self.control.hold_while_requested();
                if self.control.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                for index in 0..self.sources.len() {
                    self.sync(index)?;
                    if let Some(Source::Transport { transport, .. }) = self.sources.get(index) {
                        lock(transport).process_event(TOKEN_WAKE);
                    }
                }
            } else {
                self.run_due();
            }
        }
    }

    /// The earliest deadline of any device.
    fn next_deadline(&self) -> Option<Instant> {
        self.sources
            .iter()
            .filter_map(|s| match s {
                Source::Transport { transport, .. } => lock(transport).deadline(),
                Source::Ioevent { .. } => None,
            })
            .min()
    }

    /// Calls every device whose deadline has passed.
    fn run_due(&self) {
        let now = Instant::now();
        for s in &self.sources {
            if let Source::Transport { transport, .. } = s {
                let mut t = lock(transport);
                if t.deadline().is_some_and(|d| d <= now) {
                    t.process_event(TOKEN_WAKE);
                }
            }
        }
    }

    fn dispatch(&mut self, token: Token) {
        let data = token.0 as u64;
        let Some(index) = (data >> 32).checked_sub(1) else {
            return;
        };
        let token = data as u32;
        let Some(source) = usize::try_from(index)
            .ok()
            .and_then(|i| self.sources.get(i))
        else {
            return;
        };
        match source {
            Source::Transport { transport, .. } => lock(transport).process_event(token),
            Source::Ioevent {
                event,
                transport,
                queue,
            } => {
                // Several notifications coalesce into one read and one notify.
                match event.drain() {
                    Ok(0) => {}
                    Ok(_) => lock(transport).notify(*queue),
                    Err(e) => tracing::warn!(queue, "reading a queue-notify event: {e}"),
                }
            }
        }
    }

    /// Brings the poller in line with the fd set of source `index` (transports
    /// only).
    fn sync(&mut self, index: usize) -> Result<(), EventLoopError> {
        let Some(Source::Transport { transport, watched }) = self.sources.get_mut(index) else {
            return Ok(());
        };
        let mut fds: Vec<HostFd> = Vec::new();
        lock(transport).host_fds(&mut fds);
        let now: HashMap<RawFd, u32> = fds.iter().map(|h| (h.fd, h.token)).collect();
        for (fd, _) in watched.iter().filter(|(fd, _)| !now.contains_key(fd)) {
            // Usually already gone: the poller drops closed fds itself.
            let _ = self.poll.registry().deregister(&mut SourceFd(fd));
        }
        for (&fd, &token) in &now {
            if watched.get(&fd) == Some(&token) {
                continue;
            }
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(source) = watch(&self.poll, fd, source_token(index, token), interest) {
                // The device closed it between host_fds and here (EBADF): the
                // next wake re-syncs. Anything else is a real failure.
                if source.raw_os_error() != Some(libc::EBADF) {
                    return Err(EventLoopError::Watch { fd, source });
                }
            }
        }
        *watched = now;
        Ok(())
    }
}

/// The poller token of a source's fd: source index + 1 in the high half, the
/// device's token in the low (64-bit hosts only, which is all we build for).
fn source_token(index: usize, token: u32) -> Token {
    Token(((index + 1) << 32) | token as usize)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::any::Any;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Duration;

    use devices::virtio::mmio::reg;
    use devices::virtio::{
        status, DeviceContext, IrqMode, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1,
    };
    use devices::{BusDevice, Interrupt, InterruptError};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    #[derive(Debug)]
    struct NullIrq;

    impl Interrupt for NullIrq {
        fn trigger(&self) -> Result<(), InterruptError> {
            Ok(())
        }

        fn set_level(&self, _: bool) -> Result<(), InterruptError> {
            Ok(())
        }
    }

    /// A device with host sockets; reports what reaches it on a channel.
    struct SocketDevice {
        streams: Vec<(UnixStream, u32)>,
        seen: mpsc::Sender<String>,
        waker: Option<Arc<dyn HostWaker>>,
        /// Timed work: reported as "due" once called at or after it.
        deadline: Option<std::time::Instant>,
        /// Files it also lists as host fds (a regular file: the poller refuses it).
        files: Vec<std::fs::File>,
    }

    impl SocketDevice {
        fn add(&mut self, stream: UnixStream, token: u32) {
            stream.set_nonblocking(true).unwrap();
            self.streams.push((stream, token));
            if let Some(w) = &self.waker {
                w.wake();
            }
        }
    }

    impl VirtioDevice for SocketDevice {
        fn device_type(&self) -> u32 {
            0x55
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, _: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
            Ok(())
        }
        fn process_queue(
            &mut self,
            _: &mut DeviceContext<'_>,
            index: u16,
        ) -> Result<(), VirtioError> {
            let _ = self.seen.send(format!("queue {index}"));
            Ok(())
        }
        fn process_event(
            &mut self,
            _: &mut DeviceContext<'_>,
            token: u32,
        ) -> Result<(), VirtioError> {
            for (s, t) in &mut self.streams {
                if *t == token {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let _ = self.seen.send(format!("{token}: {text}"));
                    }
                }
            }
            if token == TOKEN_WAKE {
                match self.deadline {
                    Some(d) if d <= std::time::Instant::now() => {
                        self.deadline = None;
                        let _ = self.seen.send("due".into());
                    }
                    _ => {
                        let _ = self.seen.send("wake".into());
                    }
                }
            }
            Ok(())
        }
        fn host_fds(&self, out: &mut Vec<HostFd>) {
            out.extend(self.streams.iter().map(|(s, token)| HostFd {
                fd: s.as_raw_fd(),
                token: *token,
            }));
            out.extend(self.files.iter().map(|f| HostFd {
                fd: f.as_raw_fd(),
                token: 99,
            }));
        }
        fn deadline(&self) -> Option<std::time::Instant> {
            self.deadline
        }
        fn set_host_waker(&mut self, waker: Arc<dyn HostWaker>) {
            self.waker = Some(waker);
        }
        fn reset(&mut self) {}
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// A live transport (DRIVER_OK, queue 0 ready) around a [`SocketDevice`].
    fn transport(stream: UnixStream) -> (Arc<Mutex<MmioTransport>>, mpsc::Receiver<String>) {
        let (seen, rx) = mpsc::channel();
        let mut dev = SocketDevice {
            streams: Vec::new(),
            seen,
            waker: None,
            deadline: None,
            files: Vec::new(),
        };
        dev.add(stream, 7);
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let mut t =
            MmioTransport::new(Box::new(dev), mem, Arc::new(NullIrq), IrqMode::Edge).unwrap();
        let s = status::ACKNOWLEDGE | status::DRIVER;
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        write_reg(&mut t, reg::STATUS, s);
        write_reg(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write_reg(&mut t, reg::DRIVER_FEATURES, 1);
        write_reg(&mut t, reg::STATUS, s | status::FEATURES_OK);
        write_reg(&mut t, reg::QUEUE_SEL, 0);
        write_reg(&mut t, reg::QUEUE_NUM, 16);
        write_reg(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        write_reg(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        write_reg(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        write_reg(&mut t, reg::QUEUE_READY, 1);
        write_reg(
            &mut t,
            reg::STATUS,
            s | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_active());
        (Arc::new(Mutex::new(t)), rx)
    }

    fn next(rx: &mpsc::Receiver<String>) -> String {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("event loop delivered nothing")
    }

    #[test]
    fn event_loop_routes_host_fd_event_to_device_token() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (t, seen) = transport(ours);
        let mut el = EventLoop::new().unwrap();
        el.add_transport(t).unwrap();
        let handle = el.handle();
        let thread = el.spawn(|e| panic!("event loop failed: {e}")).unwrap();
        theirs.write_all(b"hello").unwrap();
        // The first event may be the initial "writable" edge with nothing to read.
        loop {
            if next(&seen) == "7: hello" {
                break;
            }
        }
        handle.stop();
        thread.join().unwrap();
    }

    #[test]
    fn event_loop_wake_watches_new_fds_and_kicks_device() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (t, seen) = transport(ours);
        let mut el = EventLoop::new().unwrap();
        el.add_transport(t.clone()).unwrap();
        let handle = el.handle();
        let thread = el.spawn(|e| panic!("event loop failed: {e}")).unwrap();
        let (new_ours, mut new_theirs) = UnixStream::pair().unwrap();
        lock(&t)
            .device_mut::<SocketDevice>()
            .unwrap()
            .add(new_ours, 9);
        assert_eq!(next(&seen), "wake");
        new_theirs.write_all(b"late").unwrap();
        loop {
            if next(&seen) == "9: late" {
                break;
            }
        }
        handle.stop();
        thread.join().unwrap();
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn event_loop_ioeventfd_notifies_queue() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (t, seen) = transport(ours);
        let mut el = EventLoop::new().unwrap();
        let ioevent = EventFd::new(EFD_NONBLOCK).unwrap();
        let trigger = ioevent.try_clone().unwrap();
        // SAFETY: `into_raw_fd` hands over a valid, open eventfd; the File is
        // its only owner from here on.
        let file = unsafe { std::fs::File::from_raw_fd(ioevent.into_raw_fd()) };
        el.add_ioevent(IoEvent::new(file, Box::new(())), t, 0)
            .unwrap();
        let handle = el.handle();
        let thread = el.spawn(|e| panic!("event loop failed: {e}")).unwrap();
        trigger.write(1).unwrap();
        assert_eq!(next(&seen), "queue 0");
        handle.stop();
        thread.join().unwrap();
    }

    #[test]
    fn event_loop_calls_a_device_when_its_deadline_passes() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (t, seen) = transport(ours);
        let mut el = EventLoop::new().unwrap();
        el.add_transport(t.clone()).unwrap();
        let handle = el.handle();
        let thread = el.spawn(|e| panic!("event loop failed: {e}")).unwrap();
        // Whatever the loop saw first (the initial writable edge) is out.
        while seen.recv_timeout(Duration::from_millis(50)).is_ok() {}
        let due = std::time::Instant::now() + Duration::from_millis(100);
        {
            let mut t = lock(&t);
            let dev = t.device_mut::<SocketDevice>().unwrap();
            dev.deadline = Some(due);
            // As a device does that sets a deadline outside the loop.
            dev.waker.as_ref().unwrap().wake();
        }
        assert_eq!(
            next(&seen),
            "wake",
            "the wake itself comes before the deadline"
        );
        // No fd event follows: only the deadline can make the loop call again.
        assert_eq!(next(&seen), "due");
        assert!(std::time::Instant::now() >= due);
        handle.stop();
        thread.join().unwrap();
    }

    #[test]
    // epoll refuses regular files (EPERM); kqueue watches them.
    #[cfg(target_os = "linux")]
    fn event_loop_that_fails_while_running_reports_its_error_and_ends() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (t, _seen) = transport(ours);
        let mut el = EventLoop::new().unwrap();
        el.add_transport(t.clone()).unwrap();
        let (failed_tx, failed) = mpsc::channel();
        let thread = el
            .spawn(move |e| {
                let _ = failed_tx.send(e.to_string());
            })
            .unwrap();
        // While it runs, the device lists an fd the poller refuses (a regular
        // file: EPERM), and says its set changed.
        let path = std::env::temp_dir().join(format!("sm-el-file-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        {
            let mut t = lock(&t);
            let dev = t.device_mut::<SocketDevice>().unwrap();
            dev.files.push(file);
            dev.waker.as_ref().unwrap().wake();
        }
        let err = failed
            .recv_timeout(Duration::from_secs(1))
            .expect("the failure reached on_error within a second");
        assert!(err.contains("cannot watch fd"), "{err}");
        // The loop has ended: its thread joins.
        thread.join().unwrap();
    }

    #[test]
    fn event_loop_stop_ends_thread() {
        let el = EventLoop::new().unwrap();
        let handle = el.handle();
        let thread = el.spawn(|e| panic!("event loop failed: {e}")).unwrap();
        handle.stop();
        thread.join().unwrap();
    }

    #[test]
    fn event_loop_paused_delivers_nothing_until_resumed() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (t, seen) = transport(ours);
        let mut el = EventLoop::new().unwrap();
        el.add_transport(t).unwrap();
        let handle = el.handle();
        let thread = el.spawn(|e| panic!("event loop failed: {e}")).unwrap();
        handle.pause();
        // Whatever the loop saw before the hold (the first writable edge, the
        // pause's own wake) is out by now.
        while seen.recv_timeout(Duration::from_millis(50)).is_ok() {}
        theirs.write_all(b"held").unwrap();
        assert!(
            seen.recv_timeout(Duration::from_millis(200)).is_err(),
            "a held loop served a device"
        );
        handle.resume();
        loop {
            if next(&seen) == "7: held" {
                break;
            }
        }
        handle.stop();
        thread.join().unwrap();
    }

    #[test]
    fn event_loop_stop_ends_a_held_loop() {
        let el = EventLoop::new().unwrap();
        let handle = el.handle();
        let thread = el.spawn(|e| panic!("event loop failed: {e}")).unwrap();
        handle.pause();
        handle.stop();
        thread.join().unwrap();
    }

    #[test]
    fn event_loop_runs_a_task_on_its_own_thread_and_refuses_once_ended() {
        let el = EventLoop::new().unwrap();
        let handle = el.handle();
        let thread = el.spawn(|e| panic!("event loop failed: {e}")).unwrap();
        let name = handle.run_on_loop(|| std::thread::current().name().map(str::to_owned));
        assert_eq!(name, Some(Some("sm-devices".to_string())));
        handle.stop();
        thread.join().unwrap();
        assert_eq!(handle.run_on_loop(|| 1), None, "an ended loop ran a task");
    }
}
