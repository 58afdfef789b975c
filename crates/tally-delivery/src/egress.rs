//! Where a sink whose endpoint someone else chose may send: the egress
//! guard against server-side request forgery.
//!
//! An [`EgressPolicy`] decides whether an IP address may be dialled. It
//! refuses loopback, unspecified, link-local, private (RFC 1918, IPv6 ULA
//! and site-local), shared (CGNAT), multicast, broadcast, documentation,
//! benchmarking and other reserved ranges — in their IPv4-mapped,
//! IPv4-compatible, IPv4-translated, NAT64 (`64:ff9b::/96`) and 6to4 forms
//! too — unless the address is in the operator's allow-list.
//!
//! An [`EgressGuard`] applies it to a `reqwest::Client`: names are resolved
//! by a resolver that drops refused addresses at connect time (so a name
//! that later resolves elsewhere — DNS rebinding — is checked again on every
//! new connection), the sink checks IP-literal hosts before every request
//! ([`EgressPolicy::check_url`]; reqwest resolves no literal), redirects are
//! never followed, and no proxy is used (one from the environment would be a
//! way around the check). A refusal is permanent for the batch (see
//! [`crate::Sink`]): it is a configuration problem, retrying cannot help.
//!
//! **Invariant:** a request made through an [`EgressGuard`]'s client by a
//! [`crate::Sink`] connects only to addresses its policy allows.
//! **Never:** show a refused name's resolved addresses outside the log (a
//! refusal names the host and the kind of address only).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::{Deserialize, Serialize};

