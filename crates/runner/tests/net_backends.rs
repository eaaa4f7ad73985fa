//! The virtio-net host backends against the real things: Debian's `passt` and a
//! kernel TAP interface, each inside a network namespace the test creates (its
//! addresses never leave it). The test plays the guest: it writes Ethernet
//! frames into the backend and checks what comes back and what reaches host
//! sockets.
//!
//! Needs root (for the namespace and the TAP device) and, for the passt test,
//! the `passt` program; without them each test says why and returns.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::RawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use devices::virtio::net::{NetBackend, MAX_FRAME_LEN};
use runner::resources::GuestIpConfig;

const GUEST_MAC: [u8; 6] = [0x02, 0x73, 0x6d, 0x00, 0x00, 0x09];

/// Runs `f` on a thread of its own in a fresh network namespace (`unshare`
/// affects only the calling thread; processes it spawns inherit it).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) only changes this thread's namespace
        // membership; no memory is involved.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            println!(
                "skipped: cannot create a network namespace ({}); needs root",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(f())
    })
    .join()
    .unwrap()
}

fn ip(args: &str) {
    let st = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run ip (iproute2)");
    assert!(st.success(), "ip {args} failed");
}

fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    n > 0
}

/// Receives frames until `want` accepts one or `timeout` passes.
fn recv_until(
    be: &mut dyn NetBackend,
    timeout: Duration,
    mut want: impl FnMut(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    while Instant::now() < deadline {
        while let Some(n) = be.recv(&mut buf).expect("backend recv") {
            if want(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
        wait_readable(be.fd(), Duration::from_millis(50));
    }
    None
}

fn arp_request(src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&src_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// An ARP reply telling `asked`'s MAC, if `f` is one.
fn arp_reply_for(f: &[u8], asked: Ipv4Addr) -> Option<[u8; 6]> {
    (f.len() >= 42
        && f[12..14] == [0x08, 0x06]
        && f[20..22] == [0, 2]
        && f[28..32] == asked.octets())
    .then(|| f[22..28].try_into().unwrap())
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/TCP SYN from the guest.
fn tcp_syn(dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&1000u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.extend_from_slice(&[0x60, 0x02]); // 24-byte header, SYN
    tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    tcp.extend_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let c = checksum(&pseudo, 0);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// A TCP segment to the guest's `port` with SYN and ACK set.
fn is_syn_ack_to(f: &[u8], port: u16) -> bool {
    f.len() >= 54
        && f[12..14] == [0x08, 0x00]
        && f[23] == 6
        && f[36..38] == port.to_be_bytes()
        && f[47] & 0x12 == 0x12
}

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

/// In a fresh network namespace with an uplink for passt to copy: starts passt
/// (`host_loopback` as given), checks it answers ARP for the gateway, sends a SYN
/// to the gateway's address at a port a listener on the namespace's 127.0.0.1
/// holds, and returns whether that listener got the connection (and passt the
/// SYN-ACK back to the guest). `None`: no namespace here (printed why).
fn gateway_syn_reaches_host_loopback(host_loopback: bool) -> Option<bool> {
    in_new_netns(move || {
        // An "uplink" for passt to copy addresses from: a TAP nobody attaches,
        // with the default route, as a host's eth0 would have.
        ip("link set lo up");
        ip("tuntap add smup0 mode tap");
        ip("addr add 10.77.0.1/24 dev smup0");
        ip("link set smup0 up");
        ip("route add default via 10.77.0.254 dev smup0");
        let route = runner::net::host_route().expect("host route in the namespace");
        assert_eq!(route.iface, "smup0");
        assert_eq!(route.gateway, Ipv4Addr::new(10, 77, 0, 254));
        assert_eq!(
            (route.addr, route.prefix),
            (Ipv4Addr::new(10, 77, 0, 1), 24)
        );
        let guest: GuestIpConfig = runner::net::guest_config_from(&route, None);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();

        let mut passt = runner::net::Passt::start(Some(guest), host_loopback).expect("start passt");
        // ARP for the gateway: passt answers for it.
        passt.send(&arp_request(guest.addr, route.gateway)).unwrap();
        let reply = recv_until(&mut passt, Duration::from_secs(5), |f| {
            arp_reply_for(f, route.gateway).is_some()
        })
        .expect("passt answered the ARP request for the gateway");
        let gw_mac = arp_reply_for(&reply, route.gateway).unwrap();

        assert!(passt
            .send(&tcp_syn(gw_mac, guest.addr, route.gateway, 40000, port))
            .unwrap());
        let deadline = Instant::now() + Duration::from_secs(3);
        let accepted = loop {
            match listener.accept() {
                Ok((_, peer)) => break Some(peer),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => break None,
            }
        };
        if accepted.is_some() {
            let syn_ack = recv_until(&mut passt, Duration::from_secs(5), |f| {
                is_syn_ack_to(f, 40000)
            });
            assert!(
                syn_ack.is_some(),
                "passt sent the SYN-ACK back to the guest"
            );
        }
        accepted.is_some()
    })
}

#[test]
fn passt_with_host_loopback_carries_a_tcp_connection_to_host_loopback() {
    if !have("passt") {
        println!("skipped: passt is not installed (Debian: apt install passt)");
        return;
    }
    if let Some(reached) = gateway_syn_reaches_host_loopback(true) {
        assert!(reached, "the host listener saw the guest's connection");
    }
}

#[test]
fn passt_by_default_keeps_host_loopback_out_of_reach() {
    if !have("passt") {
        println!("skipped: passt is not installed (Debian: apt install passt)");
        return;
    }
    if let Some(reached) = gateway_syn_reaches_host_loopback(false) {
        assert!(
            !reached,
            "a guest reached a service on the host's 127.0.0.1 through the gateway address"
        );
    }
}

#[test]
fn tap_backend_exchanges_frames_with_the_kernel() {
    let result = in_new_netns(|| {
        ip("link set lo up");
        let mut tap = match runner::net::Tap::open("smtap0") {
            Ok(t) => t,
            Err(e) => {
                println!("skipped: {e}");
                return;
            }
        };
        ip("addr add 10.78.0.1/24 dev smtap0");
        ip("link set smtap0 up");
        let host = Ipv4Addr::new(10, 78, 0, 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        // The kernel may drop the first frames while the link comes up.
        let mut reply = None;
        while reply.is_none() && Instant::now() < deadline {
            assert!(tap
                .send(&arp_request(Ipv4Addr::new(10, 78, 0, 2), host))
                .unwrap());
            reply = recv_until(&mut tap, Duration::from_millis(500), |f| {
                arp_reply_for(f, host).is_some()
            });
        }
        let reply = reply.expect("the kernel answered the ARP request through the TAP");
        assert_eq!(&reply[..6], &GUEST_MAC, "addressed to the guest");
    });
    let _ = result;
}

#[test]
fn tap_open_bad_name_is_a_clear_error() {
    let e = runner::net::Tap::open("a/b/c/d/e/f/g/h/i/j").unwrap_err();
    assert!(e.to_string().contains("TAP interface"), "{e}");
}

#[test]
fn passt_that_dies_mid_run_reports_how_it_ended() {
    if !have("passt") {
        println!("skipped: passt is not installed (Debian: apt install passt)");
        return;
    }
    let result = in_new_netns(|| {
        ip("link set lo up");
        ip("tuntap add smup1 mode tap");
        ip("addr add 10.79.0.1/24 dev smup1");
        ip("link set smup1 up");
        ip("route add default via 10.79.0.254 dev smup1");
        let route = runner::net::host_route().expect("host route in the namespace");
        let guest: GuestIpConfig = runner::net::guest_config_from(&route, None);
        let mut passt = runner::net::Passt::start(Some(guest), false).expect("start passt");
        let pid = passt.pid() as libc::pid_t;
        // SAFETY: kill(2) on the passt child this test started; no memory involved.
        let killed = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(killed, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let err = loop {
            match passt.recv(&mut buf) {
                Err(e) => break e,
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(_) => panic!("the backend did not notice passt dying"),
            }
        };
        assert!(err.to_string().contains("passt"), "{err}");
        let status = passt.exit_status().expect("passt's end is known");
        assert!(status.contains("signal: 9"), "{status}");
    });
    let _ = result;
}
