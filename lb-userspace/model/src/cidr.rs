//! IP prefixes of either family, as flags (--nodeport-addresses,
//! --external-ip-cidrs) and Service fields (loadBalancerSourceRanges)
//! write them. A dual-stack cluster's flags list both families; a prefix
//! matches addresses of its own family only.
use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address: host bits are zero.
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// The address as a 128-bit number (IPv4 in the low 32 bits) and the
    /// family's width in bits.
    fn bits(addr: IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    }

    /// The mask of a `prefix_len` prefix in a `width`-bit family.
    fn mask(prefix_len: u8, width: u8) -> u128 {
        let host_bits = u32::from(width - prefix_len);
        let all = if width == 128 { u128::MAX } else { (1u128 << width) - 1 };
        all.checked_shr(host_bits).map_or(0, |m| m << host_bits)
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let ((net, width), (bits, other_width)) = (Self::bits(self.addr), Self::bits(addr));
        width == other_width && bits & Self::mask(self.prefix_len, width) == net
    }

    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let bad = || format!("{value:?} is not a CIDR such as 10.0.0.0/8 or fd00::/64");
        let trimmed = value.trim();
        let (addr, len) = match trimmed.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (trimmed, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let (bits, width) = Self::bits(addr);
        let prefix_len = match len {
            None => width,
            Some(len) => prefix_len(len, width).ok_or_else(bad)?,
        };
        let net = bits & Self::mask(prefix_len, width);
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4((net as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(net.into()),
        };
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A prefix length of at most `max`: digits only (`str::parse` would take
/// "+8").
fn prefix_len(text: &str, max: u8) -> Option<u8> {
    text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten().filter(|l| *l <= max)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn parses_masks_and_matches_its_own_family_only() {
        let cidr: Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.1.0.0/16");
        assert!(cidr.contains(Ipv4Addr::new(10, 1, 255, 1).into()));
        assert!(!cidr.contains(Ipv4Addr::new(10, 2, 0, 1).into()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(203, 0, 113, 9).into()));
        assert!(!all.contains(Ipv6Addr::LOCALHOST.into()), "an IPv4 prefix holds no IPv6 address");
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().prefix_len, 32);
        let six: Cidr = "fd00:1::5/64".parse().unwrap();
        assert_eq!(six.to_string(), "fd00:1::/64");
        assert!(six.contains("fd00:1::ffff".parse().unwrap()));
        assert!(!six.contains("fd00:2::1".parse().unwrap()));
        assert!(!six.contains(Ipv4Addr::new(0, 0, 0, 0).into()));
        let any6: Cidr = "::/0".parse().unwrap();
        assert!(any6.contains("2001:db8::1".parse().unwrap()) && !any6.contains(Ipv4Addr::LOCALHOST.into()));
    }

    #[test]
    fn flags_take_both_families() {
        let flags: Vec<Cidr> =
            ["10.1.2.3/16", "fd00:1::5/64", "2001:db8::1", "192.0.2.7"].iter().map(|c| c.parse().unwrap()).collect();
        let shown: Vec<String> = flags.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["10.1.0.0/16", "fd00:1::/64", "2001:db8::1/128", "192.0.2.7/32"]);
        assert!(flags[1].is_ipv6() && !flags[0].is_ipv6());
        for bad in
            ["fd00::/129", "fd00:::/8", "10.0.0.0/33", "x", "fd00::/+64", "10.0.0.0/+8", "10.0.0.0/", "ten/8", ""]
        {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