/// What kind of address a refused one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `10/8`, `172.16/12`, `192.168/16`, `fc00::/7`, `fec0::/10`,
    /// `64:ff9b:1::/48`.
    Private,
    /// `100.64.0.0/10` (carrier-grade NAT).
    SharedAddressSpace,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`,
    /// `3fff::/20`.
    Documentation,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
    /// Anything else that is not global unicast: `192.0.0.0/24`,
    /// `240.0.0.0/4`, Teredo `2001::/32`, `100::/64`, IPv6 outside `2000::/3`.
    Reserved,
}

impl AddressClass {
    /// "a loopback address", ...
    pub fn describe(self) -> &'static str {
        match self {
            AddressClass::Loopback => "a loopback address",
            AddressClass::Unspecified => "an unspecified address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Private => "a private address",
            AddressClass::SharedAddressSpace => "a shared (carrier-grade NAT) address",
            AddressClass::Multicast => "a multicast address",
            AddressClass::Broadcast => "a broadcast address",
            AddressClass::Documentation => "a documentation address",
            AddressClass::Benchmarking => "a benchmarking address",
            AddressClass::Reserved => "a reserved address",
        }
    }
}

/// The class of `ip` if it is not a global unicast address; `None` if it is
/// one (an IPv6 form embedding an IPv4 address is judged by that address).
pub fn address_class(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (169, 254, _) => AddressClass::LinkLocal,
        (10, _, _) | (192, 168, _) => AddressClass::Private,
        (172, 16..=31, _) => AddressClass::Private,
        (100, 64..=127, _) => AddressClass::SharedAddressSpace,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => AddressClass::Documentation,
        (198, 18..=19, _) => AddressClass::Benchmarking,
        (192, 0, 0) => AddressClass::Reserved,
        (224..=239, _, _) => AddressClass::Multicast,
        _ if ip == Ipv4Addr::BROADCAST => AddressClass::Broadcast,
        (240..=255, _, _) => AddressClass::Reserved,
        _ => return None,
    })
}

/// The IPv4 address an IPv6 one stands for: mapped `::ffff:a.b.c.d`,
/// translated `::ffff:0:a.b.c.d`, compatible `::a.b.c.d`, NAT64
/// `64:ff9b::a.b.c.d` and 6to4 `2002:aabb:ccdd::/48`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // `::` and `::1` are themselves, not compatible forms.
        [0, 0, 0, 0, 0, 0, 0, 0..=1] => None,
        [0, 0, 0, 0, 0, 0xffff, _, _]
        | [0, 0, 0, 0, 0xffff, 0, _, _]
        | [0, 0, 0, 0, 0, 0, _, _]
        | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<AddressClass> {
    if ip.is_unspecified() {
        return Some(AddressClass::Unspecified);
    }
    if ip.is_loopback() {
        return Some(AddressClass::Loopback);
    }
    if let Some(v4) = embedded_v4(ip) {
        return v4_class(v4);
    }
    let s = ip.segments();
    Some(match s {
        [0x64, 0xff9b, 1, ..] => AddressClass::Private,
        [first, ..] if first & 0xffc0 == 0xfe80 => AddressClass::LinkLocal,
        [first, ..] if first & 0xffc0 == 0xfec0 => AddressClass::Private,
        [first, ..] if first & 0xfe00 == 0xfc00 => AddressClass::Private,
        [first, ..] if first & 0xff00 == 0xff00 => AddressClass::Multicast,
        [0x2001, 0x0db8, ..] => AddressClass::Documentation,
        [0x3fff, second, ..] if second & 0xf000 == 0 => AddressClass::Documentation,
        [0x2001, 0x0002, 0, ..] => AddressClass::Benchmarking,
        // Teredo.
        [0x2001, 0, ..] => AddressClass::Reserved,
        // Only 2000::/3 is global unicast (`100::/64`, discard-only, too).
        [first, ..] if first & 0xe000 != 0x2000 => AddressClass::Reserved,
        _ => return None,
    })
}

/// Which addresses a guarded sink may dial: global unicast ones, and those
/// in the operator's allow-list. The default allows nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Arc<[IpNet]>,
}

impl EgressPolicy {
    /// Global unicast addresses, and those in `allow`.
    pub fn new(allow: impl IntoIterator<Item = IpNet>) -> Self {
        EgressPolicy {
            allow: allow.into_iter().map(|net| net.trunc()).collect(),
        }
    }

    /// A policy from CIDRs (`10.0.0.0/8`) or bare addresses (`127.0.0.1`,
    /// one host), as the operator wrote them.
    pub fn parse<S: AsRef<str>>(
        allow: impl IntoIterator<Item = S>,
    ) -> Result<Self, EgressConfigError> {
        let mut nets = Vec::new();
        for (index, text) in allow.into_iter().enumerate() {
            let text = text.as_ref().trim();
            let net = text
                .parse::<IpNet>()
                .or_else(|e| text.parse::<IpAddr>().map(IpNet::from).map_err(|_| e))
                .map_err(|e| EgressConfigError {
                    index,
                    value: text.to_owned(),
                    reason: e.to_string(),
                })?;
            nets.push(net);
        }
        Ok(EgressPolicy::new(nets))
    }

    /// The allow-list.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }

    /// Refuses a URL whose host is an IP address the policy refuses (names
    /// are checked when they are resolved).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), EgressRefused> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(_)) | None => return Ok(()),
        };
        self.check(ip).map_err(|class| EgressRefused {
            host: ip.to_string(),
            class,
            resolved: false,
        })
    }

    /// Whether `ip` may be dialled; if not, what kind of address it is.
    pub fn check(&self, ip: IpAddr) -> Result<(), AddressClass> {
        let Some(class) = address_class(ip) else {
            return Ok(());
        };
        // An IPv6 form is allowed if the IPv4 address it stands for is.
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let listed = |ip: &IpAddr| self.allow.iter().any(|net| net.contains(ip));
        if listed(&ip) || embedded.as_ref().is_some_and(listed) {
            Ok(())
        } else {
            Err(class)
        }
    }
}

/// `egress:` in a server's config: the operator's allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct EgressConfig {
    /// CIDRs (or single addresses) that customer-owned sinks may reach
    /// although they are loopback, private, link-local... Empty: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

impl EgressConfig {
    /// The policy this allows; an entry that is no CIDR is an error.
    pub fn policy(&self) -> Result<EgressPolicy, EgressConfigError> {
        EgressPolicy::parse(&self.allow)
    }
}

/// An allow-list entry that is neither a CIDR nor an IP address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "egress.allow[{index}]: {value:?} is not a CIDR or an IP address \
     (e.g. 10.0.0.0/8, fd00::/8, 127.0.0.1): {reason}"
)]
pub struct EgressConfigError {
    /// The entry's position.
    pub index: usize,
    /// The entry.
    pub value: String,
    /// Why it does not parse.
    pub reason: String,
}

/// A destination the policy refused; written by Tally, safe to show to the
/// sink's owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct EgressRefused {
    /// The URL's host, as written.
    pub host: String,
    /// What kind of address it is (or, for a name, the first it resolved to).
    pub class: AddressClass,
    /// Whether `host` is a name (its addresses are not shown).
    pub resolved: bool,
}

impl fmt::Display for EgressRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.resolved { "resolves to" } else { "is" };
        write!(
            f,
            "destination {} {verb} {}; refused (operators may allow it with egress.allow in \
             the server config)",
            self.host,
            self.class.describe()
        )
    }
}

/// The refusal somewhere in `error`'s chain of sources, if any.
pub(crate) fn refusal_in<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a EgressRefused> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(refused) = error.downcast_ref::<EgressRefused>() {
            return Some(refused);
        }
        next = error.source();
    }
    None
}

/// An HTTP client that dials only what its [`EgressPolicy`] allows, for
/// sinks whose endpoint a customer chose. Give it to
/// [`crate::SinkBuilder::egress`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct EgressGuard {
    policy: EgressPolicy,
    client: reqwest::Client,
}

impl EgressGuard {
    /// A client (from [`crate::client_builder`]) resolving names through the
    /// policy, following no redirect and using no proxy.
    pub fn new(policy: EgressPolicy) -> Result<Self, reqwest::Error> {
        let client = crate::client_builder()
            .dns_resolver(GuardedResolver {
                policy: policy.clone(),
            })
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(EgressGuard { policy, client })
    }

    /// The policy.
    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The guarded client. A request to an IP-literal host must first pass
    /// [`EgressGuard::check_url`]; [`crate::Sink`] does that.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// Resolves a name with the system resolver and keeps the addresses the
/// policy allows; none left is an [`EgressRefused`].
struct GuardedResolver {
    policy: EgressPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(resolve_guarded(
            self.policy.clone(),
            name.as_str().to_owned(),
        ))
    }
}

async fn resolve_guarded(
    policy: EgressPolicy,
    host: String,
) -> Result<Addrs, Box<dyn std::error::Error + Send + Sync>> {
    let mut allowed: Vec<SocketAddr> = Vec::new();
    let mut refused: Vec<(SocketAddr, AddressClass)> = Vec::new();
    for addr in tokio::net::lookup_host((host.as_str(), 0)).await? {
        match policy.check(addr.ip()) {
            Ok(()) => allowed.push(addr),
            Err(class) => refused.push((addr, class)),
        }
    }
    if let Some(&(_, class)) = refused.first() {
        // The addresses go to the operator's log only.
        let addresses: Vec<IpAddr> = refused.iter().map(|(a, _)| a.ip()).collect();
        tracing::warn!(host = %host, refused = ?addresses, allowed = allowed.len(),
            "the egress policy dropped addresses of a sink's endpoint");
        if allowed.is_empty() {
            return Err(Box::new(EgressRefused {
                host,
                class,
                resolved: true,
            }));
        }
    }
    Ok(Box::new(allowed.into_iter()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn class(text: &str) -> Option<AddressClass> {
        address_class(ip(text))
    }

    #[test]
    fn special_purpose_addresses_are_classified() {
        use AddressClass::*;
        let table: &[(&str, Option<AddressClass>)] = &[
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("169.254.169.254", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("fc00::1", Some(Private)),
            ("fd12:3456::1", Some(Private)),
            ("fec0::1", Some(Private)),
            ("64:ff9b:1::a00:1", Some(Private)),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("192.0.2.1", Some(Documentation)),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("198.18.0.1", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("2001:2::1", Some(Benchmarking)),
            ("192.0.0.8", Some(Reserved)),
            ("240.0.0.1", Some(Reserved)),
            ("2001::1", Some(Reserved)),
            ("100::1", Some(Reserved)),
            ("4000::1", Some(Reserved)),
            // Global unicast, including the neighbours of the ranges above.
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("172.15.255.255", None),
            ("172.32.0.1", None),
            ("100.63.255.255", None),
            ("100.128.0.1", None),
            ("169.253.0.1", None),
            ("192.169.0.1", None),
            ("198.17.255.255", None),
            ("198.20.0.1", None),
            ("223.255.255.255", None),
            ("2606:4700::1111", None),
            ("2a00:1450::1", None),
            ("3ffe::1", None),
            ("3fff:1000::1", None),
        ];
        for &(address, expected) in table {
            assert_eq!(class(address), expected, "{address}");
        }
    }

    #[test]
    fn ipv6_forms_of_ipv4_addresses_are_judged_by_them() {
        use AddressClass::*;
        for (address, expected) in [
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::ffff:0:127.0.0.1", Some(Loopback)),
            ("::127.0.0.1", Some(Loopback)),
            ("::169.254.169.254", Some(LinkLocal)),
            ("64:ff9b::127.0.0.1", Some(Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            ("64:ff9b::192.168.0.1", Some(Private)),
            ("2002:7f00:1::", Some(Loopback)),
            ("2002:a9fe:a9fe::1", Some(LinkLocal)),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::8.8.8.8", None),
            ("2002:808:808::1", None),
        ] {
            assert_eq!(class(address), expected, "{address}");
        }
    }

    #[test]
    fn the_allow_list_lets_through_what_it_names_in_every_form() {
        let policy = EgressPolicy::parse(["127.0.0.0/8", "10.1.0.0/16", "fd00::1"]).unwrap();
        for allowed in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::127.0.0.1",
            "10.1.200.3",
            "fd00::1",
            "8.8.8.8",
        ] {
            assert_eq!(policy.check(ip(allowed)), Ok(()), "{allowed}");
        }
        for (refused, expected) in [
            ("::1", AddressClass::Loopback),
            ("10.2.0.1", AddressClass::Private),
            ("::ffff:10.2.0.1", AddressClass::Private),
            ("fd00::2", AddressClass::Private),
            ("169.254.169.254", AddressClass::LinkLocal),
        ] {
            assert_eq!(policy.check(ip(refused)), Err(expected), "{refused}");
        }
        assert_eq!(
            EgressPolicy::default().check(ip("127.0.0.1")),
            Err(AddressClass::Loopback)
        );
        // `::1` does not stand for 0.0.0.1.
        let odd = EgressPolicy::parse(["0.0.0.0/8"]).unwrap();
        assert_eq!(odd.check(ip("::1")), Err(AddressClass::Loopback));
    }

    #[test]
    fn allow_list_entries_are_validated_with_their_position() {
        let err = EgressPolicy::parse(["10.0.0.0/8", "10.0.0/8"]).unwrap_err();
        assert_eq!(err.index, 1);
        let message = err.to_string();
        assert!(
            message.starts_with("egress.allow[1]: \"10.0.0/8\""),
            "{message}"
        );
        assert!(EgressPolicy::parse(["10.0.0.0/33"]).is_err());
        assert!(EgressPolicy::parse(["localhost"]).is_err());
        let config = EgressConfig {
            allow: vec![" 192.168.0.0/16 ".into(), "::1".into()],
        };
        let policy = config.policy().unwrap();
        assert_eq!(policy.allowed().len(), 2);
        assert_eq!(policy.check(ip("::1")), Ok(()));
        // Host bits are dropped: the network is what counts.
        let policy = EgressPolicy::parse(["10.9.8.7/8"]).unwrap();
        assert_eq!(policy.allowed()[0].to_string(), "10.0.0.0/8");
    }

    #[test]
    fn literal_hosts_are_checked_in_every_spelling() {
        let policy = EgressPolicy::default();
        let refused = |url: &str| {
            policy
                .check_url(&reqwest::Url::parse(url).unwrap())
                .unwrap_err()
        };
        let err = refused("http://127.0.0.1:4318/v1/metrics");
        assert_eq!(
            err.to_string(),
            "destination 127.0.0.1 is a loopback address; refused (operators may allow it \
             with egress.allow in the server config)"
        );
        // The URL parser normalises these to IPv4 addresses.
        assert_eq!(refused("http://2130706433/").host, "127.0.0.1");
        assert_eq!(refused("http://0x7f.1/").host, "127.0.0.1");
        assert_eq!(
            refused("https://0251.0376.0251.0376/").host,
            "169.254.169.254"
        );
        assert_eq!(refused("http://[::1]:80/").class, AddressClass::Loopback);
        assert_eq!(
            refused("http://[::ffff:169.254.169.254]/").class,
            AddressClass::LinkLocal
        );
        assert_eq!(refused("http://[fd00::1]/").class, AddressClass::Private);
        for ok in [
            "https://8.8.8.8/",
            "https://example.com/",
            "http://[2606:4700::1111]/",
        ] {
            assert_eq!(
                policy.check_url(&reqwest::Url::parse(ok).unwrap()),
                Ok(()),
                "{ok}"
            );
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_refused_addresses_is_refused_before_any_connection() {
        // `localhost` resolves from the hosts file, to loopback addresses only.
        let Err(err) = resolve_guarded(EgressPolicy::default(), "localhost".into()).await else {
            panic!("localhost was not refused");
        };
        let refused = refusal_in(err.as_ref()).expect("an egress refusal");
        assert_eq!(refused.class, AddressClass::Loopback);
        assert!(refused.resolved);
        assert_eq!(
            refused.to_string(),
            "destination localhost resolves to a loopback address; refused (operators may \
             allow it with egress.allow in the server config)"
        );
        let allowing = EgressPolicy::parse(["127.0.0.0/8", "::1"]).unwrap();
        let addresses: Vec<SocketAddr> = resolve_guarded(allowing, "localhost".into())
            .await
            .unwrap()
            .collect();
        assert!(!addresses.is_empty());
        assert!(
            addresses.iter().all(|a| a.ip().is_loopback()),
            "{addresses:?}"
        );
    }

    fn v4() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    proptest! {
        #[test]
        fn every_ipv6_form_of_an_ipv4_address_gets_its_verdict(a in v4()) {
            let o = a.octets();
            let forms = [
                a.to_ipv6_mapped(),
                Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0,
                    u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]])),
                Ipv6Addr::new(0x2002, u16::from_be_bytes([o[0], o[1]]),
                    u16::from_be_bytes([o[2], o[3]]), 0, 0, 0, 0, 1),
            ];
            let strict = EgressPolicy::default();
            let listed = EgressPolicy::new([IpNet::from(IpAddr::V4(a))]);
            for form in forms {
                prop_assert_eq!(address_class(IpAddr::V6(form)), address_class(IpAddr::V4(a)));
                prop_assert_eq!(strict.check(IpAddr::V6(form)), strict.check(IpAddr::V4(a)));
                prop_assert_eq!(listed.check(IpAddr::V6(form)), Ok(()));
            }
            prop_assert_eq!(listed.check(IpAddr::V4(a)), Ok(()));
        }

        #[test]
        fn private_ranges_are_refused_whatever_the_host_bits(
            host in any::<u32>(),
            v6 in any::<u128>(),
        ) {
            for (net, class) in [
                ("10.0.0.0/8", AddressClass::Private),
                ("172.16.0.0/12", AddressClass::Private),
                ("192.168.0.0/16", AddressClass::Private),
                ("127.0.0.0/8", AddressClass::Loopback),
                ("169.254.0.0/16", AddressClass::LinkLocal),
                ("100.64.0.0/10", AddressClass::SharedAddressSpace),
            ] {
                let net: ipnet::Ipv4Net = net.parse().unwrap();
                let ip = u32::from(net.network()) | (host & u32::from(net.hostmask()));
                prop_assert_eq!(
                    EgressPolicy::default().check(IpAddr::V4(Ipv4Addr::from(ip))),
                    Err(class)
                );
            }
            for (net, class) in [
                ("fc00::/7", AddressClass::Private),
                ("fe80::/10", AddressClass::LinkLocal),
                ("ff00::/8", AddressClass::Multicast),
            ] {
                let net: ipnet::Ipv6Net = net.parse().unwrap();
                let ip = u128::from(net.network()) | (v6 & u128::from(net.hostmask()));
                prop_assert_eq!(
                    EgressPolicy::default().check(IpAddr::V6(Ipv6Addr::from(ip))),
                    Err(class)
                );
            }
        }
    }
}
