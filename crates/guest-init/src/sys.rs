//! Thin safe wrappers over the few Linux calls container mode needs. Every
//! wrapper turns a `-1` into the OS error; callers add context.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `mount(2)`; `data` is the filesystem's option string.
pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call,
    // or NULL where mount(2) allows it (fstype for MS_MOVE, data).
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<libc::c_void>()),
        )
    };
    check(rc).map(drop)
}

/// `chroot(2)`.
pub fn chroot(path: &str) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: path is NUL-terminated and outlives the call.
    check(unsafe { libc::chroot(path.as_ptr()) }).map(drop)
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the
    // call; the kernel copies them.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// Waits until `path` exists (a device node that devtmpfs creates when the
/// driver's probe finishes, asynchronously after the module load).
pub fn wait_for_path(path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if std::path::Path::new(path).exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a writable array of two ints, as pipe2 requires.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd the caller holds open; no memory passed.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// A pseudo-terminal pair (master, slave) with the given size.
pub fn openpty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: master and slave are writable ints; name and termios may be NULL;
    // ws is a valid winsize read during the call.
    check(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    })?;
    // SAFETY: openpty succeeded: both fds are open and ours alone.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [m.as_raw_fd(), s.as_raw_fd()] {
        // SAFETY: F_SETFD on an fd we own.
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    }
    Ok((m, s))
}

/// Sets a terminal's size (`TIOCSWINSZ`).
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Sets the wall clock.
pub fn set_realtime(unix_nanos: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as _,
        tv_nsec: (unix_nanos % 1_000_000_000) as _,
    };
    // SAFETY: ts is a valid timespec read during the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// `RNDADDENTROPY` (include/uapi/linux/random.h): `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Mixes `bytes` into the kernel RNG and credits them (the host's randomness
/// is trusted: it is the hypervisor), falling back to an uncredited write to
/// `/dev/urandom` when the ioctl is refused, then reseeds the CRNG from them.
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let bytes = &bytes[..bytes.len().min(4096)];
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; },
    // built in u32 words so the buffer is aligned for the struct.
    let words = bytes.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (bytes.len() * 8) as u32;
    info[1] = bytes.len() as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: info is a properly aligned rand_pool_info whose buf_size bytes of
    // buffer follow the header inside the allocation; the kernel only reads it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        file.write_all(bytes)?;
    }
    // The crediting alone leaves the CRNG's key as it was until its next
    // scheduled reseed: two clones of one snapshot would go on producing the
    // same bytes. Reseed now from the pool the host's bytes just went into.
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG as _) }).map(drop)
}

/// `RNDRESEEDCRNG` (include/uapi/linux/random.h): `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// A socket for the interface ioctls (netdevice(7): any AF_INET socket).
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket succeeded; we own the fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming interface `name` (at most IFNAMSIZ - 1 bytes, no NUL).
fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value (and leaves
    // the name NUL-terminated after the copy below).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// A `struct sockaddr` holding an AF_INET address (the layout of
/// `struct sockaddr_in`: port, then the address, both in network order).
fn sockaddr_v4(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr is plain old data; all zeroes is a valid value.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_INET as libc::sa_family_t;
    // sa_data[0..2] is sin_port (0), sa_data[2..6] is sin_addr.
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    sa
}

/// Sets (`up`) or clears IFF_UP on interface `name`.
fn set_interface_up(name: &str, up: bool) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(name)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of the named interface in req.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) })?;
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS wrote.
    let flags = unsafe { &mut req.ifr_ifru.ifru_flags };
    if up {
        *flags |= libc::IFF_UP as libc::c_short;
    } else {
        *flags &= !(libc::IFF_UP as libc::c_short);
    }
    // SAFETY: SIOCSIFFLAGS reads req, which names the interface with its flags.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) }).map(drop)
}

/// Sets IFF_UP on interface `name`.
pub fn interface_up(name: &str) -> io::Result<()> {
    set_interface_up(name, true)
}

/// Clears IFF_UP on interface `name` (as `ip link set NAME down`).
pub fn interface_down(name: &str) -> io::Result<()> {
    set_interface_up(name, false)
}

/// The names of the network interfaces (if_nameindex(3)).
pub fn interface_names() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex has no preconditions; NULL means failure (errno set).
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut entry = list;
    loop {
        // SAFETY: the array ends with an entry whose index is 0 and name NULL;
        // `entry` never passes it.
        let e = unsafe { &*entry };
        if e.if_index == 0 || e.if_name.is_null() {
            break;
        }
        // SAFETY: if_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(e.if_name) };
        names.push(name.to_string_lossy().into_owned());
        // SAFETY: this entry was not the terminator, so the next one exists.
        entry = unsafe { entry.add(1) };
    }
    // SAFETY: `list` came from if_nameindex and is freed once.
    unsafe { libc::if_freenameindex(list) };
    Ok(names)
}

