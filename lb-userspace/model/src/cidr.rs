//! IPv4 prefixes, as flags (--nodeport-addresses, --external-ip-cidrs) and
//! Service fields (loadBalancerSourceRanges) write them.
use std::{fmt, net::Ipv4Addr, str::FromStr};

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
        let prefix_len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
        Ok(Self { addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix_len)), prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
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
}
