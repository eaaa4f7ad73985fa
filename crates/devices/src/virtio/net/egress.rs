//! The egress policy: which destinations a guest's frames may reach, enforced
//! on the frames between virtio-net and its backend (passt or TAP), so the
//! guest cannot step around it and a denied destination never sees a packet.
//!
//! A [`Policy`] is a list of deny rules and a list of allow rules, each
//! `CIDR[:PORT[-PORT]]` (IPv4 or IPv6; an address alone is a /32 or /128). A
//! destination a deny rule matches is refused; else, when there are allow
//! rules, only what one of them matches passes; with none, everything does.
//!
//! The [`Filter`] looks at each frame the guest sends. ARP, IPv6 neighbour
//! discovery and multicast listener messages always pass (the guest's link
//! needs them). A TCP, UDP or ICMP packet to a destination the policy allows
//! passes, and its flow (protocol, addresses, ports) is remembered in a table
//! of at most [`MAX_FLOWS`] flows (the oldest go first), so a policy change
//! applies to new connections while the ones it allowed carry on. A denied
//! packet is dropped and counted; the guest is answered at once so it fails
//! fast: a TCP SYN gets a RST, a UDP datagram or an ICMP echo an ICMP
//! "administratively prohibited" unreachable. Other IP protocols are dropped
//! once any rule exists; frames that do not parse are dropped.
//!
//! Everything here reads guest-controlled bytes: every offset is checked, a
//! frame that is too short or inconsistent is dropped, never a panic.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The flow table's bound.
pub const MAX_FLOWS: usize = 16_384;

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A rule that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress rule {rule:?}: {why} (use CIDR[:PORT[-PORT]], [IPV6-CIDR]:PORT or dns)")]
pub struct RuleError {
    /// The rule as given.
    pub rule: String,
    /// What is wrong.
    pub why: String,
}

/// One `CIDR[:PORT[-PORT]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    addr: IpAddr,
    prefix: u8,
    /// Inclusive; `None`: every port (and protocols without ports).
    ports: Option<(u16, u16)>,
}

impl Rule {
    /// A rule for one address and port (the resolver, for `dns`).
    pub fn host_port(addr: IpAddr, port: u16) -> Self {
        Self {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
            ports: Some((port, port)),
        }
    }

    fn matches(&self, dst: IpAddr, port: Option<u16>) -> bool {
        let in_net = match (self.addr, dst) {
            (IpAddr::V4(net), IpAddr::V4(d)) => prefix_eq(&net.octets(), &d.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(d)) => prefix_eq(&net.octets(), &d.octets(), self.prefix),
            _ => false,
        };
        in_net
            && match (self.ports, port) {
                (None, _) => true,
                (Some((lo, hi)), Some(p)) => (lo..=hi).contains(&p),
                (Some(_), None) => false,
            }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a.get(..full) != b.get(..full) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(full), b.get(full)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, RuleError> {
        let err = |why: &str| RuleError {
            rule: s.to_string(),
            why: why.to_string(),
        };
        // `[v6/len]:ports`, `v6/len` (no port: more than one ':'), `v4/len[:ports]`.
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, tail) = rest.split_once(']').ok_or_else(|| err("no closing ']'"))?;
            match tail {
                "" => (net, None),
                t => (
                    net,
                    Some(t.strip_prefix(':').ok_or_else(|| err("':' after ']'"))?),
                ),
            }
        } else if s.matches(':').count() > 1 {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (s, None),
            }
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| err("the prefix length is out of range"))?,
        };
        let port = |p: &str| p.parse::<u16>().map_err(|_| err("not a port number"));
        let ports = match ports {
            None => None,
            Some(p) => {
                let (lo, hi) = match p.split_once('-') {
                    Some((a, b)) => (port(a)?, port(b)?),
                    None => (port(p)?, port(p)?),
                };
                if lo > hi {
                    return Err(err("the port range is backwards"));
                }
                Some((lo, hi))
            }
        };
        Ok(Self {
            addr,
            prefix,
            ports,
        })
    }
}

/// What the guest may reach (see the module's description).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

impl Policy {
    /// Everything allowed: no rules.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a packet to `dst` (port `port`, if its protocol has ports) is
    /// allowed.
    pub fn allows(&self, dst: IpAddr, port: Option<u16>) -> bool {
        if self.deny.iter().any(|r| r.matches(dst, port)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|r| r.matches(dst, port))
    }
}

