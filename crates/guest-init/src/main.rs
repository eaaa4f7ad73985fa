//! supermachine's guest PID 1: a static binary that the kernel starts from the
//! product-built initramfs.
//!
//! It mounts the pseudo filesystems, loads the kernel modules listed in
//! `/lib/modules/supermachine.order`, prints the ready marker
//! `supermachine: guest-init ready (cpus=N)`, then reports an exit status to the
//! VMM and powers the VM off.
//!
//! Options come from the kernel command line (`/proc/cmdline`, see
//! [`agent_protocol::cmdline::parse_cmdline`]):
//! - `sm.exit=N`: the status boot mode reports (u32, default 0); tests use it
//!   to prove the status path end to end.
//! - `sm.mode=container` (or `sm.run=1`): container mode ([`container`]): mount
//!   the image disk `sm.root` (default `/dev/vda`, `sm.rootfstype` erofs) under
//!   an overlayfs, run the image's process, report its status; stdio over the
//!   agent protocol on vsock with `sm.agent=vsock`, else on the console.
//!   `sm.hostname=NAME` sets the hostname. docs/agent-protocol.md has the
//!   whole host contract.
//!
//! PID 1 must never exit (the kernel panics when it does): every failure is
//! printed with the `supermachine: guest-init:` prefix, turns the reported
//! status into [`STATUS_INIT_FAILED`] (125 in container mode, as docker), and
//! the VM is still powered off. A panic does the same through the panic hook.
//!
//! Depends only on `libc` and `agent-protocol`. One thread, and in container
//! mode the published ports' forwarding threads (`forward`) and one thread
//! per exec'd process (`exec`), which never panic; the main thread reaps
//! every child and hands an exec'd one's status to its thread.

#[cfg(target_os = "linux")]
mod agent;
mod config;
#[cfg(target_os = "linux")]
mod container;
#[cfg(target_os = "linux")]
mod exec;
#[cfg(target_os = "linux")]
mod forward;
#[cfg(target_os = "linux")]
mod sys;
mod user;

/// Status reported when a step of guest-init itself failed or it panicked.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const STATUS_INIT_FAILED: u32 = 1;

/// Counts CPUs in a kernel CPU list such as `0-3,6,8-9` (the format of
/// `/sys/devices/system/cpu/online`, Documentation/admin-guide/cputopology.rst).
/// Returns `None` for malformed input.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn count_cpu_list(list: &str) -> Option<u32> {
    let list = list.trim();
    if list.is_empty() {
        return Some(0);
    }
    let mut total: u32 = 0;
    for range in list.split(',') {
        let n = match range.split_once('-') {
            Some((lo, hi)) => {
                let lo: u32 = lo.parse().ok()?;
                let hi: u32 = hi.parse().ok()?;
                hi.checked_sub(lo)?.checked_add(1)?
            }
            None => {
                range.parse::<u32>().ok()?;
                1
            }
        };
        total = total.checked_add(n)?;
    }
    Some(total)
}

/// Module names from `supermachine.order`: one per line, blank lines and `#`
/// comments skipped. Names never contain a path separator (they are joined to
/// `/lib/modules/`), so such lines are returned as errors.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn module_names(order: &str) -> impl Iterator<Item = Result<&str, &str>> {
    order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            if l.contains('/') || l == "." || l == ".." {
                Err(l)
            } else {
                Ok(l)
            }
        })
}

#[cfg(target_os = "linux")]
mod pid1 {
    use super::{count_cpu_list, module_names, STATUS_INIT_FAILED};
    use crate::config::STATUS_CONTAINER_INIT_FAILED;
    use agent_protocol::cmdline::{parse_cmdline, Mode};
    use std::ffi::CStr;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// The VMM's exit-status register (x86_64): a 32-bit port write reports the
    /// guest's status before power-off. It sits in the power block's 8-port window.
    #[cfg(target_arch = "x86_64")]
    const STATUS_PORT_BASE: u16 = agent_protocol::power::X86_64_PORT_BASE;
    #[cfg(target_arch = "x86_64")]
    const STATUS_PORT: u16 = agent_protocol::power::X86_64_EXIT_STATUS_PORT;

    const MODULES_DIR: &str = "/lib/modules";
    const ORDER_FILE: &str = "/lib/modules/supermachine.order";

