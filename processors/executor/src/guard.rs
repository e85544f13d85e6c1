//! Destination policy: where the executor may send requests.
//!
//! A URL must be `http` or `https`; its host must match `allow_hosts` when that list is not
//! empty; and unless `allow_private` is set, every address the host resolves to must be public.
//! The address check runs where the connection is made: [`GuardedResolver`] is the HTTP
//! client's DNS resolver, so a name that resolves to a private address (DNS rebinding included)
//! is refused at connect time, not only when the URL was first looked at. Literal-IP URLs skip
//! DNS, so [`Destinations::check_url`] checks them before sending and the redirect policy
//! checks every redirect target the same way.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sluice_topology::ExecutorConfig;

/// Redirects followed before a delivery is refused.
pub const MAX_REDIRECTS: usize = 5;

/// Why the destination policy refused a request. Refusals are not retried: the same request
/// would be refused again until the configuration changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The URL does not parse or has no host.
    #[error("`{url}` is not a usable URL: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A scheme other than http or https.
    #[error("`{url}`: scheme `{scheme}` is not allowed; only http and https are")]
    Scheme {
        /// The URL as given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// The host matches no `allow_hosts` entry.
    #[error(
        "host `{host}` is not in the executor's allow_hosts; add it (or a `*.domain` pattern \
         covering it) to allow_hosts to deliver there"
    )]
    HostNotAllowed {
        /// The refused host.
        host: String,
    },
    /// The host is, or resolves to, a non-public address.
    #[error(
        "host `{host}` {how} {addr}, a {range} address; set `allow_private: true` in the \
         executor's config to deliver to private addresses"
    )]
    PrivateAddress {
        /// The host as written in the URL.
        host: String,
        /// The refused address.
        addr: IpAddr,
        /// Which range it is in (`loopback`, `private (RFC 1918)`, ...).
        range: &'static str,
        /// `is` for a literal address, `resolves to` for a name.
        how: &'static str,
    },
    /// The receiver redirected more than [`MAX_REDIRECTS`] times.
    #[error("more than {limit} redirects")]
    TooManyRedirects {
        /// The limit that was exceeded.
        limit: usize,
    },
}

impl Refusal {
    /// A short fixed reason code for metrics and the ledger.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::InvalidUrl { .. } => "invalid_url",
            Refusal::Scheme { .. } => "scheme",
            Refusal::HostNotAllowed { .. } => "host_not_allowed",
            Refusal::PrivateAddress { .. } => "private_address",
            Refusal::TooManyRedirects { .. } => "too_many_redirects",
        }
    }
}

/// An invalid `allow_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "allow_hosts entry `{entry}` is not a host name, an IP address or a `*.domain` pattern \
     (no scheme, port, path or bare `*`; an empty list allows every public host)"
)]
pub struct BadHostPattern {
    /// The entry as written.
    pub entry: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: any name below it, not the domain itself.
    Below(String),
}

/// The destination policy, built from the executor's `allow_hosts` and `allow_private`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destinations {
    allow_hosts: Vec<HostPattern>,
    allow_private: bool,
    trusted: Vec<IpAddr>,
}

