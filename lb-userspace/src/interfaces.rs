//! Which interfaces of this network namespace are pod interfaces, which
//! are external ones, and which addresses are the node's.
//!
//! Interfaces are listed with if_nameindex(3) and typed with the ethtool
//! ioctl, both of which answer for the caller's network namespace; /sys would
//! answer for the namespace sysfs was mounted in, which differs under
//! `nsenter --net`.
use std::{
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use glob::Pattern;

use crate::cidr::Cidr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

/// Every interface of the current network namespace.
pub fn list() -> io::Result<Vec<Interface>> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut entry = head;
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned();
            out.push(Interface { index: (*entry).if_index, name });
            entry = entry.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// The name of the interface `index` in this network namespace.
pub fn name_of(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IFNAMSIZ];
    // SAFETY: `buf` has the IFNAMSIZ bytes if_indextoname may write.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if name.is_null() {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The addresses of this network namespace, with the name of the
/// interface holding each: IPv4 ones (getifaddrs), and the IPv6 ones a
/// node address can be (`ipv6_addresses`).
pub fn addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let mut out = ipv4_addresses()?;
    // A namespace without IPv6 has no such file.
    let table = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    out.extend(ipv6_addresses(&table).into_iter().map(|(name, addr)| (name, addr.into())));
    Ok(out)
}

/// The IPv6 addresses of `/proc/net/if_inet6` (address, ifindex, prefix
/// length, scope, flags, name; hexadecimal) that a node address can be:
/// global ones, but for temporary, deprecated, tentative and failed ones
/// (privacy addresses rotate daily; counted, each rotation would
/// recompute every Service). Link-local and host scope (loopback) go too.
pub fn ipv6_addresses(table: &str) -> Vec<(String, Ipv6Addr)> {
    const SCOPE_GLOBAL: u32 = 0;
    // IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE.
    const UNUSABLE: u32 = 0x01 | 0x08 | 0x20 | 0x40;
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [addr, _, _, scope, flags, name] = fields[..] else { return None };
            let addr = u128::from_str_radix(addr, 16).ok().map(Ipv6Addr::from)?;
            let (scope, flags) = (u32::from_str_radix(scope, 16).ok()?, u32::from_str_radix(flags, 16).ok()?);
            (scope == SCOPE_GLOBAL && flags & UNUSABLE == 0).then(|| (name.to_owned(), addr))
        })
        .collect()
}

/// The IPv4 addresses of this network namespace, by interface.
fn ipv4_addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut entry = head;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned; an AF_INET
        // address is a sockaddr_in.
        unsafe {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let sin = &*(addr as *const libc::sockaddr_in);
                let name = CStr::from_ptr((*entry).ifa_name).to_string_lossy().into_owned();
                out.push((name, Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into()));
            }
            entry = (*entry).ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The node addresses NodePorts are served on: every address inside
/// `--nodeport-addresses` (all when the flag has none of its family, as
/// kube-proxy reads it), never a loopback one (a NodePort on 127.0.0.1
/// would let any local process or a neighbour with route_localnet reach
/// services it should not: CVE-2020-8558). Both families: a Service gets
/// NodePorts on those of its own families.
pub fn node_addresses(all: &[(String, IpAddr)], nodeport_addresses: &[Cidr]) -> Vec<IpAddr> {
    let allowed = |a: &IpAddr| {
        let mut same_family = nodeport_addresses.iter().filter(|c| c.is_ipv6() == a.is_ipv6()).peekable();
        same_family.peek().is_none() || same_family.any(|c| c.contains(*a))
    };
    let mut addrs: Vec<IpAddr> = all
        .iter()
        .map(|(_, a)| *a)
        .filter(|a| !a.is_loopback() && !a.is_unspecified() && !a.is_multicast())
        .filter(allowed)
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// `--external-interfaces`: glob patterns, or by default every interface
/// holding a node address, other than loopback and bridges (a CNI bridge
/// holds the pods' gateway; a node whose uplink is a bridge names it).
#[derive(Clone, Debug, Default)]
pub struct ExternalInterfaces {
    patterns: Vec<Pattern>,
}

impl ExternalInterfaces {
    pub fn new(globs: &[String]) -> Result<Self, glob::PatternError> {
        Ok(Self { patterns: globs.iter().map(|g| Pattern::new(g)).collect::<Result<_, _>>()? })
    }

    pub fn selects(&self, interface: &Interface, node_addresses: &[IpAddr], all: &[(String, IpAddr)]) -> bool {
        if interface.name == "lo" {
            return false;
        }
        if self.patterns.is_empty() {
            all.iter().any(|(name, addr)| *name == interface.name && node_addresses.contains(addr))
                && driver(&interface.name).is_ok_and(|d| d != "bridge")
        } else {
            self.patterns.iter().any(|p| p.matches(&interface.name))
        }
    }
}

const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolDrvinfo,
    _pad: [u8; 16],
}

/// The kernel driver behind `name` ("veth", "bridge", ...).
pub fn driver(name: &str) -> io::Result<String> {
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _pad: [0; 16] };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket only used for the ioctl, closed below;
    // `req` and `info` outlive the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// `--external-datapath`: which program serves an external interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalDatapath {
    /// XDP where the driver is known to run it natively and send frames
    /// on; tc everywhere else.
    #[default]
    Auto,
    /// tc ingress everywhere: works on every interface.
    Tc,
    /// XDP everywhere, in the driver where it can run, else generic.
    Xdp,
}

