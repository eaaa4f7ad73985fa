//! `--egress-allow` / `--egress-deny`: the rules a user gives, made into the
//! policy the VM's network device enforces
//! (`devices::virtio::net::egress`), and its handle on a running VM.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use devices::virtio::mmio::MmioTransport;
pub use devices::virtio::net::egress::EgressStats;
use devices::virtio::net::egress::{Policy, Rule};
use devices::virtio::net::Net;

use crate::Error;

/// The keyword for the resolver the VM is given (port 53, TCP and UDP).
pub const DNS: &str = "dns";

/// The policy of `allow` and `deny` (each `CIDR[:PORT[-PORT]]`,
/// `[IPV6-CIDR]:PORT` or `dns`), with `dns` standing for `resolver`.
pub fn policy(
    allow: &[String],
    deny: &[String],
    resolver: Option<IpAddr>,
) -> Result<Policy, Error> {
    let rules = |list: &[String]| -> Result<Vec<Rule>, Error> {
        list.iter()
            .map(|r| {
                if r == DNS {
                    resolver.map(|a| Rule::host_port(a, 53)).ok_or_else(|| {
                        Error::Usage(format!("egress rule {DNS:?}: the VM is given no resolver"))
                    })
                } else {
                    r.parse::<Rule>().map_err(|e| Error::Usage(e.to_string()))
                }
            })
            .collect()
    };
    Ok(Policy {
        allow: rules(allow)?,
        deny: rules(deny)?,
    })
}

/// Checks the rules' syntax (before anything is pulled).
pub fn check(allow: &[String], deny: &[String]) -> Result<(), Error> {
    policy(allow, deny, Some(IpAddr::from([0, 0, 0, 0]))).map(drop)
}

/// A running VM's network device, for its egress policy.
#[derive(Clone)]
pub struct NetHandle {
    transport: Arc<Mutex<MmioTransport>>,
    /// What `dns` means for this VM.
    pub resolver: Option<IpAddr>,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle")
            .field("resolver", &self.resolver)
            .finish_non_exhaustive()
    }
}

impl NetHandle {
    /// The virtio-net device among `attached`, if there is one.
    pub fn find(attached: &[runner::virtio::Attached], resolver: Option<IpAddr>) -> Option<Self> {
        attached
            .iter()
            .find(|a| {
                a.transport
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .device::<Net>()
                    .is_some()
            })
            .map(|a| Self {
                transport: a.transport.clone(),
                resolver,
            })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Net) -> R) -> Option<R> {
        let mut t = self
            .transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.device_mut::<Net>().map(f)
    }

    /// Enforces `allow`/`deny` from now on (new flows; allowed ones carry on).
    pub fn set(&self, allow: &[String], deny: &[String]) -> Result<(), Error> {
        let p = policy(allow, deny, self.resolver)?;
        self.with(|n| n.set_egress(p))
            .ok_or_else(|| Error::Usage("the VM has no network device".into()))
    }

    /// The filter's counters.
    pub fn stats(&self) -> EgressStats {
        self.with(|n| n.egress_stats()).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dns_is_the_vms_resolver_and_bad_rules_are_errors() {
        let dns: IpAddr = "192.0.2.53".parse().unwrap();
        let p = policy(&["dns".into(), "192.0.2.1:80".into()], &[], Some(dns)).unwrap();
        assert!(p.allows(dns, Some(53)));
        assert!(!p.allows(dns, Some(54)));
        assert!(p.allows("192.0.2.1".parse().unwrap(), Some(80)));
        let e = policy(&["dns".into()], &[], None).unwrap_err().to_string();
        assert!(e.contains("no resolver"), "{e}");
        let e = check(&["10.0.0.0/40".into()], &[]).unwrap_err().to_string();
        assert!(e.contains("prefix length"), "{e}");
        assert!(check(&[], &["dns".into()]).is_ok());
    }
}
