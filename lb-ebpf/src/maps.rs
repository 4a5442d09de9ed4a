//! The map statics. Layouts, names and roles are documented in lb-common;
//! sizes here are defaults the agent overrides at load time.
use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, DEFAULT_AFFINITY_MAX_ENTRIES,
    DEFAULT_BACKENDS_MAX_ENTRIES, DEFAULT_CONNTRACK_MAX_ENTRIES, DEFAULT_SERVICES_MAX_ENTRIES,
    ServiceKey, ServiceValue, TrafficCounter, counter,
};

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { DEFAULT_SERVICES_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, { DEFAULT_BACKENDS_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, { DEFAULT_CONNTRACK_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static SERVICE_ADDRS: HashMap<[u8; 4], u32, { DEFAULT_SERVICES_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_AFFINITY_MAX_ENTRIES as usize }> =
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
