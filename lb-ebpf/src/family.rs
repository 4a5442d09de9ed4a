//! Address families: what the generic layers (filter, conntrack, `lb`,
//! classify, translate, the rewrite) need to know of each. A family is its
//! address type (`Ipv4`, `Ipv6`); it names its maps, its header layout and
//! where its bigger values are kept, and everything above is written once
//! and compiled once per family, so each family's path is the code it
//! would be alone (ARCHITECTURE.md, "Two families").
use aya_ebpf::btf_maps::{Array, HashMap, LpmTrie, LruHashMap};
use lb_common::{
    Address, AffinityKey, AffinityValue, Backend, CtKey, CtValue, DEFAULT_AFFINITY_MAX_ENTRIES,
    DEFAULT_BACKENDS_MAX_ENTRIES, DEFAULT_CONNTRACK_MAX_ENTRIES, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_MAGLEV_TABLES,
    DEFAULT_SERVICES_MAX_ENTRIES, DEFAULT_SOCK_REVNAT_MAX_ENTRIES, DEFAULT_SOURCE_RANGES_MAX_ENTRIES, Ipv4, Ipv6,
    ServiceAddr, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, SourceRangeKey,
};

use crate::maps::{
    AFFINITY, AFFINITY6, BACKENDS, BACKENDS6, CONNTRACK, CONNTRACK6, ENTRY_SCRATCH6, KEY_SCRATCH6, MAGLEV, MAGLEV6,
    SERVICE_ADDRS, SERVICE_ADDRS6, SERVICES, SERVICES6, SOCK_REVNAT, SOCK_REVNAT6, SOURCE_RANGES, SOURCE_RANGES6,
};

pub const SERVICES_N: usize = DEFAULT_SERVICES_MAX_ENTRIES as usize;
pub const BACKENDS_N: usize = DEFAULT_BACKENDS_MAX_ENTRIES as usize;
pub const CONNTRACK_N: usize = DEFAULT_CONNTRACK_MAX_ENTRIES as usize;
pub const AFFINITY_N: usize = DEFAULT_AFFINITY_MAX_ENTRIES as usize;
pub const SOURCE_RANGES_N: usize = DEFAULT_SOURCE_RANGES_MAX_ENTRIES as usize;
pub const SOCK_REVNAT_N: usize = DEFAULT_SOCK_REVNAT_MAX_ENTRIES as usize;
pub const MAGLEV_N: usize = (DEFAULT_MAGLEV_TABLES * DEFAULT_MAGLEV_TABLE_SIZE) as usize;
/// LpmTrie's default flags (BPF_F_NO_PREALLOC, which the kernel requires).
pub const LPM_FLAGS: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

/// A family's conntrack value.
pub type Ct<A> = CtValue<A, <A as Family>::CtPad>;

pub trait Family: Address + 'static {
    /// `CtValue`'s padding for this family.
    type CtPad: Copy + Default;
    /// `SockRevNatKey`'s padding for this family.
    type SockPad: Copy + Default;
    /// Offsets of the addresses from the start of the IP header.
    const SADDR_OFFSET: usize;
    const DADDR_OFFSET: usize;
    /// Offset of the header checksum from the start of the IP header; IPv6
    /// has none.
    const IP_CHECK_OFFSET: Option<usize>;

    fn conntrack() -> &'static LruHashMap<CtKey<Self>, Ct<Self>, CONNTRACK_N>;
    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceValue, SERVICES_N>;
    fn service_addrs() -> &'static HashMap<Self, ServiceAddr, SERVICES_N>;
    fn backends() -> &'static HashMap<u32, Backend<Self>, BACKENDS_N>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue, AFFINITY_N>;
    fn maglev() -> &'static Array<u32, MAGLEV_N>;
    fn source_ranges() -> &'static LpmTrie<SourceRangeKey<Self>, u8, SOURCE_RANGES_N, LPM_FLAGS>;
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey<Self, Self::SockPad>, SockRevNatValue<Self>, SOCK_REVNAT_N>;
    /// A socket's cookie as an address of this family: what stands for
    /// the client in a socket's flow hash (there is no 5-tuple yet at
    /// connect time).
    fn cookie_addr(cookie: [u8; 8]) -> Self;
    /// The address as the u64 the checksum helpers take for a 4-byte
    /// field; `None` for a longer one, whose change goes in as a sum.
    fn word(&self) -> Option<u64>;
    /// A per-CPU slot for a flow's conntrack key, for hooks that split
    /// the pipeline into frames (`classify::tracked`): IPv6's 40 bytes
    /// would crowd their stacks. `None` for IPv4, which needs none.
    fn key_scratch() -> Option<*mut CtKey<Self>>;
    /// Where a new flow's two conntrack entries are built: `None` for the
    /// stack, or a per-CPU slot (IPv6's are 56 bytes each).
    fn entry_scratch() -> Option<*mut [Ct<Self>; 2]>;
    /// The conntrack key of a flow, built as cheaply as the family allows.
    fn flow_key(saddr: Self, daddr: Self, sport: [u8; 2], dport: [u8; 2], protocol: u8) -> CtKey<Self>;
    /// An address read through a volatile access (IPv6's a word at a
    /// time): a function taking addresses by reference that reads them so
    /// keeps its arguments pointers. Read plainly, LLVM may pass them by
    /// value instead, as 128-bit values the BPF backend cannot hold (it
    /// fails compiling them).
    fn read_volatile(addr: &Self) -> Self;
}