/// Brings the loopback interface up (a fresh kernel has it down, and programs
/// binding 127.0.0.1 need it).
pub fn loopback_up() -> io::Result<()> {
    interface_up("lo")
}

/// Gives interface `name` the IPv4 address `addr` with `netmask`
/// (SIOCSIFADDR, then SIOCSIFNETMASK: setting the address resets the mask to
/// the address's class, netdevice(7)).
pub fn set_ipv4(
    name: &str,
    addr: std::net::Ipv4Addr,
    netmask: std::net::Ipv4Addr,
) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    // SAFETY: SIOCSIFADDR reads req: the interface name and an AF_INET sockaddr.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR as _, &req) })
        .map_err(|e| io::Error::new(e.kind(), format!("setting address {addr}: {e}")))?;
    // The netmask travels in the same union member (ifru_netmask aliases it).
    req.ifr_ifru.ifru_addr = sockaddr_v4(netmask);
    // SAFETY: SIOCSIFNETMASK reads req: the interface name and an AF_INET mask.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK as _, &req) })
        .map_err(|e| io::Error::new(e.kind(), format!("setting netmask {netmask}: {e}")))
        .map(drop)
}

/// `struct rtentry` of include/uapi/linux/route.h (libc declares it for musl
/// only; guest-init's pure parts are also built and tested on glibc hosts).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// `RTF_UP | RTF_GATEWAY` (include/uapi/linux/route.h).
const RTF_UP_GATEWAY: libc::c_ushort = 0x0001 | 0x0002;

/// Adds the IPv4 default route via `gateway` (SIOCADDRT, route(7) style: the
/// kernel picks the interface whose subnet holds the gateway, so that
/// interface must be up and addressed first).
pub fn add_default_route(gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let any = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    let rt = RtEntry {
        rt_pad1: 0,
        rt_dst: any,
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: any,
        rt_flags: RTF_UP_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads one struct rtentry, which `rt` is laid out as; its
    // pointers are NULL, which the kernel accepts (no device forced).
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT as _, &rt) }).map(drop)
}

/// Blocks `signals` for this thread and returns a non-blocking signalfd
/// reporting them (signal(7): PID 1 gets only signals it handles or blocks).
pub fn signalfd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: set is a valid sigset_t and s a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: set is initialised; the old mask is not wanted.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // SAFETY: -1 asks for a new signalfd for the initialised set.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: signalfd succeeded; the fd is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads the next pending signal number from a non-blocking signalfd.
pub fn read_signal(fd: RawFd) -> Option<u32> {
    // SAFETY: signalfd_siginfo is plain data; zeroes are valid.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: info is a writable buffer of exactly `size` bytes.
    let n = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    (n == size as isize).then_some(info.ssi_signo)
}

/// `kill(2)`; errors (no such process) are ignored by callers on purpose.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory arguments.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// The pid of a child that has exited, left a zombie (`waitid` with
/// `WNOWAIT`): who reaps it is decided before it is reaped.
pub fn exited_child() -> Option<libc::pid_t> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is a writable siginfo_t.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid succeeded, so si_pid is the field it set (0: none).
    let pid = unsafe { info.si_pid() };
    (rc == 0 && pid > 0).then_some(pid)
}

/// Reaps `pid` if it is still there: its raw wait status.
pub fn reap(pid: libc::pid_t) -> Option<i32> {
    let mut status: libc::c_int = 0;
    // SAFETY: status is a writable int.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (rc == pid).then_some(status)
}

/// `poll(2)` over `fds` with a timeout; EINTR counts as "nothing ready".
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: fds points at fds.len() valid pollfd structs.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    Ok(())
}

