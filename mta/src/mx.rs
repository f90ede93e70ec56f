//! Routing of remote domains (RFC 5321 §5.1): MX records by preference,
//! the implicit MX (the domain's own address) when there are none, and
//! null MX (RFC 7505: a single `.` record means "accepts no mail").
//!
//! Main type: [`Router`]; [`order`] is the pure part, unit-tested.

use std::net::SocketAddr;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::error::{ResolveError, ResolveErrorKind};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::TokioAsyncResolver;

/// Addresses tried per message and domain, across all MX hosts.
const ADDRESSES_PER_DOMAIN_MAX: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Try these in order: (host name for TLS SNI, address).
    Hosts(Vec<(String, SocketAddr)>),
    /// Permanent: the domain does not exist or publishes a null MX.
    Refused { status: &'static str, why: String },
    /// DNS trouble: retry later.
    Retry(String),
}

/// MX host names in the order to try them, or `None` for a null MX.
/// Equal preferences keep their DNS order.
pub fn order(mut records: Vec<(u16, String)>) -> Option<Vec<String>> {
    let is_root = |name: &str| name.is_empty() || name == ".";
    if records.len() == 1 && is_root(&records[0].1) {
        return None;
    }
    records.sort_by_key(|(pref, _)| *pref);
    Some(records.into_iter().map(|(_, n)| n.trim_end_matches('.').to_string()).filter(|n| !n.is_empty()).collect())
}

pub struct Router {
    resolver: TokioAsyncResolver,
    port: u16,
}

pub type ResolverSettings = (ResolverConfig, ResolverOpts);

/// Resolver settings read before the chroot (it hides /etc/resolv.conf).
pub fn resolver_settings(dns_server: Option<SocketAddr>) -> Result<ResolverSettings, ResolveError> {
    match dns_server {
        Some(server) => {
            let group = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
            Ok((ResolverConfig::from_parts(None, vec![], group), ResolverOpts::default()))
        }
        None => hickory_resolver::system_conf::read_system_conf(),
    }
}

impl Router {
    /// `port` is 25 except in tests.
    pub fn new(settings: ResolverSettings, port: u16) -> Router {
        Router { resolver: TokioAsyncResolver::tokio(settings.0, settings.1), port }
    }

    pub async fn route(&self, domain: &str) -> Route {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let hosts = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(mx) => {
                let records = mx.iter().map(|r| (r.preference(), r.exchange().to_utf8())).collect();
                match order(records) {
                    Some(hosts) => hosts,
                    None => {
                        return Route::Refused { status: "5.1.10", why: format!("{domain} accepts no mail (null MX)") }
                    }
                }
            }
            Err(e) if nxdomain(&e) => {
                return Route::Refused { status: "5.1.2", why: format!("domain {domain} does not exist") }
            }
            // No MX: the domain itself is the implicit MX.
            Err(e) if no_records(&e) => vec![domain.trim_end_matches('.').to_string()],
            Err(e) => return Route::Retry(format!("MX lookup for {domain}: {e}")),
        };
        let mut targets = Vec::new();
        let mut last_error = None;
        for host in hosts {
            match self.resolver.lookup_ip(format!("{host}.").as_str()).await {
                Ok(ips) => targets.extend(ips.iter().map(|ip| (host.clone(), SocketAddr::new(ip, self.port)))),
                Err(e) => last_error = Some(format!("address lookup for {host}: {e}")),
            }
            if targets.len() >= ADDRESSES_PER_DOMAIN_MAX {
                targets.truncate(ADDRESSES_PER_DOMAIN_MAX);
                break;
            }
        }
        if targets.is_empty() {
            return Route::Retry(last_error.unwrap_or_else(|| format!("no address for the mail hosts of {domain}")));
        }
        Route::Hosts(targets)
    }
}

fn no_records(e: &ResolveError) -> bool {
    matches!(e.kind(), ResolveErrorKind::NoRecordsFound { .. })
}

fn nxdomain(e: &ResolveError) -> bool {
    matches!(e.kind(), ResolveErrorKind::NoRecordsFound { response_code: ResponseCode::NXDomain, .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_hosts_are_ordered_by_preference_and_null_mx_is_recognised() {
        let recs = vec![(20, "b.example.".to_string()), (10, "a.example.".to_string()), (20, "c.example.".to_string())];
        assert_eq!(order(recs), Some(vec!["a.example".to_string(), "b.example".to_string(), "c.example".to_string()]));
        assert_eq!(order(vec![(0, ".".to_string())]), None);
        assert_eq!(order(vec![(0, String::new())]), None);
        // A root name among real hosts is skipped, not a null MX.
        assert_eq!(
            order(vec![(0, ".".to_string()), (5, "a.example.".to_string())]),
            Some(vec!["a.example".to_string()])
        );
    }
}
