//! The egress filter on guest frames: a policy from the input (rules parsed
//! from arbitrary text, and well-formed ones), then arbitrary frames (and
//! frames built around arbitrary IPv4/IPv6 headers and TCP/UDP/ICMP bytes),
//! with policy changes between them.
//!
//! What must hold: no panic; an answer the filter makes is a well-formed
//! Ethernet frame back to the frame's sender (its addresses swapped) that is
//! no longer than the frame it answers plus the IP and ICMP headers.
#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::net::egress::{Filter, Policy, Rule, Verdict};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Step {
    Frame(Vec<u8>),
    /// Ethernet type, IP version byte (v4 or v6), protocol, then L4 bytes.
    Ip {
        v6: bool,
        proto: u8,
        dst_last: u8,
        frag: u16,
        l4: Vec<u8>,
    },
    SetPolicy {
        allow: Vec<String>,
        deny: Vec<String>,
        port: Option<u16>,
    },
}

fn rules(list: &[String]) -> Vec<Rule> {
    list.iter().filter_map(|r| r.parse().ok()).collect()
}

fn ip_frame(v6: bool, proto: u8, dst_last: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    if v6 {
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        f.extend_from_slice(&[proto, 64]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x15]);
        f.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, dst_last]);
    } else {
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let total = (20 + l4.len()).min(65535) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 1]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0, 10, 0, 2, 15, 192, 0, 2, dst_last]);
    }
    f.extend_from_slice(l4);
    f
}

fuzz_target!(|steps: Vec<Step>| {
    let mut filter = Filter::new(Policy {
        allow: vec!["192.0.2.1:80".parse().unwrap()],
        deny: Vec::new(),
    });
    for step in steps.into_iter().take(64) {
        let frame = match step {
            Step::Frame(f) => f,
            Step::Ip {
                v6,
                proto,
                dst_last,
                frag,
                l4,
            } => ip_frame(v6, proto, dst_last, frag, &l4),
            Step::SetPolicy { allow, deny, port } => {
                let mut allow = rules(&allow);
                if let Some(p) = port {
                    allow.push(Rule::host_port([192, 0, 2, 1].into(), p));
                }
                filter.set_policy(Policy {
                    allow,
                    deny: rules(&deny),
                });
                continue;
            }
        };
        if let Verdict::Answer(a) = filter.check(&frame) {
            assert!(a.len() >= 14 + 20, "an answer carries an IP header");
            assert_eq!(&a[0..6], &frame[6..12], "answers go back to the sender");
            assert_eq!(&a[6..12], &frame[0..6]);
            assert!(a.len() <= frame.len().max(14 + 40 + 20) + 40 + 8 + 20);
        }
    }
});