/// `read(2)` into `buf`; `Ok(0)` is end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is writable for buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `write(2)` from `buf`; returns the bytes written.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is readable for buf.len() bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes all of `buf` to a blocking fd (the console), dropping it on error.
pub fn write_all_lossy(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(0) => return,
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn rtentry_layout_matches_the_kernels() {
        // include/uapi/linux/route.h on LP64: 8 + 3*16 + 2+2(+4 pad) + 8 + 8 +
        // 2(+6 pad) + 8 + 8 + 8 + 2(+6 pad).
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
    }

    #[test]
    fn sockaddr_v4_has_sockaddr_in_layout() {
        let sa = sockaddr_v4(Ipv4Addr::new(10, 0, 2, 15));
        // SAFETY: sockaddr and sockaddr_in are both 16 bytes of plain data.
        let sin: libc::sockaddr_in = unsafe { std::mem::transmute(sa) };
        assert_eq!(sin.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(sin.sin_port, 0);
        assert_eq!(u32::from_be(sin.sin_addr.s_addr), 0x0a00_020f);
    }

    #[test]
    fn ifreq_for_rejects_long_or_empty_names() {
        assert!(ifreq_for("").is_err());
        assert!(ifreq_for("sixteen-chars-xx").is_err());
        assert!(ifreq_for("a\0b").is_err());
        assert!(ifreq_for("fifteen-chars-x").is_ok());
    }

    /// The ioctls for real, in a fresh network namespace on this thread (root
    /// only): address, netmask, up, default route, read back from /proc.
    #[test]
    fn interfaces_are_listed_and_taken_down_in_a_private_netns() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        let flags = |name: &str| -> Result<libc::c_short, String> {
            let sock = inet_socket().map_err(|e| e.to_string())?;
            let mut req = ifreq_for(name).map_err(|e| e.to_string())?;
            // SAFETY: SIOCGIFFLAGS fills the flags of the named interface in req.
            let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) };
            if rc != 0 {
                return Err(format!("SIOCGIFFLAGS: {}", io::Error::last_os_error()));
            }
            // SAFETY: the union member SIOCGIFFLAGS wrote.
            Ok(unsafe { req.ifr_ifru.ifru_flags })
        };
        let t = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread (which ends
            // with the test) into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", io::Error::last_os_error()));
            }
            // A new namespace holds exactly `lo`, down.
            let names = interface_names().map_err(|e| e.to_string())?;
            interface_up("lo").map_err(|e| e.to_string())?;
            let up = flags("lo")?;
            interface_down("lo").map_err(|e| e.to_string())?;
            let down = flags("lo")?;
            let missing = interface_down("nosuchif0").is_err();
            Ok((names, up, down, missing))
        });
        let (names, up, down, missing) = match t.join().unwrap() {
            Ok(r) => r,
            Err(e) if e.starts_with("unshare") => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(names, vec!["lo".to_string()]);
        let iff_up = libc::IFF_UP as libc::c_short;
        assert_eq!(up & iff_up, iff_up, "lo is up after interface_up");
        assert_eq!(down & iff_up, 0, "lo is down after interface_down");
        assert!(missing, "taking a missing interface down is an error");
    }

    #[test]
    fn set_ipv4_up_and_default_route_in_a_private_netns() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        let t = std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread (which ends
            // with the test) into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", io::Error::last_os_error()));
            }
            // Bringing lo up gives it 127.0.0.1/8; the address under test is a
            // new one (label lo:1), as eth0's is in the guest.
            interface_up("lo").map_err(|e| e.to_string())?;
            set_ipv4(
                "lo:1",
                Ipv4Addr::new(10, 9, 8, 7),
                Ipv4Addr::new(255, 255, 255, 0),
            )
            .map_err(|e| e.to_string())?;
            add_default_route(Ipv4Addr::new(10, 9, 8, 1)).map_err(|e| e.to_string())?;
            // The netmask as the kernel kept it (lo's subnet route goes to the
            // local table only, so /proc/net/route does not show it).
            let sock = inet_socket().map_err(|e| e.to_string())?;
            let mut req = ifreq_for("lo:1").map_err(|e| e.to_string())?;
            // SAFETY: SIOCGIFNETMASK writes the mask into req's union.
            let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFNETMASK as _, &mut req) };
            if rc != 0 {
                return Err(format!("SIOCGIFNETMASK: {}", io::Error::last_os_error()));
            }
            // SAFETY: SIOCGIFNETMASK filled ifru_netmask with an AF_INET sockaddr.
            let sa = unsafe { req.ifr_ifru.ifru_netmask };
            let b: Vec<u8> = sa.sa_data[2..6].iter().map(|&c| c as u8).collect();
            let mask = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            std::fs::read_to_string("/proc/thread-self/net/route")
                .map(|r| (r, mask))
                .map_err(|e| e.to_string())
        });
        let (route, mask_seen) = match t.join().unwrap() {
            Ok(r) => r,
            Err(e) if e.starts_with("unshare") => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        // /proc/net/route: Iface Destination Gateway Flags ... Mask, hex in host order.
        let gw = format!("{:08X}", u32::from_ne_bytes([10, 9, 8, 1]));
        let default = route
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("00000000"))
            .unwrap_or_else(|| panic!("no default route in:\n{route}"));
        let f: Vec<&str> = default.split_whitespace().collect();
        assert_eq!((f[0], f[2], f[3]), ("lo", gw.as_str(), "0003"), "{route}");
        assert_eq!(mask_seen, Ipv4Addr::new(255, 255, 255, 0));
    }
}