    macro_rules! fail {
        ($($arg:tt)*) => {{
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "supermachine: guest-init: ");
            let _ = writeln!(err, $($arg)*);
        }};
    }

    pub fn main() -> ! {
        // SAFETY: getpid has no preconditions.
        if unsafe { libc::getpid() } != 1 {
            // Mounting over /dev and powering off are only right inside the VM.
            fail!("must run as PID 1 inside a supermachine VM; refusing to run here");
            std::process::exit(2);
        }
        std::panic::set_hook(Box::new(|info| {
            fail!("panic: {info}");
            finish(STATUS_INIT_FAILED);
        }));

        let mut ok = true;
        ok &= mount_all();
        ensure_console_stdio();
        ok &= load_modules();

        let cpus = online_cpus();
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "supermachine: guest-init ready (cpus={cpus})");
            let _ = out.flush();
        }

        let status = match std::fs::read_to_string("/proc/cmdline") {
            Ok(cmdline) => match parse_cmdline(&cmdline) {
                Ok(opts) if opts.mode == Mode::Container => {
                    if ok {
                        crate::container::run(&opts)
                    } else {
                        STATUS_CONTAINER_INIT_FAILED
                    }
                }
                Ok(opts) if ok => opts.exit_status,
                Ok(_) => STATUS_INIT_FAILED,
                Err(bad) => {
                    fail!("bad option `{}` on the kernel command line", bad.0);
                    STATUS_INIT_FAILED
                }
            },
            Err(e) => {
                fail!("reading /proc/cmdline: {e}");
                STATUS_INIT_FAILED
            }
        };
        finish(status)
    }

    /// Mounts the filesystems every later step needs. Returns false if any failed
    /// (each failure is printed; the rest are still tried).
    fn mount_all() -> bool {
        let mounts: [(&CStr, &CStr, &CStr, libc::c_ulong); 5] = [
            (
                c"proc",
                c"/proc",
                c"proc",
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            ),
            (
                c"sysfs",
                c"/sys",
                c"sysfs",
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            ),
            (c"devtmpfs", c"/dev", c"devtmpfs", libc::MS_NOSUID),
            (
                c"tmpfs",
                c"/run",
                c"tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
            ),
            (
                c"tmpfs",
                c"/tmp",
                c"tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
            ),
        ];
        let mut ok = true;
        for (source, target, fstype, flags) in mounts {
            // SAFETY: target is a NUL-terminated path; mkdir only reads it.
            let rc = unsafe { libc::mkdir(target.as_ptr(), 0o755) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    fail!("mkdir {}: {e}", target.to_string_lossy());
                }
            }
            // SAFETY: all strings are NUL-terminated and outlive the call; data is
            // NULL, which every filesystem here accepts.
            let rc = unsafe {
                libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    flags,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // A kernel with CONFIG_DEVTMPFS_MOUNT has mounted /dev already.
                if e.raw_os_error() != Some(libc::EBUSY) {
                    fail!(
                        "mount {} on {}: {e}",
                        fstype.to_string_lossy(),
                        target.to_string_lossy()
                    );
                    ok = false;
                }
            }
        }
        ok
    }

    /// The kernel opens /dev/console as fds 0-2 for init when the initramfs has
    /// the node; if it did not (no node), open it now from devtmpfs.
    fn ensure_console_stdio() {
        // SAFETY: F_GETFD on any integer is harmless; it only reports validity.
        let valid = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
        if valid(0) && valid(1) && valid(2) {
            return;
        }
        // SAFETY: the path is NUL-terminated.
        let fd = unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if fd < 0 {
            // Nowhere to print this; the status report still works.
            return;
        }
        for target in 0..3 {
            if fd != target {
                // SAFETY: fd is an open descriptor we own; dup2 replaces target.
                unsafe { libc::dup2(fd, target) };
            }
        }
        if fd > 2 {
            // SAFETY: fd is ours and no longer needed after dup2.
            unsafe { libc::close(fd) };
        }
    }

    /// Loads the modules in `supermachine.order` in file order (the initramfs
    /// builder writes dependencies first). Returns false if any failed.
    fn load_modules() -> bool {
        let order = match std::fs::read_to_string(ORDER_FILE) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(e) => {
                fail!("reading {ORDER_FILE}: {e}");
                return false;
            }
        };
        let mut ok = true;
        let mut path = String::with_capacity(64);
        for name in module_names(&order) {
            let name = match name {
                Ok(n) => n,
                Err(bad) => {
                    fail!("bad module name `{bad}` in {ORDER_FILE}");
                    ok = false;
                    continue;
                }
            };
            path.clear();
            path.push_str(MODULES_DIR);
            path.push('/');
            path.push_str(name);
            path.push_str(".ko");
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    fail!("opening {path}: {e}");
                    ok = false;
                    continue;
                }
            };
            // SAFETY: finit_module(2) takes an open fd, a NUL-terminated parameter
            // string and flags; the fd stays open for the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_finit_module,
                    file.as_raw_fd(),
                    c"".as_ptr(),
                    0 as libc::c_int,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    fail!("loading module {name}: {e}");
                    ok = false;
                }
            }
        }
        ok
    }

    fn online_cpus() -> u32 {
        match std::fs::read_to_string("/sys/devices/system/cpu/online") {
            Ok(list) => count_cpu_list(&list).unwrap_or_else(|| {
                fail!("cannot parse online CPU list `{}`", list.trim());
                0
            }),
            Err(e) => {
                fail!("reading /sys/devices/system/cpu/online: {e}");
                0
            }
        }
    }

    /// Reports `status` to the VMM and powers off. Never returns: PID 1 exiting
    /// would panic the kernel.
    pub fn finish(status: u32) -> ! {
        report_status(status);
        quiesce_network();
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        // SAFETY: reboot(2) with a valid command; as PID 1 we hold CAP_SYS_BOOT.
        // On success it does not return.
        let rc = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
        if rc != 0 {
            fail!("power off: {}", std::io::Error::last_os_error());
        }
        loop {
            // SAFETY: pause has no preconditions; it only sleeps.
            unsafe { libc::pause() };
        }
    }

    /// Takes every interface but loopback down before the kernel's shutdown
    /// path runs, as a distribution's shutdown does. Debian's 6.1 kernel breaks
    /// each virtqueue in device_shutdown(); a virtio-net NAPI poll that runs
    /// after that, with transmit buffers completed but not yet reclaimed, spins
    /// forever in virtnet_poll_cleantx (fixed upstream by 0d0eff39ceb3, not in
    /// 6.1). Seen here as a ksoftirqd soft lockup after TCP traffic; a down
    /// interface has its NAPI disabled, so nothing polls the broken queue.
    fn quiesce_network() {
        let names = match crate::sys::interface_names() {
            Ok(n) => n,
            Err(e) => {
                fail!("listing network interfaces: {e}");
                return;
            }
        };
        for name in names.iter().filter(|n| n.as_str() != "lo") {
            if let Err(e) = crate::sys::interface_down(name) {
                fail!("taking {name} down: {e}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn report_status(status: u32) {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        // CONFIG_X86_IOPL_IOPERM=y in the guest kernel; there is no /dev/port.
        if unsafe { libc::ioperm(STATUS_PORT_BASE as libc::c_ulong, 8, 1) } != 0 {
            fail!(
                "ioperm({STATUS_PORT_BASE:#x}): {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: ioperm above granted access to the power block's 8 ports; the write
        // goes to the VMM's exit-status register and touches no memory.
        unsafe {
            std::arch::asm!(
                "out dx, eax",
                in("dx") STATUS_PORT,
                in("eax") status,
                options(nomem, nostack, preserves_flags)
            );
        }
    }

    /// The VMM's exit-status register (aarch64): in the power block the runner maps
    /// at `agent_protocol::power::AARCH64_MMIO_BASE`.
    /// arm64 has no port I/O, so it is reached through /dev/mem: the guest kernel has
    /// CONFIG_DEVMEM=y, and STRICT_DEVMEM lets root map a page that is neither RAM nor
    /// claimed by a driver (arm64 `devmem_is_allowed`), which this one is not: the
    /// device tree does not describe it.
    #[cfg(target_arch = "aarch64")]
    const STATUS_MMIO_PAGE: libc::off_t = agent_protocol::power::AARCH64_MMIO_BASE as libc::off_t;
    #[cfg(target_arch = "aarch64")]
    const STATUS_MMIO_OFFSET: usize = agent_protocol::power::EXIT_STATUS_OFFSET as usize;

    #[cfg(target_arch = "aarch64")]
    fn report_status(status: u32) {
        // SAFETY: open(2) with a NUL-terminated path and plain flags.
        let fd = unsafe {
            libc::open(
                c"/dev/mem".as_ptr(),
                libc::O_RDWR | libc::O_SYNC | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            fail!("open /dev/mem: {}", std::io::Error::last_os_error());
            return;
        }
        // 4 KiB: the register page is 64 KiB aligned, so this works for any guest
        // page size the kernel may use (mmap rounds the length up to a page).
        let len = 4096;
        // SAFETY: a fresh shared mapping of /dev/mem at a page-aligned offset; no
        // existing memory is affected.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                STATUS_MMIO_PAGE,
            )
        };
        // SAFETY: fd is ours; the mapping stays valid after close.
        unsafe { libc::close(fd) };
        if page == libc::MAP_FAILED {
            fail!(
                "mmap /dev/mem at {STATUS_MMIO_PAGE:#x}: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: `page` maps `len` bytes, the register's 4 aligned bytes lie inside;
        // it is device memory nothing else in this process references. A single STR
        // with no writeback is used so the hypervisor gets a data abort with a valid
        // instruction syndrome (Arm ARM D17.2.40, ISV) it can emulate.
        unsafe {
            let reg = page.cast::<u8>().add(STATUS_MMIO_OFFSET);
            std::arch::asm!(
                "str {v:w}, [{p}]",
                v = in(reg) status,
                p = in(reg) reg,
                options(nostack, preserves_flags)
            );
            libc::munmap(page, len);
        }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn report_status(status: u32) {
        fail!("cannot report status {status}: no status register on this architecture");
    }
}

#[cfg(target_os = "linux")]
fn main() {
    pid1::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("supermachine: guest-init: runs only inside a Linux guest");
    std::process::exit(2);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn count_cpu_list_ranges_and_singles_counted() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(count_cpu_list(""), Some(0));
    }

    #[test]
    fn count_cpu_list_malformed_none() {
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a"), None);
        assert_eq!(count_cpu_list("0-"), None);
        assert_eq!(count_cpu_list("0,,1"), None);
        assert_eq!(count_cpu_list("0-4294967295"), None);
    }

    #[test]
    fn module_names_skips_blanks_and_rejects_paths() {
        let names: Vec<_> = module_names("virtio\n\n# c\n  virtio_ring \n../x\n..\n").collect();
        assert_eq!(
            names,
            vec![Ok("virtio"), Ok("virtio_ring"), Err("../x"), Err("..")]
        );
    }
}