/// Lower case, without IPv6 brackets and without the trailing dot of a fully qualified name.
fn normalize_host(host: &str) -> String {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

impl Destinations {
    /// A policy from `allow_hosts` (exact names or addresses, or `*.example.com` for any name
    /// below example.com; empty allows every host) and `allow_private`. Returns every bad entry.
    pub fn new(allow_hosts: &[String], allow_private: bool) -> Result<Self, Vec<BadHostPattern>> {
        let mut patterns = Vec::new();
        let mut bad = Vec::new();
        for entry in allow_hosts {
            let norm = normalize_host(entry.trim());
            let pattern = match norm.strip_prefix("*.") {
                Some(domain) => HostPattern::Below(format!(".{domain}")),
                None => HostPattern::Exact(norm.clone()),
            };
            let name = match &pattern {
                HostPattern::Exact(n) => n.as_str(),
                HostPattern::Below(d) => &d[1..],
            };
            let ip = name.parse::<IpAddr>().is_ok();
            let valid = !name.is_empty()
                && ((ip && matches!(pattern, HostPattern::Exact(_)))
                    || name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)))
                && !name.starts_with('.')
                && !name.contains("..");
            if valid {
                patterns.push(pattern);
            } else {
                bad.push(BadHostPattern {
                    entry: entry.clone(),
                });
            }
        }
        if bad.is_empty() {
            Ok(Destinations {
                allow_hosts: patterns,
                allow_private,
                trusted: Vec::new(),
            })
        } else {
            Err(bad)
        }
    }

    /// The policy of an executor's configuration.
    pub fn from_config(config: &ExecutorConfig) -> Result<Self, Vec<BadHostPattern>> {
        Destinations::new(&config.allow_hosts, config.allow_private)
    }

    /// Allows one exact address even though it is private, for a receiver that is known to be
    /// safe. `ExecutorConfig` has no setting for it yet; the tests use it to stand a loopback
    /// receiver in for a public host while `allow_private` stays off.
    pub fn trust_address(mut self, addr: IpAddr) -> Self {
        self.trusted.push(addr);
        self
    }

    /// Whether non-public addresses are allowed.
    pub fn allow_private(&self) -> bool {
        self.allow_private
    }

    /// Checks a host name (or address) against `allow_hosts`.
    pub fn check_host(&self, host: &str) -> Result<(), Refusal> {
        if self.allow_hosts.is_empty() {
            return Ok(());
        }
        let host = normalize_host(host);
        let allowed = self.allow_hosts.iter().any(|p| match p {
            HostPattern::Exact(name) => *name == host,
            HostPattern::Below(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        });
        if allowed {
            Ok(())
        } else {
            Err(Refusal::HostNotAllowed { host })
        }
    }

    /// Checks an address `host` is (literal) or resolved to (name) against the private ranges.
    pub fn check_addr(&self, host: &str, addr: IpAddr) -> Result<(), Refusal> {
        if self.allow_private || self.trusted.contains(&addr) {
            return Ok(());
        }
        match non_public_range(addr) {
            None => Ok(()),
            Some(range) => {
                let host = normalize_host(host);
                let how = if host.parse::<IpAddr>().is_ok() {
                    "is"
                } else {
                    "resolves to"
                };
                Err(Refusal::PrivateAddress {
                    host,
                    addr,
                    range,
                    how,
                })
            }
        }
    }

    /// Checks everything that can be checked without DNS: the scheme, the host against
    /// `allow_hosts`, and a literal IP host against the private ranges. Names are checked
    /// again, with their addresses, by [`GuardedResolver`] when the client connects.
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        let scheme = url.scheme();
        if scheme != "http" && scheme != "https" {
            return Err(Refusal::Scheme {
                url: url.to_string(),
                scheme: scheme.to_owned(),
            });
        }
        let Some(host) = url.host_str() else {
            return Err(Refusal::InvalidUrl {
                url: url.to_string(),
                reason: "no host".into(),
            });
        };
        self.check_host(host)?;
        if let Ok(addr) = normalize_host(host).parse::<IpAddr>() {
            self.check_addr(host, addr)?;
        }
        Ok(())
    }

    /// Parses and checks a URL string.
    pub fn check_url_str(&self, url: &str) -> Result<Url, Refusal> {
        let parsed = Url::parse(url).map_err(|e| Refusal::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        self.check_url(&parsed)?;
        Ok(parsed)
    }
}

/// The HTTP client's DNS resolver: resolves with the system resolver (through tokio) and
/// refuses a name that is not allowed or that resolves to any non-public address.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    destinations: Arc<Destinations>,
}

impl GuardedResolver {
    /// A resolver enforcing `destinations`.
    pub fn new(destinations: Arc<Destinations>) -> Self {
        GuardedResolver { destinations }
    }

    /// Resolves `host` and checks every address. All addresses must pass, not just one: the
    /// connector may try any of them.
    pub async fn lookup(&self, host: &str) -> Result<Vec<SocketAddr>, LookupError> {
        self.destinations.check_host(host)?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| LookupError::Dns(host.to_owned(), e))?
            .collect();
        if addrs.is_empty() {
            return Err(LookupError::NoAddress(host.to_owned()));
        }
        for addr in &addrs {
            self.destinations.check_addr(host, addr.ip())?;
        }
        Ok(addrs)
    }
}

/// Why [`GuardedResolver::lookup`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The policy refused the name or one of its addresses.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// DNS failed.
    #[error("resolving `{0}`: {1}")]
    Dns(String, #[source] std::io::Error),
    /// DNS answered with no address.
    #[error("`{0}` resolved to no address")]
    NoAddress(String),
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            match this.lookup(name.as_str()).await {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as Addrs),
                // Boxed as the Refusal itself so delivery can find it in the error chain.
                Err(LookupError::Refused(refusal)) => Err(refusal.into()),
                Err(other) => Err(other.into()),
            }
        })
    }
}

