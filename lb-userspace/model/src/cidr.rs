//! IP prefixes, as flags (--nodeport-addresses, --external-ip-cidrs) and
//! Service fields (loadBalancerSourceRanges) write them: `Cidr` (IPv4,
//! what the datapath serves) and `FlagCidr` (either family, what a flag
//! takes: kube-proxy's flags of a dual-stack cluster list both).
use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address: host bits are zero.
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Cidr {
    fn mask(prefix_len: u8) -> u32 {
        if prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix_len)) }
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.prefix_len) == u32::from(self.addr)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `A.B.C.D/N`; a bare address is a /32. Host bits are cleared, as
    /// Kubernetes tolerates them in loadBalancerSourceRanges.
    fn from_str(value: &str) -> Result<Self, String> {
        let bad = || format!("{value:?} is not an IPv4 CIDR such as 10.0.0.0/8");
        let (addr, len) = value.trim().split_once('/').unwrap_or((value.trim(), "32"));
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix_len = prefix_len(len, 32).ok_or_else(bad)?;
        Ok(Self { addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix_len)), prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A prefix length of at most `max`: digits only (`u8`'s parser takes
/// "+8" too).
fn prefix_len(text: &str, max: u8) -> Option<u8> {
    text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten().filter(|l| *l <= max)
}

/// A prefix of either family, as a flag takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlagCidr {
    V4(Cidr),
    /// The network address (host bits cleared) and the prefix length.
    V6(Ipv6Addr, u8),
}

impl FlagCidr {
    /// The IPv4 prefixes of `cidrs`, the ones that apply to IPv4 addresses
    /// (kube-proxy reads these flags per family).
    pub fn ipv4(cidrs: &[FlagCidr]) -> Vec<Cidr> {
        cidrs.iter().filter_map(|c| if let Self::V4(c) = c { Some(*c) } else { None }).collect()
    }

    /// Whether any of `cidrs` is IPv6.
    pub fn any_ipv6(cidrs: &[FlagCidr]) -> bool {
        cidrs.iter().any(|c| matches!(c, Self::V6(..)))
    }
}

impl FromStr for FlagCidr {
    type Err = String;

    /// An IPv4 prefix as `Cidr` reads it, or `ADDR/N` (a bare address is a
    /// /128) with an IPv6 address.
    fn from_str(value: &str) -> Result<Self, String> {
        let trimmed = value.trim();
        if !trimmed.contains(':') {
            return trimmed
                .parse()
                .map(Self::V4)
                .map_err(|_| format!("{value:?} is not a CIDR such as 10.0.0.0/8 or fd00::/64"));
        }
        let bad = || format!("{value:?} is not an IPv6 CIDR such as fd00::/64");
        let (addr, len) = trimmed.split_once('/').unwrap_or((trimmed, "128"));
        let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
        let prefix_len = prefix_len(len, 128).ok_or_else(bad)?;
        let mask = if prefix_len == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix_len)) };
        Ok(Self::V6(Ipv6Addr::from(u128::from(addr) & mask), prefix_len))
    }
}

impl fmt::Display for FlagCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(cidr) => cidr.fmt(f),
            Self::V6(addr, len) => write!(f, "{addr}/{len}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masks_and_matches() {
        let cidr: Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.1.0.0/16");
        assert!(cidr.contains(Ipv4Addr::new(10, 1, 255, 1)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 2, 0, 1)));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(203, 0, 113, 9)));
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().prefix_len, 32);
        for bad in ["10.0.0.0/33", "fd00::/8", "ten/8", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_take_both_families_and_keep_the_ipv4_ones_for_ipv4() {
        let flags: Vec<FlagCidr> =
            ["10.1.2.3/16", "fd00:1::5/64", "2001:db8::1", "192.0.2.7"].iter().map(|c| c.parse().unwrap()).collect();
        let shown: Vec<String> = flags.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["10.1.0.0/16", "fd00:1::/64", "2001:db8::1/128", "192.0.2.7/32"]);
        let ipv4: Vec<String> = FlagCidr::ipv4(&flags).iter().map(|c| c.to_string()).collect();
        assert_eq!(ipv4, ["10.1.0.0/16", "192.0.2.7/32"]);
        assert!(FlagCidr::any_ipv6(&flags) && !FlagCidr::any_ipv6(&flags[..1]));
        for bad in ["fd00::/129", "fd00:::/8", "10.0.0.0/33", "x", "fd00::/+64", "10.0.0.0/+8", "10.0.0.0/"] {
            assert!(bad.parse::<FlagCidr>().is_err(), "{bad}");
        }
        assert!("::/0".parse::<FlagCidr>().is_ok());
    }
}