/// Denial counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressStats {
    /// Packets let through.
    pub passed: u64,
    /// Packets refused (each answered or dropped).
    pub denied: u64,
    /// Flows in the table now.
    pub flows: u64,
}

/// What happens to one frame the guest sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To the backend.
    Pass,
    /// Dropped.
    Drop,
    /// Dropped, and this frame goes back to the guest (a RST or an ICMP
    /// unreachable).
    Answer(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Flow {
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

/// The policy and the flows it let through.
#[derive(Debug, Default)]
pub struct Filter {
    policy: Policy,
    flows: HashMap<Flow, u64>,
    /// Insertion order (with the insertion's sequence number, to skip flows
    /// seen again since).
    order: VecDeque<(Flow, u64)>,
    seq: u64,
    stats: EgressStats,
}

/// A parsed IP packet: what the policy and the answers need.
struct Packet<'a> {
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// The IP header and everything after it.
    ip: &'a [u8],
    /// The L4 header and payload (empty for a non-first fragment).
    l4: &'a [u8],
    /// A fragment that is not the first: no ports.
    later_fragment: bool,
}

impl Filter {
    /// A filter enforcing `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy: new flows are judged by it; the flows the old
    /// one let through carry on.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn stats(&self) -> EgressStats {
        EgressStats {
            flows: self.flows.len() as u64,
            ..self.stats
        }
    }

    /// Judges one Ethernet frame from the guest.
    pub fn check(&mut self, frame: &[u8]) -> Verdict {
        if self.policy.is_open() {
            self.stats.passed += 1;
            return Verdict::Pass;
        }
        let v = self.judge(frame);
        match v {
            Verdict::Pass => self.stats.passed += 1,
            Verdict::Drop | Verdict::Answer(_) => self.stats.denied += 1,
        }
        v
    }

    fn judge(&mut self, frame: &[u8]) -> Verdict {
        let Some(ethertype) = be16(frame, 12) else {
            return Verdict::Drop;
        };
        let pkt = match ethertype {
            ETHERTYPE_ARP => return Verdict::Pass,
            ETHERTYPE_IPV4 => parse_v4(&frame[ETH_HDR..]),
            ETHERTYPE_IPV6 => parse_v6(&frame[ETH_HDR..]),
            _ => None,
        };
        let Some(pkt) = pkt else {
            return Verdict::Drop;
        };
        let ports = if pkt.later_fragment {
            None
        } else {
            match pkt.proto {
                PROTO_TCP | PROTO_UDP => Some((be16(pkt.l4, 0), be16(pkt.l4, 2))),
                _ => None,
            }
        };
        if pkt.proto == PROTO_ICMPV6 && !pkt.later_fragment {
            // Router/neighbour discovery and MLD keep the link working.
            if matches!(pkt.l4.first(), Some(130..=137 | 143)) {
                return Verdict::Pass;
            }
        }
        if !matches!(pkt.proto, PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6) {
            return Verdict::Drop;
        }
        let (sport, dport) = match ports {
            Some((Some(s), Some(d))) => (s, d),
            Some(_) => return Verdict::Drop,
            None => (0, 0),
        };
        let flow = Flow {
            proto: pkt.proto,
            src: pkt.src,
            dst: pkt.dst,
            sport,
            dport,
        };
        if self.flows.contains_key(&flow) {
            return Verdict::Pass;
        }
        let port = ports.map(|_| dport);
        if self.policy.allows(pkt.dst, port) {
            self.remember(flow);
            return Verdict::Pass;
        }
        tracing::debug!(dst = %pkt.dst, port = ?port, proto = pkt.proto, "egress denied");
        match answer(frame, &pkt) {
            Some(a) => Verdict::Answer(a),
            None => Verdict::Drop,
        }
    }

    fn remember(&mut self, flow: Flow) {
        self.seq += 1;
        self.flows.insert(flow, self.seq);
        self.order.push_back((flow, self.seq));
        while self.flows.len() > MAX_FLOWS {
            let Some((old, seq)) = self.order.pop_front() else {
                break;
            };
            if self.flows.get(&old) == Some(&seq) {
                self.flows.remove(&old);
            }
        }
        // The order queue never holds more than twice the table.
        if self.order.len() > 2 * MAX_FLOWS {
            let flows = &self.flows;
            self.order.retain(|(f, s)| flows.get(f) == Some(s));
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn parse_v4(ip: &[u8]) -> Option<Packet<'_>> {
    let first = *ip.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let total = usize::from(be16(ip, 2)?);
    if ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    let ip = &ip[..total];
    let frag = be16(ip, 6)?;
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
    let later_fragment = frag & 0x1fff != 0;
    Some(Packet {
        v6: false,
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        proto: ip[9],
        ip,
        l4: if later_fragment { &[] } else { &ip[ihl..] },
        later_fragment,
    })
}

/// IPv6, walking at most 8 extension headers to the upper layer.
fn parse_v6(ip: &[u8]) -> Option<Packet<'_>> {
    if ip.first()? >> 4 != 6 {
        return None;
    }
    let payload = usize::from(be16(ip, 4)?);
    let ip = ip.get(..40 + payload)?;
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
    let mut next = ip[6];
    let mut at = 40;
    let mut later_fragment = false;
    for _ in 0..8 {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units.
            0 | 43 | 60 => {
                let len = (usize::from(*ip.get(at + 1)?) + 1) * 8;
                next = *ip.get(at)?;
                at += len;
            }
            // Fragment: 8 octets; offset in the upper 13 bits of bytes 2..4.
            44 => {
                let off = be16(ip, at + 2)? >> 3;
                later_fragment = off != 0;
                next = *ip.get(at)?;
                at += 8;
            }
            _ => break,
        }
    }
    if matches!(next, 0 | 43 | 44 | 60) || at > ip.len() {
        return None;
    }
    Some(Packet {
        v6: true,
        src: IpAddr::V6(src),
        dst: IpAddr::V6(dst),
        proto: next,
        ip,
        l4: if later_fragment { &[] } else { &ip[at..] },
        later_fragment,
    })
}

