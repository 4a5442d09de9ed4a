//! Which interfaces of this network namespace are pod interfaces.
//!
//! Interfaces are listed with if_nameindex(3) and typed with the ethtool
//! ioctl, both of which answer for the caller's network namespace; /sys would
//! answer for the namespace sysfs was mounted in, which differs under
//! `nsenter --net`.
use std::{ffi::CStr, io};

use glob::Pattern;

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
fn driver(name: &str) -> io::Result<String> {
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