/// Drivers that run XDP in the driver and send frames on with XDP_TX and
/// redirects, as a NodePort to another node needs. Not veth: its XDP_TX
/// reaches the peer only when the peer runs XDP or NAPI too, which a node
/// cannot arrange for a bridge it does not own (kind's Docker bridge).
const NATIVE_XDP_DRIVERS: [&str; 17] = [
    "mlx4_en",
    "mlx5_core",
    "i40e",
    "ice",
    "ixgbe",
    "ixgbevf",
    "igb",
    "igc",
    "bnxt_en",
    "nfp",
    "qede",
    "ena",
    "gve",
    "virtio_net",
    "hv_netvsc",
    "sfc",
    "idpf",
];

/// Which external program serves an interface, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireChoice {
    Tc(&'static str),
    Xdp(&'static str),
}

impl ExternalDatapath {
    /// The program for an external interface whose driver is `driver`
    /// (None when it cannot be read).
    pub fn choose(self, driver: Option<&str>) -> WireChoice {
        match self {
            ExternalDatapath::Tc => WireChoice::Tc("--external-datapath tc"),
            ExternalDatapath::Xdp => WireChoice::Xdp("--external-datapath xdp"),
            ExternalDatapath::Auto => match driver {
                Some(d) if NATIVE_XDP_DRIVERS.contains(&d) => WireChoice::Xdp("driver runs XDP natively"),
                Some("veth") => WireChoice::Tc("veth: XDP cannot send frames on to a peer without XDP"),
                Some(_) => WireChoice::Tc("driver not known to run XDP natively"),
                None => WireChoice::Tc("driver unknown"),
            },
        }
    }
}

/// `--pod-interfaces`: glob patterns, or every veth when none are given.
#[derive(Clone, Debug, Default)]
pub struct PodInterfaces {
    patterns: Vec<Pattern>,
}

impl PodInterfaces {
    pub fn new(globs: &[String]) -> Result<Self, glob::PatternError> {
        Ok(Self { patterns: globs.iter().map(|g| Pattern::new(g)).collect::<Result<_, _>>()? })
    }

    pub fn selects(&self, interface: &Interface) -> bool {
        if self.patterns.is_empty() {
            driver(&interface.name).is_ok_and(|d| d == "veth")
        } else {
            self.patterns.iter().any(|p| p.matches(&interface.name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ExternalDatapath, WireChoice, ipv6_addresses, node_addresses};

    #[test]
    fn ipv6_node_addresses_are_global_stable_ones() {
        let table = "\
fd000010020000000000000000000001 02 40 00 80     eth0
20010db8000000000000000000000002 02 40 00 01     eth0
20010db8000000000000000000000003 02 40 00 20     eth0
20010db8000000000000000000000004 02 40 00 40     eth0
fe800000000000000000000000000001 02 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
garbage
";
        let found: Vec<String> = ipv6_addresses(table).iter().map(|(n, a)| format!("{n} {a}")).collect();
        assert_eq!(found, ["eth0 fd00:10:200::1"], "temporary, deprecated, tentative, link-local, loopback left out");
    }

    #[test]
    fn node_addresses_of_each_family_are_filtered_by_that_familys_cidrs_only() {
        let all: Vec<(String, std::net::IpAddr)> =
            ["127.0.0.1", "10.0.0.5", "192.168.1.5", "::1", "fd00:1::5", "2001:db8::5"]
                .iter()
                .map(|a| ("eth0".to_owned(), a.parse().unwrap()))
                .collect();
        let shown = |cidrs: &[&str]| -> Vec<String> {
            let cidrs: Vec<_> = cidrs.iter().map(|c| c.parse().unwrap()).collect();
            node_addresses(&all, &cidrs).iter().map(ToString::to_string).collect()
        };
        assert_eq!(shown(&[]), ["10.0.0.5", "192.168.1.5", "2001:db8::5", "fd00:1::5"], "never loopback");
        // An IPv4 CIDR narrows IPv4 only: IPv6 has none, so all of it.
        assert_eq!(shown(&["10.0.0.0/8"]), ["10.0.0.5", "2001:db8::5", "fd00:1::5"]);
        assert_eq!(shown(&["fd00::/8"]), ["10.0.0.5", "192.168.1.5", "fd00:1::5"]);
    }

    #[test]
    fn auto_takes_xdp_only_on_drivers_that_run_it_natively() {
        let auto = ExternalDatapath::Auto;
        assert!(matches!(auto.choose(Some("mlx5_core")), WireChoice::Xdp(_)));
        assert!(matches!(auto.choose(Some("virtio_net")), WireChoice::Xdp(_)));
        for driver in [Some("veth"), Some("bridge"), Some("bonding"), Some("vxlan"), None] {
            assert!(matches!(auto.choose(driver), WireChoice::Tc(_)), "{driver:?}");
        }
        assert!(matches!(ExternalDatapath::Tc.choose(Some("mlx5_core")), WireChoice::Tc(_)));
        assert!(matches!(ExternalDatapath::Xdp.choose(Some("veth")), WireChoice::Xdp(_)));
    }
}