impl Family for Ipv4 {
    type CtPad = [u8; 0];
    type SockPad = [u8; 2];
    const SADDR_OFFSET: usize = 12;
    const DADDR_OFFSET: usize = 16;
    const IP_CHECK_OFFSET: Option<usize> = Some(10);

    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<Self>, Ct<Self>, CONNTRACK_N> {
        &CONNTRACK
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceValue, SERVICES_N> {
        &SERVICES
    }
    #[inline(always)]
    fn service_addrs() -> &'static HashMap<Self, ServiceAddr, SERVICES_N> {
        &SERVICE_ADDRS
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Backend<Self>, BACKENDS_N> {
        &BACKENDS
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue, AFFINITY_N> {
        &AFFINITY
    }
    #[inline(always)]
    fn maglev() -> &'static Array<u32, MAGLEV_N> {
        &MAGLEV
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRangeKey<Self>, u8, SOURCE_RANGES_N, LPM_FLAGS> {
        &SOURCE_RANGES
    }
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey<Self, Self::SockPad>, SockRevNatValue<Self>, SOCK_REVNAT_N> {
        &SOCK_REVNAT
    }
    #[inline(always)]
    fn cookie_addr(cookie: [u8; 8]) -> Self {
        [cookie[0], cookie[1], cookie[2], cookie[3]]
    }

    #[inline(always)]
    fn word(&self) -> Option<u64> {
        Some(u64::from(u32::from_ne_bytes(*self)))
    }

    #[inline(always)]
    fn key_scratch() -> Option<*mut CtKey<Self>> {
        None
    }

    #[inline(always)]
    fn entry_scratch() -> Option<*mut [Ct<Self>; 2]> {
        None
    }

    #[inline(always)]
    fn read_volatile(addr: &Self) -> Self {
        // SAFETY: a read of a valid reference.
        unsafe { core::ptr::read_volatile(addr) }
    }

    /// A word at a time: field by field, the compiler stores the addresses
    /// byte by byte and zeroes the padding with a call to memset, on every
    /// packet.
    #[inline(always)]
    fn flow_key(saddr: Self, daddr: Self, sport: [u8; 2], dport: [u8; 2], protocol: u8) -> CtKey<Self> {
        let ports = [sport[0], sport[1], dport[0], dport[1]];
        let words = [
            u32::from_ne_bytes(saddr),
            u32::from_ne_bytes(daddr),
            u32::from_ne_bytes(ports),
            u32::from_ne_bytes([protocol, 0, 0, 0]),
        ];
        // SAFETY: CtKey<Ipv4> is repr(C), 16 bytes of plain integers without
        // implicit padding, laid out as these four words are in memory.
        unsafe { core::mem::transmute::<[u32; 4], CtKey<Self>>(words) }
    }
}

impl Family for Ipv6 {
    type CtPad = [u8; 4];
    type SockPad = [u8; 6];
    const SADDR_OFFSET: usize = 8;
    const DADDR_OFFSET: usize = 24;
    const IP_CHECK_OFFSET: Option<usize> = None;

    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<Self>, Ct<Self>, CONNTRACK_N> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceValue, SERVICES_N> {
        &SERVICES6
    }
    #[inline(always)]
    fn service_addrs() -> &'static HashMap<Self, ServiceAddr, SERVICES_N> {
        &SERVICE_ADDRS6
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Backend<Self>, BACKENDS_N> {
        &BACKENDS6
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue, AFFINITY_N> {
        &AFFINITY6
    }
    #[inline(always)]
    fn maglev() -> &'static Array<u32, MAGLEV_N> {
        &MAGLEV6
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRangeKey<Self>, u8, SOURCE_RANGES_N, LPM_FLAGS> {
        &SOURCE_RANGES6
    }
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey<Self, Self::SockPad>, SockRevNatValue<Self>, SOCK_REVNAT_N> {
        &SOCK_REVNAT6
    }
    #[inline(always)]
    fn cookie_addr(cookie: [u8; 8]) -> Self {
        let c = cookie;
        [u32::from_ne_bytes([c[0], c[1], c[2], c[3]]), u32::from_ne_bytes([c[4], c[5], c[6], c[7]]), 0, 0]
    }
    #[inline(always)]
    fn word(&self) -> Option<u64> {
        None
    }
    #[inline(always)]
    fn key_scratch() -> Option<*mut CtKey<Self>> {
        KEY_SCRATCH6.get_ptr_mut(0)
    }

    #[inline(always)]
    fn entry_scratch() -> Option<*mut [Ct<Self>; 2]> {
        ENTRY_SCRATCH6.get_ptr_mut(0)
    }

    #[inline(always)]
    fn flow_key(saddr: Self, daddr: Self, sport: [u8; 2], dport: [u8; 2], protocol: u8) -> CtKey<Self> {
        CtKey { saddr, daddr, sport, dport, protocol, _pad: [0; 3] }
    }

    #[inline(always)]
    fn read_volatile(addr: &Self) -> Self {
        // SAFETY: reads of a valid reference, a word at a time.
        unsafe {
            [
                core::ptr::read_volatile(&addr[0]),
                core::ptr::read_volatile(&addr[1]),
                core::ptr::read_volatile(&addr[2]),
                core::ptr::read_volatile(&addr[3]),
            ]
        }
    }
}