/// The internet checksum (RFC 1071) of `parts`, concatenated.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for p in parts {
        for &b in *p {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo-header of `src`, `dst`, `proto` and upper-layer `len`.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.push(0);
            p.push(proto);
            p.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => {}
    }
    p
}

/// An Ethernet frame back to the guest: `from`'s addresses swapped, an IP
/// header from `pkt.dst` to `pkt.src` carrying `proto` and `l4` (whose
/// checksum at `csum_at`, if any, is filled in over the pseudo-header).
fn reply(
    frame: &[u8],
    pkt: &Packet<'_>,
    proto: u8,
    mut l4: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    let (src, dst) = (pkt.dst, pkt.src);
    if let Some(at) = csum_at {
        let ck = checksum(&[&pseudo(src, dst, proto, l4.len()), &l4]);
        if let Some(slot) = l4.get_mut(at..at + 2) {
            slot.copy_from_slice(&ck.to_be_bytes());
        }
    }
    let mut out = Vec::with_capacity(ETH_HDR + 40 + l4.len());
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&u16::try_from(20 + l4.len()).unwrap_or(0).to_be_bytes());
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = checksum(&[&h]);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut h = [0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&u16::try_from(l4.len()).unwrap_or(0).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            out.extend_from_slice(&h);
        }
        _ => {}
    }
    out.extend_from_slice(&l4);
    out
}