/// A redirect policy that follows at most [`MAX_REDIRECTS`] redirects and re-checks each target
/// with [`Destinations::check_url`] (names are then checked by the resolver on connect).
pub fn redirect_policy(destinations: Arc<Destinations>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds every URL requested so far, the first one included.
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(Refusal::TooManyRedirects {
                limit: MAX_REDIRECTS,
            });
        }
        match destinations.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refusal) => attempt.error(refusal),
        }
    })
}

/// The non-public range `addr` is in, or `None` for a public address.
pub fn non_public_range(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => v6_range(v6),
    }
}

fn in_v4(addr: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(addr) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn v4_range(a: Ipv4Addr) -> Option<&'static str> {
    const RANGES: &[([u8; 4], u32, &str)] = &[
        ([0, 0, 0, 0], 8, "unspecified (0.0.0.0/8)"),
        ([10, 0, 0, 0], 8, "private (RFC 1918)"),
        ([100, 64, 0, 0], 10, "shared CGNAT (100.64.0.0/10)"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([169, 254, 0, 0], 16, "link-local"),
        ([172, 16, 0, 0], 12, "private (RFC 1918)"),
        ([192, 0, 0, 0], 24, "IETF protocol assignment"),
        ([192, 0, 2, 0], 24, "documentation"),
        ([192, 168, 0, 0], 16, "private (RFC 1918)"),
        ([198, 18, 0, 0], 15, "benchmarking"),
        ([198, 51, 100, 0], 24, "documentation"),
        ([203, 0, 113, 0], 24, "documentation"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([255, 255, 255, 255], 32, "broadcast"),
        ([240, 0, 0, 0], 4, "reserved"),
    ];
    RANGES
        .iter()
        .find(|(net, prefix, _)| in_v4(a, *net, *prefix))
        .map(|(_, _, name)| *name)
}

fn v6_range(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if a.is_unspecified() {
        return Some("unspecified");
    }
    if a.is_loopback() {
        return Some("loopback");
    }
    // Addresses that carry an IPv4 address are judged by it.
    if let Some(v4) = a.to_ipv4_mapped() {
        return v4_range(v4).map(|_| "IPv4-mapped non-public");
    }
    if s[..6] == [0; 6] {
        return Some("IPv4-compatible (deprecated)");
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4_range(embedded(s[6], s[7])).map(|_| "NAT64-embedded non-public");
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some("local-use NAT64");
    }
    if s[0] == 0x2002 {
        return v4_range(embedded(s[1], s[2])).map(|_| "6to4-embedded non-public");
    }
    match s[0] {
        x if x & 0xffc0 == 0xfe80 => Some("link-local"),
        x if x & 0xffc0 == 0xfec0 => Some("site-local (deprecated)"),
        x if x & 0xfe00 == 0xfc00 => Some("unique local"),
        x if x & 0xff00 == 0xff00 => Some("multicast"),
        0x2001 if s[1] == 0x0db8 => Some("documentation"),
        0x0100 if s[1..4] == [0, 0, 0] => Some("discard-only"),
        _ => None,
    }
}

impl fmt::Display for Destinations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self
            .allow_hosts
            .iter()
            .map(|p| match p {
                HostPattern::Exact(n) => n.clone(),
                HostPattern::Below(d) => format!("*{d}"),
            })
            .collect();
        write!(
            f,
            "allow_hosts: [{}], allow_private: {}",
            hosts.join(", "),
            self.allow_private
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_non_public_ranges() {
        for (addr, range) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private (RFC 1918)"),
            ("172.16.0.1", "private (RFC 1918)"),
            ("172.31.255.255", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "shared CGNAT (100.64.0.0/10)"),
            ("100.127.255.255", "shared CGNAT (100.64.0.0/10)"),
            ("0.0.0.0", "unspecified (0.0.0.0/8)"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved"),
            ("192.0.2.10", "documentation"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local (deprecated)"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "IPv4-mapped non-public"),
            ("::ffff:10.0.0.1", "IPv4-mapped non-public"),
            ("::ffff:169.254.169.254", "IPv4-mapped non-public"),
            ("::127.0.0.1", "IPv4-compatible (deprecated)"),
            ("64:ff9b::a00:1", "NAT64-embedded non-public"),
            ("2002:c0a8:101::1", "6to4-embedded non-public"),
            ("2001:db8::1", "documentation"),
        ] {
            assert_eq!(non_public_range(ip(addr)), Some(range), "{addr}");
        }
        for addr in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "100.63.255.255",
            "169.255.0.1",
            "11.0.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(non_public_range(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn host_patterns() {
        let d = Destinations::new(
            &[
                "hooks.example.com".into(),
                "*.Alerts.Example.org.".into(),
                "[2606:4700::1111]".into(),
            ],
            false,
        )
        .unwrap();
        for ok in [
            "hooks.example.com",
            "HOOKS.example.com.",
            "a.alerts.example.org",
            "a.b.alerts.example.org",
            "[2606:4700::1111]",
        ] {
            assert_eq!(d.check_host(ok), Ok(()), "{ok}");
        }
        for refused in [
            "example.com",
            "evil-hooks.example.com",
            "hooks.example.com.evil.net",
            "alerts.example.org",
            "xalerts.example.org",
        ] {
            let e = d.check_host(refused).unwrap_err();
            assert!(matches!(e, Refusal::HostNotAllowed { .. }), "{refused}");
            assert!(e.to_string().contains("allow_hosts"), "{e}");
        }
        // An empty list allows every host name.
        let any = Destinations::new(&[], false).unwrap();
        assert_eq!(any.check_host("anything.example"), Ok(()));
    }

    #[test]
    fn bad_patterns_are_all_reported() {
        let bad = Destinations::new(
            &[
                "*".into(),
                "https://x.example".into(),
                "x.example:443".into(),
                "ok.example".into(),
                "*.".into(),
                "a.*.example".into(),
                "".into(),
            ],
            false,
        )
        .unwrap_err();
        let entries: Vec<&str> = bad.iter().map(|b| b.entry.as_str()).collect();
        assert_eq!(
            entries,
            [
                "*",
                "https://x.example",
                "x.example:443",
                "*.",
                "a.*.example",
                ""
            ]
        );
    }

    #[test]
    fn literal_addresses_in_urls() {
        let d = Destinations::new(&[], false).unwrap();
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/",
            "http://[::ffff:7f00:1]/",
            "http://2130706433/", // 127.0.0.1 written as a number
            "http://0x7f.1/",
            "https://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://[fd00::1]/",
        ] {
            let e = d.check_url_str(url).unwrap_err();
            assert!(matches!(e, Refusal::PrivateAddress { .. }), "{url}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains("allow_private: true"), "{msg}");
        }
        let e = d.check_url_str("http://127.0.0.1:1/").unwrap_err();
        assert_eq!(
            e.to_string(),
            "host `127.0.0.1` is 127.0.0.1, a loopback address; set `allow_private: true` in \
             the executor's config to deliver to private addresses"
        );
        assert_eq!(
            d.check_url_str("https://93.184.216.34/x").map(|_| ()),
            Ok(())
        );
        assert_eq!(
            d.check_url_str("https://hooks.example.com/x").map(|_| ()),
            Ok(())
        );

        let open = Destinations::new(&[], true).unwrap();
        assert_eq!(open.check_url_str("http://127.0.0.1/").map(|_| ()), Ok(()));

        let trusted = Destinations::new(&[], false)
            .unwrap()
            .trust_address(ip("127.0.0.1"));
        assert_eq!(
            trusted.check_url_str("http://127.0.0.1/").map(|_| ()),
            Ok(())
        );
        assert!(trusted.check_url_str("http://127.0.0.2/").is_err());
    }

    #[test]
    fn schemes_and_invalid_urls() {
        let d = Destinations::new(&[], true).unwrap();
        for url in ["ftp://example.com/", "file:///etc/passwd", "gopher://x/"] {
            let e = d.check_url_str(url).unwrap_err();
            assert!(matches!(e, Refusal::Scheme { .. }), "{url}: {e:?}");
        }
        let e = d.check_url_str("not a url").unwrap_err();
        assert_eq!(e.code(), "invalid_url");
        assert!(d.check_url_str("http://[::1/").is_err());
    }

    #[tokio::test]
    async fn resolver_refuses_names_of_private_addresses() {
        let strict = GuardedResolver::new(Arc::new(Destinations::new(&[], false).unwrap()));
        match strict.lookup("localhost").await {
            Err(LookupError::Refused(Refusal::PrivateAddress { host, how, .. })) => {
                assert_eq!(host, "localhost");
                assert_eq!(how, "resolves to");
            }
            other => panic!("localhost must be refused: {other:?}"),
        }
        let open = GuardedResolver::new(Arc::new(Destinations::new(&[], true).unwrap()));
        let addrs = open.lookup("localhost").await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");

        let listed = GuardedResolver::new(Arc::new(
            Destinations::new(&["hooks.example.com".into()], true).unwrap(),
        ));
        assert!(matches!(
            listed.lookup("localhost").await,
            Err(LookupError::Refused(Refusal::HostNotAllowed { .. }))
        ));
    }
}
