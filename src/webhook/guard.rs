//! Where webhooks may go. Loopback, private, link-local, unique-local,
//! shared (CGNAT), multicast, reserved and cloud metadata addresses are
//! refused, checked on the address actually connected to: the client
//! resolves a name at connect time and keeps only the addresses
//! [`Guard::allowed_addresses`] lets through, so a name that resolves to a
//! private address at delivery time (DNS rebinding) is refused too.
//! Literal addresses in a URL are checked by [`Guard::check_url`] at
//! registration, and again by the client when it connects.
//! `TC_WEBHOOK_ALLOW_HOSTS` (host names or CIDRs) opens exceptions.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use url::Url;

/// Host names and networks let through although they are not public.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

/// Why a destination is refused; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("url: {0}")]
    Url(String),
    #[error(
        "destination refused: {host} is a loopback, private, link-local or metadata address (allow it with TC_WEBHOOK_ALLOW_HOSTS)"
    )]
    Address { host: String },
    #[error(
        "destination refused: {host} resolves only to loopback, private, link-local or metadata addresses (allow it with TC_WEBHOOK_ALLOW_HOSTS)"
    )]
    Resolved { host: String },
}

impl Guard {
    /// Parses `TC_WEBHOOK_ALLOW_HOSTS`: comma-separated host names, IP
    /// addresses or CIDRs.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut guard = Self::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(net) = item.parse::<IpNet>() {
                guard.nets.push(net);
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                guard.nets.push(IpNet::from(ip));
            } else if item
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            {
                guard.hosts.push(item.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "TC_WEBHOOK_ALLOW_HOSTS: {item:?} is neither a host name, an IP address nor a CIDR"
                ));
            }
        }
        Ok(guard)
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// Whether a connection to `ip` may be made.
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip)) || is_public(ip)
    }

    /// Checks a URL's form, and its host when that is a literal address
    /// (a name is checked when it is resolved).
    pub fn check_url(&self, url: &str) -> Result<Url, Refused> {
        if url.len() > 2048 {
            return Err(Refused::Url("longer than 2048 characters".into()));
        }
        let parsed = Url::parse(url)
            .map_err(|e| Refused::Url(format!("{e}: send an absolute https:// or http:// URL")))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(Refused::Url(format!(
                "scheme {:?} is not https or http",
                parsed.scheme()
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Refused::Url(
                "credentials in the URL are refused: the signature authenticates deliveries".into(),
            ));
        }
        let Some(host) = parsed.host() else {
            return Err(Refused::Url("no host".into()));
        };
        let literal = match host {
            url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            url::Host::Domain(name) => {
                if self.host_allowed(name) {
                    return Ok(parsed);
                }
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") {
                    return Err(Refused::Address { host: name });
                }
                None
            }
        };
        if let Some(ip) = literal
            && !self.ip_allowed(ip)
        {
            return Err(Refused::Address {
                host: ip.to_string(),
            });
        }
        Ok(parsed)
    }

    /// Of the addresses `host` resolved to, those a connection may go to;
    /// refused when none is left.
    pub fn allowed_addresses(
        &self,
        host: &str,
        addrs: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refused> {
        if self.host_allowed(host) {
            return Ok(addrs);
        }
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| self.ip_allowed(a.ip()))
            .collect();
        if allowed.is_empty() {
            return Err(Refused::Resolved {
                host: host.to_string(),
            });
        }
        Ok(allowed)
    }
}

/// A globally routable unicast address.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7 (fd00::/8 and AWS fd00:ec2::254)
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || s[0] == 0x2001 && s[1] == 0x0db8 // documentation
                || s[0..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible, ::/96
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16: cloud metadata lives here
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_local_and_metadata_addresses() {
        let g = Guard::default();
        for bad in [
            "http://127.0.0.1/",
            "http://127.1.2.3:8080/x",
            "http://10.0.0.1/",
            "http://172.16.5.4/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fd00:ec2::254]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://localhost:3000/",
            "http://api.localhost/",
        ] {
            assert!(
                matches!(g.check_url(bad), Err(Refused::Address { .. })),
                "{bad}: {:?}",
                g.check_url(bad)
            );
        }
        for good in [
            "https://example.com/hook",
            "http://93.184.216.34/",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/",
        ] {
            assert!(g.check_url(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn refuses_bad_urls_with_a_reason() {
        let g = Guard::default();
        let msg = |u: &str| g.check_url(u).unwrap_err().to_string();
        assert!(msg("ftp://example.com/").contains("scheme"));
        assert!(msg("https://user:pw@example.com/").contains("credentials"));
        assert!(msg("not a url").starts_with("url:"));
        assert!(!msg("https://user:hunter2@example.com/").contains("hunter2"));
    }

    #[test]
    fn allow_list_opens_exceptions() {
        let g = Guard::parse("127.0.0.1, 10.1.0.0/16 ,receiver.internal").unwrap();
        assert!(g.check_url("http://127.0.0.1:9000/").is_ok());
        assert!(g.check_url("http://10.1.2.3/").is_ok());
        assert!(g.check_url("http://10.2.0.1/").is_err());
        assert!(g.check_url("http://receiver.internal/").is_ok());
        assert!(g.check_url("http://169.254.169.254/").is_err());
        assert!(Guard::parse("a b").is_err());
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let local: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let metadata: SocketAddr = "169.254.169.254:80".parse().unwrap();
        let public: SocketAddr = "93.184.216.34:80".parse().unwrap();
        let g = Guard::default();
        let err = g
            .allowed_addresses("rebind.example", vec![local, metadata])
            .unwrap_err();
        assert!(err.to_string().contains("resolves only to"), "{err}");
        assert_eq!(
            g.allowed_addresses("mixed.example", vec![local, public])
                .unwrap(),
            vec![public]
        );
        let g = Guard::parse("localhost").unwrap();
        assert_eq!(
            g.allowed_addresses("localhost", vec![local]).unwrap(),
            vec![local]
        );
    }
}
