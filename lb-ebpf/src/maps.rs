//! The map statics. Layouts, names and roles are documented in lb-common;
//! sizes here are defaults the agent overrides at load time.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AffinityKey, AffinityKey6, AffinityValue, Backend, Backend6, CtKey, CtKey6, CtValue, CtValue6,
    DEFAULT_AFFINITY_MAX_ENTRIES, DEFAULT_BACKENDS_MAX_ENTRIES, DEFAULT_CONNTRACK_MAX_ENTRIES,
    DEFAULT_ENDPOINT_FILTER_BITS_LOG2, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_MAGLEV_TABLES, DEFAULT_SERVICES_MAX_ENTRIES,
    DEFAULT_SOCK_REVNAT_MAX_ENTRIES, DEFAULT_SOURCE_RANGES_MAX_ENTRIES, FilterLine, Ipv6, ServiceAddr, ServiceKey,
    ServiceKey6, ServiceValue, SockRevNatKey, SockRevNatKey6, SockRevNatValue, SockRevNatValue6, SourceRangeKey,
    TrafficCounter, counter, filter_lines,
};

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { DEFAULT_SERVICES_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, { DEFAULT_BACKENDS_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, { DEFAULT_CONNTRACK_MAX_ENTRIES as usize }> = LruHashMap::new();

// The IPv6 maps: the same layouts with 16-byte addresses (lb-common's
// `*6` types), the same sizes, read through `family::Family`.
#[btf_map]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue, { DEFAULT_SERVICES_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map]
pub static BACKENDS6: HashMap<u32, Backend6, { DEFAULT_BACKENDS_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map]
pub static CONNTRACK6: LruHashMap<CtKey6, CtValue6, { DEFAULT_CONNTRACK_MAX_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static SERVICE_ADDRS6: HashMap<Ipv6, ServiceAddr, { DEFAULT_SERVICES_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map]
pub static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue, { DEFAULT_AFFINITY_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static MAGLEV6: Array<u32, { (DEFAULT_MAGLEV_TABLES * DEFAULT_MAGLEV_TABLE_SIZE) as usize }> = Array::new();

#[btf_map]
pub static SOURCE_RANGES6: LpmTrie<SourceRangeKey<Ipv6>, u8, { DEFAULT_SOURCE_RANGES_MAX_ENTRIES as usize }> =
    LpmTrie::new();

#[btf_map]
pub static SERVICE_ADDRS: HashMap<[u8; 4], ServiceAddr, { DEFAULT_SERVICES_MAX_ENTRIES as usize }> = HashMap::new();

/// `lb_common::MAP_ENDPOINT_FILTER`; read through `filter::may_be_service_traffic`.
#[btf_map]
pub static ENDPOINT_FILTER: Array<FilterLine, { filter_lines(DEFAULT_ENDPOINT_FILTER_BITS_LOG2) as usize }> =
    Array::new();

/// log2 of ENDPOINT_FILTER's bits; the agent sets it at load time.
#[unsafe(no_mangle)]
static ENDPOINT_FILTER_BITS_LOG2: u32 = DEFAULT_ENDPOINT_FILTER_BITS_LOG2;

#[inline(always)]
pub fn endpoint_filter_bits_log2() -> u32 {
    // SAFETY: a global the loader may have rewritten; read it as such.
    unsafe { core::ptr::read_volatile(&ENDPOINT_FILTER_BITS_LOG2) }
}

#[btf_map]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { DEFAULT_SOURCE_RANGES_MAX_ENTRIES as usize }> = LpmTrie::new();

#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_AFFINITY_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static MAGLEV: Array<u32, { (DEFAULT_MAGLEV_TABLES * DEFAULT_MAGLEV_TABLE_SIZE) as usize }> = Array::new();

/// The Maglev table size M; the agent sets it at load time.
#[unsafe(no_mangle)]
static MAGLEV_TABLE_SIZE: u32 = DEFAULT_MAGLEV_TABLE_SIZE;

#[inline(always)]
pub fn maglev_table_size() -> u32 {
    // SAFETY: a global the loader may have rewritten; read it as such.
    unsafe { core::ptr::read_volatile(&MAGLEV_TABLE_SIZE) }
}

#[btf_map]
pub static FLOW_SEED: Array<u32, 1> = Array::new();

/// `lb_common::MAP_NODE_PORTS`: `NODE_PORT_*` bits by port.
#[btf_map]
pub static NODE_PORTS: Array<u8, { lb_common::NODE_PORTS_ENTRIES as usize }> = Array::new();

/// The seed of random selection (`lb_common::MAP_FLOW_SEED`).
#[inline(always)]
pub fn flow_seed() -> u32 {
    FLOW_SEED.get(0).copied().unwrap_or(0)
}

#[btf_map]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue, { DEFAULT_SOCK_REVNAT_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static SOCK_REVNAT6: LruHashMap<SockRevNatKey6, SockRevNatValue6, { DEFAULT_SOCK_REVNAT_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<TrafficCounter, { counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(index: u32, bytes: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and programs are not preempted mid-run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}

/// Scratch space for building an ICMP reply, one per CPU.
#[btf_map]
pub static ICMP_REPLY: PerCpuArray<[u8; crate::parse::ICMP_REPLY_LEN], 1> = PerCpuArray::new();

/// `lb_common::MAP_TAIL_CALLS`: the programs `tc_from_pod` tail-calls.
#[btf_map]
pub static TAIL_CALLS: aya_ebpf::btf_maps::ProgramArray<{ lb_common::TAIL_CALLS_ENTRIES as usize }> =
    aya_ebpf::btf_maps::ProgramArray::new();

/// IPv6 source NAT's route lookup and the keys it tries, one per CPU
/// (`snat::source6`).
pub struct Snat6 {
    pub params: aya_ebpf::bindings::bpf_fib_lookup,
    pub reply: CtKey6,
}

#[btf_map]
pub static SNAT6: PerCpuArray<Snat6, 1> = PerCpuArray::new();

/// `lb_common::MAP_WIRE_TAIL_CALLS`: the program `tc_from_wire` tail-calls.
#[btf_map]
pub static WIRE_TAIL_CALLS: aya_ebpf::btf_maps::ProgramArray<1> = aya_ebpf::btf_maps::ProgramArray::new();

/// `lb_common::MAP_XDP_TAIL_CALLS`: the program `xdp_from_wire` tail-calls.
#[btf_map]
pub static XDP_TAIL_CALLS: aya_ebpf::btf_maps::ProgramArray<1> = aya_ebpf::btf_maps::ProgramArray::new();

/// The conntrack key of the IPv6 packet being classified, one per CPU
/// (`Family::key_scratch`).
#[btf_map]
pub static KEY_SCRATCH6: PerCpuArray<CtKey6, 1> = PerCpuArray::new();

/// A new IPv6 flow's two conntrack entries while they are built, one pair
/// per CPU (`Family::entry_scratch`).
#[btf_map]
pub static ENTRY_SCRATCH6: PerCpuArray<[CtValue6; 2], 1> = PerCpuArray::new();

/// An IPv6 packet being translated (pipeline6.rs), and its rewrite,
/// one per CPU: what would not fit on the stack beside the pipeline.
pub struct State6 {
    pub packet: crate::parse::Packet<lb_common::Ipv6>,
    pub rewrite: crate::nat::Rewrite<lb_common::Ipv6>,
    /// A new flow's backend and its source NAT, between the frames that
    /// choose them and admit the flow.
    pub backend: lb_common::Backend6,
    pub snat_addr: lb_common::Ipv6,
    pub snat_port: [u8; 2],
}

#[btf_map]
pub static STATE6: PerCpuArray<State6, 1> = PerCpuArray::new();

/// Scratch space for building an ICMPv6 reply, one per CPU.
#[btf_map]
pub static ICMP6_REPLY: PerCpuArray<[u8; crate::parse::ICMP6_REPLY_LEN], 1> = PerCpuArray::new();