/// The answer to a denied packet: a RST for a TCP SYN, an "administratively
/// prohibited" unreachable for UDP and ICMP echo requests; nothing for the
/// rest (a RST answers no RST, an error no error).
fn answer(frame: &[u8], pkt: &Packet<'_>) -> Option<Vec<u8>> {
    if pkt.later_fragment {
        return None;
    }
    match pkt.proto {
        PROTO_TCP => {
            let l4 = pkt.l4;
            let flags = *l4.get(13)?;
            if flags & TCP_SYN == 0 || flags & (TCP_RST | TCP_ACK) != 0 {
                return None;
            }
            let seq = u32::from_be_bytes(l4.get(4..8)?.try_into().ok()?);
            let data_off = usize::from(*l4.get(12)? >> 4) * 4;
            let payload = l4.len().saturating_sub(data_off);
            let ack = seq
                .wrapping_add(1)
                .wrapping_add(u32::try_from(payload).unwrap_or(0));
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(l4.get(2..4)?);
            t[2..4].copy_from_slice(l4.get(0..2)?);
            t[8..12].copy_from_slice(&ack.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = TCP_RST | TCP_ACK;
            Some(reply(frame, pkt, PROTO_TCP, t, Some(16)))
        }
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => {
            let echo_request = match pkt.proto {
                PROTO_ICMP => pkt.l4.first() == Some(&8),
                PROTO_ICMPV6 => pkt.l4.first() == Some(&128),
                _ => true,
            };
            if !echo_request {
                return None;
            }
            if pkt.v6 {
                // Type 1 code 1 (RFC 4443), as much of the packet as fits 1280.
                let keep = pkt.ip.len().min(1280 - 40 - 8);
                let mut m = vec![1u8, 1, 0, 0, 0, 0, 0, 0];
                m.extend_from_slice(&pkt.ip[..keep]);
                Some(reply(frame, pkt, PROTO_ICMPV6, m, Some(2)))
            } else {
                // Type 3 code 13 (RFC 1812): the header and 8 bytes of data.
                let ihl = usize::from(pkt.ip[0] & 0x0f) * 4;
                let keep = pkt.ip.len().min(ihl + 8);
                let mut m = vec![3u8, 13, 0, 0, 0, 0, 0, 0];
                m.extend_from_slice(&pkt.ip[..keep]);
                // ICMPv4's checksum covers the message alone, no pseudo-header.
                let c = checksum(&[&m]);
                m[2..4].copy_from_slice(&c.to_be_bytes());
                Some(reply(frame, pkt, PROTO_ICMP, m, None))
            }
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = GW_MAC.to_vec();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
        h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(l4);
        eth(ETHERTYPE_IPV4, &h)
    }

    fn v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        h.push(proto);
        h.push(64);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(l4);
        eth(ETHERTYPE_IPV6, &h)
    }

    fn tcp(sport: u16, dport: u16, flags: u8, seq: u32) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&8u16.to_be_bytes());
        u
    }

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        Policy {
            allow: allow.iter().map(|r| r.parse().unwrap()).collect(),
            deny: deny.iter().map(|r| r.parse().unwrap()).collect(),
        }
    }

    const GUEST: [u8; 4] = [10, 0, 2, 15];

    #[test]
    fn rules_parse_as_cidr_and_ports() {
        let r: Rule = "192.0.2.0/24:80-90".parse().unwrap();
        assert!(r.matches("192.0.2.7".parse().unwrap(), Some(85)));
        assert!(!r.matches("192.0.2.7".parse().unwrap(), Some(91)));
        assert!(!r.matches("192.0.3.7".parse().unwrap(), Some(85)));
        assert!(!r.matches("192.0.2.7".parse().unwrap(), None));
        let r: Rule = "10.1.2.3".parse().unwrap();
        assert!(r.matches("10.1.2.3".parse().unwrap(), None));
        assert!(!r.matches("10.1.2.4".parse().unwrap(), Some(1)));
        let r: Rule = "[2001:db8::/32]:443".parse().unwrap();
        assert!(r.matches("2001:db8:1::5".parse().unwrap(), Some(443)));
        assert!(!r.matches("2001:db9::5".parse().unwrap(), Some(443)));
        let r: Rule = "2001:db8::/33".parse().unwrap();
        assert!(r.matches("2001:db8:7fff::1".parse().unwrap(), Some(1)));
        assert!(!r.matches("2001:db8:8000::1".parse().unwrap(), Some(1)));
        let any: Rule = "0.0.0.0/0".parse().unwrap();
        assert!(any.matches("8.8.8.8".parse().unwrap(), Some(53)));
        assert!(!any.matches("::1".parse().unwrap(), Some(53)));
        for bad in [
            "",
            "x",
            "10.0.0.0/33",
            "10.0.0.1:99999",
            "10.0.0.1:90-80",
            "[::1",
            "[::1]x",
            "::1/129",
            "10.0.0.1:",
        ] {
            let e = bad.parse::<Rule>().unwrap_err().to_string();
            assert!(e.contains("egress rule"), "{bad}: {e}");
        }
    }

    #[test]
    fn deny_wins_and_allow_rules_close_the_rest() {
        let p = policy(&["192.0.2.0/24"], &["192.0.2.9:22"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(p.allows(ip("192.0.2.9"), Some(80)));
        assert!(!p.allows(ip("192.0.2.9"), Some(22)));
        assert!(!p.allows(ip("198.51.100.1"), Some(80)));
        let deny_only = policy(&[], &["198.51.100.0/24"]);
        assert!(deny_only.allows(ip("192.0.2.1"), Some(1)));
        assert!(!deny_only.allows(ip("198.51.100.1"), Some(1)));
        assert!(Policy::default().is_open());
    }

    #[test]
    fn an_allowed_connection_passes_and_a_denied_syn_gets_a_rst() {
        let mut f = Filter::new(policy(&["192.0.2.1:8080"], &[]));
        let ok = v4(
            GUEST,
            [192, 0, 2, 1],
            PROTO_TCP,
            &tcp(40000, 8080, TCP_SYN, 7),
        );
        assert_eq!(f.check(&ok), Verdict::Pass);
        let syn = v4(
            GUEST,
            [192, 0, 2, 1],
            PROTO_TCP,
            &tcp(40001, 8081, TCP_SYN, 1000),
        );
        let Verdict::Answer(rst) = f.check(&syn) else {
            panic!("a denied SYN is answered");
        };
        // Ethernet back to the guest, IPv4 from the destination, a RST|ACK
        // from its port acknowledging the SYN, checksums that verify.
        assert_eq!(&rst[0..6], &GUEST_MAC);
        assert_eq!(&rst[6..12], &GW_MAC);
        let ip = &rst[ETH_HDR..];
        assert_eq!(checksum(&[&ip[..20]]), 0);
        assert_eq!(&ip[12..16], &[192, 0, 2, 1]);
        assert_eq!(&ip[16..20], &GUEST);
        let t = &ip[20..];
        assert_eq!(be16(t, 0), Some(8081));
        assert_eq!(be16(t, 2), Some(40001));
        assert_eq!(u32::from_be_bytes(t[8..12].try_into().unwrap()), 1001);
        assert_eq!(t[13], TCP_RST | TCP_ACK);
        let ps = pseudo(
            IpAddr::V4([192, 0, 2, 1].into()),
            IpAddr::V4(GUEST.into()),
            PROTO_TCP,
            t.len(),
        );
        assert_eq!(checksum(&[&ps, t]), 0);
        // A RST or a stray ACK to a denied port is dropped, not answered.
        let ack = v4(
            GUEST,
            [192, 0, 2, 1],
            PROTO_TCP,
            &tcp(40001, 8081, TCP_ACK, 1),
        );
        assert_eq!(f.check(&ack), Verdict::Drop);
        assert_eq!(
            f.stats(),
            EgressStats {
                passed: 1,
                denied: 2,
                flows: 1
            }
        );
    }

    #[test]
    fn a_policy_change_applies_to_new_flows_only() {
        let mut f = Filter::new(policy(&["192.0.2.1:8080"], &[]));
        let data = v4(
            GUEST,
            [192, 0, 2, 1],
            PROTO_TCP,
            &tcp(40000, 8080, TCP_ACK, 7),
        );
        assert_eq!(f.check(&data), Verdict::Pass);
        f.set_policy(policy(&["192.0.2.1:9090"], &[]));
        assert_eq!(f.check(&data), Verdict::Pass, "an allowed flow carries on");
        let new = v4(
            GUEST,
            [192, 0, 2, 1],
            PROTO_TCP,
            &tcp(40002, 8080, TCP_SYN, 7),
        );
        assert!(matches!(f.check(&new), Verdict::Answer(_)));
        let now_ok = v4(
            GUEST,
            [192, 0, 2, 1],
            PROTO_TCP,
            &tcp(40003, 9090, TCP_SYN, 7),
        );
        assert_eq!(f.check(&now_ok), Verdict::Pass);
    }

    #[test]
    fn denied_udp_and_ping_get_an_administratively_prohibited_unreachable() {
        let mut f = Filter::new(policy(&["192.0.2.53:53"], &[]));
        assert_eq!(
            f.check(&v4(GUEST, [192, 0, 2, 53], PROTO_UDP, &udp(5000, 53))),
            Verdict::Pass
        );
        let denied = v4(GUEST, [192, 0, 2, 54], PROTO_UDP, &udp(5000, 53));
        let Verdict::Answer(icmp) = f.check(&denied) else {
            panic!("answered");
        };
        let ip = &icmp[ETH_HDR..];
        assert_eq!(ip[9], PROTO_ICMP);
        let m = &ip[20..];
        assert_eq!((m[0], m[1]), (3, 13));
        assert_eq!(checksum(&[m]), 0);
        // The original header and 8 bytes of its data.
        assert_eq!(&m[8..], &denied[ETH_HDR..ETH_HDR + 28]);
        let ping = v4(
            GUEST,
            [192, 0, 2, 54],
            PROTO_ICMP,
            &[8, 0, 0, 0, 0, 1, 0, 1],
        );
        assert!(matches!(f.check(&ping), Verdict::Answer(_)));
        // An ICMP error from the guest is not answered with another.
        let err = v4(
            GUEST,
            [192, 0, 2, 54],
            PROTO_ICMP,
            &[3, 3, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(f.check(&err), Verdict::Drop);
    }

    #[test]
    fn ipv6_is_judged_and_neighbour_discovery_always_passes() {
        let guest: Ipv6Addr = "fd00::15".parse().unwrap();
        let allowed: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let other: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut f = Filter::new(policy(&["[2001:db8::1]:443"], &[]));
        assert_eq!(
            f.check(&v6(guest, allowed, PROTO_TCP, &tcp(1, 443, TCP_SYN, 0))),
            Verdict::Pass
        );
        let Verdict::Answer(rst) = f.check(&v6(guest, other, PROTO_TCP, &tcp(1, 443, TCP_SYN, 0)))
        else {
            panic!("answered");
        };
        let t = &rst[ETH_HDR + 40..];
        let ps = pseudo(IpAddr::V6(other), IpAddr::V6(guest), PROTO_TCP, t.len());
        assert_eq!(checksum(&[&ps, t]), 0);
        let Verdict::Answer(un) = f.check(&v6(guest, other, PROTO_UDP, &udp(1, 53))) else {
            panic!("answered");
        };
        let m = &un[ETH_HDR + 40..];
        assert_eq!((m[0], m[1]), (1, 1));
        let ps = pseudo(IpAddr::V6(other), IpAddr::V6(guest), PROTO_ICMPV6, m.len());
        assert_eq!(checksum(&[&ps, m]), 0);
        let ns = v6(
            guest,
            "ff02::1:ff00:1".parse().unwrap(),
            PROTO_ICMPV6,
            &[135, 0, 0, 0],
        );
        assert_eq!(f.check(&ns), Verdict::Pass);
        // A hop-by-hop header before TCP is walked.
        let mut l4 = vec![PROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&tcp(2, 80, TCP_SYN, 0));
        assert!(matches!(
            f.check(&v6(guest, other, 0, &l4)),
            Verdict::Answer(_)
        ));
    }

    #[test]
    fn arp_passes_and_garbage_is_dropped() {
        let mut f = Filter::new(policy(&["192.0.2.1"], &[]));
        assert_eq!(f.check(&eth(ETHERTYPE_ARP, &[0; 28])), Verdict::Pass);
        assert_eq!(f.check(&[0u8; 5]), Verdict::Drop);
        assert_eq!(
            f.check(&eth(ETHERTYPE_IPV4, &[0x45, 0, 0, 99])),
            Verdict::Drop
        );
        assert_eq!(f.check(&eth(0x1234, &[0; 40])), Verdict::Drop);
        // A truncated TCP header has no ports: dropped, never indexed past.
        let mut short = v4(GUEST, [192, 0, 2, 9], PROTO_TCP, &[0, 1, 0]);
        assert_eq!(f.check(&short), Verdict::Drop);
        short.truncate(ETH_HDR + 10);
        assert_eq!(f.check(&short), Verdict::Drop);
        // Other protocols are dropped under a policy.
        assert_eq!(
            f.check(&v4(GUEST, [192, 0, 2, 1], 47, &[0; 8])),
            Verdict::Drop
        );
        // With no rule at all everything passes untouched.
        let mut open = Filter::new(Policy::default());
        assert_eq!(open.check(&[1, 2, 3]), Verdict::Pass);
    }

    #[test]
    fn the_flow_table_is_bounded() {
        let mut f = Filter::new(policy(&["192.0.2.0/24"], &[]));
        for i in 0..(MAX_FLOWS + 100) {
            let sport = (i % 60_000) as u16 + 1;
            let dst = [192, 0, 2, (i / 60_000) as u8 + 1];
            assert_eq!(
                f.check(&v4(GUEST, dst, PROTO_UDP, &udp(sport, 53))),
                Verdict::Pass
            );
        }
        assert_eq!(f.stats().flows, MAX_FLOWS as u64);
        assert!(f.order.len() <= 2 * MAX_FLOWS);
    }
}
