//! What the planner needs of an address family: lb-common's address type
//! (`Ipv4`, four bytes; `Ipv6`, four words of network-order bytes) to and
//! from the model's `IpAddr`. The plan, the reconciler and the map writers
//! are generic over it and run once per family, over that family's maps,
//! as the datapath is compiled once per family (ARCHITECTURE.md, "Two
//! families").
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{Address, Ipv4, Ipv6};

pub trait Family: Address + Send + Sync + 'static {
    /// As `spec.ipFamilies` names it.
    const NAME: &'static str;
    /// The padding of the family's conntrack values (`CtValue<Self,
    /// Self::CtPad>`: CONNTRACK's, CONNTRACK6's).
    type CtPad: Copy + Default + Send + Sync + 'static;
    /// The address, when it is of this family.
    fn of(addr: IpAddr) -> Option<Self>;
    fn ip(self) -> IpAddr;
    /// Its bytes in network order (a Maglev identity's).
    fn octets(self) -> Vec<u8>;
}

impl Family for Ipv4 {
    const NAME: &'static str = "IPv4";
    type CtPad = [u8; 0];

    fn of(addr: IpAddr) -> Option<Self> {
        match addr {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        }
    }

    fn ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self))
    }

    fn octets(self) -> Vec<u8> {
        self.to_vec()
    }
}

impl Family for Ipv6 {
    const NAME: &'static str = "IPv6";
    type CtPad = [u8; 4];

    fn of(addr: IpAddr) -> Option<Self> {
        match addr {
            IpAddr::V6(a) => Some(lb_common::ipv6(a.octets())),
            IpAddr::V4(_) => None,
        }
    }

    fn ip(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(lb_common::ipv6_octets(self)))
    }

    fn octets(self) -> Vec<u8> {
        lb_common::ipv6_octets(self).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_go_there_and_back_in_their_own_family_only() {
        let v4: IpAddr = "10.96.0.1".parse().unwrap();
        let v6: IpAddr = "fd00:96::1".parse().unwrap();
        assert_eq!(Ipv4::of(v4), Some([10, 96, 0, 1]));
        assert_eq!(Ipv4::of(v4).unwrap().ip(), v4);
        assert_eq!(Ipv6::of(v6).unwrap().ip(), v6);
        assert_eq!(Ipv6::of(v6).unwrap().octets()[..2], [0xfd, 0]);
        assert_eq!((Ipv4::of(v6), Ipv6::of(v4)), (None, None));
    }
}
