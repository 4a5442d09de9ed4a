//! How big the maps are (pure): the agent-owned maps sized from what the
//! cluster needs, CONNTRACK from the node's memory. No I/O: the agent
//! reads the capacities and the memory, this decides.
//!
//! SERVICES, SERVICE_ADDRS, BACKENDS and SOURCE_RANGES hold what the agent
//! writes, so their need is known before a sync: while a sync runs, the
//! maps hold old and new entries side by side (puts before deletes), so a
//! sync needs room for the union of both states. When that does not fit,
//! the agent grows the maps first (`Datapath::grow`), with headroom so
//! that growth is rare. The flags are floors, or fixed sizes with
//! `--fixed-map-sizes`. MAGLEV keeps `--maglev-tables` (64 KiB a table; a
//! frontend beyond it falls back to random), and the LRU maps written by
//! the datapath (CONNTRACK, AFFINITY, SOCK_REVNAT) keep the size they were
//! made with: a full LRU evicts, it never refuses.
use crate::plan::{MaglevConfig, MapContents};

/// Maximum entries of the maps, fixed when the maps are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// SERVICES (frontends plus backend slots); SERVICE_ADDRS gets as many
    /// (a service address has at least one frontend).
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub source_ranges: u32,
    pub maglev: MaglevConfig,
    /// Whether the IPv6 maps get their IPv4 namesakes' sizes (awake), or
    /// `lb_common::IPV6_DORMANT_ENTRIES` (dormant, while no IPv6 frontend
    /// needs them: see `Ipv6Maps`).
    pub ipv6: bool,
}

/// The IPv6 maps, for growth: they are made dormant (small), and wake at
/// full size, by the same reload that grows maps, before the first sync
/// that writes IPv6 frontends. Dormant maps hold no flow (no IPv6 frontend
/// was ever written to them), so waking loses nothing. Awake, they stay
/// awake (pinned, adopted across restarts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Maps {
    Dormant,
    /// Dormant, and the next sync writes IPv6 frontends.
    Waking,
    Awake,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: lb_common::DEFAULT_SERVICES_MAX_ENTRIES,
            backends: lb_common::DEFAULT_BACKENDS_MAX_ENTRIES,
            conntrack: lb_common::DEFAULT_CONNTRACK_MAX_ENTRIES,
            affinity: lb_common::DEFAULT_AFFINITY_MAX_ENTRIES,
            source_ranges: lb_common::DEFAULT_SOURCE_RANGES_MAX_ENTRIES,
            maglev: MaglevConfig::default(),
            ipv6: false,
        }
    }
}

/// log2 of ENDPOINT_FILTER's bits for maps of `sizes`: 32 bits per entry
/// SERVICES and BACKENDS can hold (a Bloom filter with one hash function
/// then has at most about 3 % of its bits set, counting a frontend, its
/// cluster IP and its backends; slots add entries but no bits), within
/// `lb_common::{MIN,MAX}_ENDPOINT_FILTER_BITS_LOG2`.
pub fn endpoint_filter_bits_log2(sizes: &MapSizes) -> u32 {
    let bits = (u64::from(sizes.services) + u64::from(sizes.backends)).saturating_mul(32).next_power_of_two();
    bits.trailing_zeros().clamp(lb_common::MIN_ENDPOINT_FILTER_BITS_LOG2, lb_common::MAX_ENDPOINT_FILTER_BITS_LOG2)
}

/// Entries of the agent-owned maps: what a sync needs, or what the maps
/// hold room for (`Maps::capacity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub services: usize,
    pub service_addrs: usize,
    pub backends: usize,
    pub source_ranges: usize,
}

impl Entries {
    /// Each map's least of `self` and `other`: the room two families'
    /// maps of one size have, grown together.
    pub fn least(&self, other: &Entries) -> Entries {
        Entries {
            services: self.services.min(other.services),
            service_addrs: self.service_addrs.min(other.service_addrs),
            backends: self.backends.min(other.backends),
            source_ranges: self.source_ranges.min(other.source_ranges),
        }
    }

    /// Each map's most of `self` and `other`: what two families' maps of
    /// one size must hold.
    pub fn most(&self, other: &Entries) -> Entries {
        Entries {
            services: self.services.max(other.services),
            service_addrs: self.service_addrs.max(other.service_addrs),
            backends: self.backends.max(other.backends),
            source_ranges: self.source_ranges.max(other.source_ranges),
        }
    }

    /// What a sync from `current` to `target` needs: every key of either
    /// (both are in the maps at once, mid-sync). `target` may hold only the
    /// frontends a sync touches (`Reconciler::prepare`): the others are in
    /// `current` already.
    pub fn needed<A: lb_common::Address>(current: &MapContents<A>, target: &MapContents<A>) -> Self {
        // |current ∪ target| = |current| + |target \ current|, without a
        // set of both (SERVICES holds hundreds of thousands of keys).
        fn union<K>(current: usize, target: impl Iterator<Item = K>, held: impl Fn(&K) -> bool) -> usize {
            current + target.filter(|k| !held(k)).count()
        }
        Self {
            services: union(current.services.len(), target.services.keys(), |k| current.services.contains_key(*k)),
            service_addrs: union(current.addrs.len(), target.addrs.keys(), |k| current.addrs.contains_key(*k)),
            backends: union(current.backends.len(), target.backends.keys(), |k| current.backends.contains_key(*k)),
            source_ranges: union(current.source_ranges.len(), target.source_ranges.iter(), |k| {
                current.source_ranges.contains(*k)
            }),
        }
    }

    /// What `contents` holds.
    pub fn held<A: lb_common::Address>(contents: &MapContents<A>) -> Self {
        Self {
            services: contents.services.len(),
            service_addrs: contents.addrs.len(),
            backends: contents.backends.len(),
            source_ranges: contents.source_ranges.len(),
        }
    }

    /// Each map by its name, with `self`'s count.
    pub fn by_map(&self) -> [(&'static str, usize); 4] {
        [
            (lb_common::MAP_SERVICES, self.services),
            (lb_common::MAP_SERVICE_ADDRS, self.service_addrs),
            (lb_common::MAP_BACKENDS, self.backends),
            (lb_common::MAP_SOURCE_RANGES, self.source_ranges),
        ]
    }

    /// `by_map` under the IPv6 maps' names.
    pub fn by_map6(&self) -> [(&'static str, usize); 4] {
        [
            (lb_common::MAP_SERVICES6, self.services),
            (lb_common::MAP_SERVICE_ADDRS6, self.service_addrs),
            (lb_common::MAP_BACKENDS6, self.backends),
            (lb_common::MAP_SOURCE_RANGES6, self.source_ranges),
        ]
    }
}

/// Room grown maps get beyond what is needed now: half as much again, so
/// a cluster growing steadily causes a reload now and then, not per sync.
const HEADROOM_NUM: usize = 3;
const HEADROOM_DEN: usize = 2;
/// A map's fill (entries / capacity) worth a warning.
pub const WARN_FILL: f64 = 0.9;

/// The sizes to grow the agent-written maps to, from `capacity` (what the
/// kernel's maps hold room for) to fit `needed`; None when everything
/// fits. A map that must grow gets the need plus headroom, and never less
/// than its floor; the others keep their capacity (never shrink under
/// what they hold). SERVICE_ADDRS is sized with SERVICES. The maps the
/// datapath writes, and MAGLEV, are shared by the grown generation and
/// keep `floors`' values, which only matter for fresh maps. Waking IPv6
/// maps are a reason to reload too (`Ipv6Maps`).
pub fn grown(capacity: &Entries, needed: &Entries, floors: &MapSizes, ipv6: Ipv6Maps) -> Option<MapSizes> {
    let room = |need: usize, floor: u32| {
        let with_headroom = need.saturating_mul(HEADROOM_NUM).div_ceil(HEADROOM_DEN);
        u32::try_from(with_headroom).unwrap_or(u32::MAX).max(floor)
    };
    let kept = |cap: usize| u32::try_from(cap).unwrap_or(u32::MAX);
    let services_short = needed.services > capacity.services || needed.service_addrs > capacity.service_addrs;
    let backends_short = needed.backends > capacity.backends;
    let ranges_short = needed.source_ranges > capacity.source_ranges;
    if !(services_short || backends_short || ranges_short || ipv6 == Ipv6Maps::Waking) {
        return None;
    }
    Some(MapSizes {
        services: if services_short {
            room(needed.services.max(needed.service_addrs), floors.services)
        } else {
            kept(capacity.services.max(capacity.service_addrs))
        },
        backends: if backends_short { room(needed.backends, floors.backends) } else { kept(capacity.backends) },
        source_ranges: if ranges_short {
            room(needed.source_ranges, floors.source_ranges)
        } else {
            kept(capacity.source_ranges)
        },
        ipv6: ipv6 != Ipv6Maps::Dormant,
        ..*floors
    })
}

/// The maps at or above `WARN_FILL` for `needed` in `capacity`: (map,
/// entries, capacity).
pub fn nearly_full(capacity: &Entries, needed: &Entries) -> Vec<(&'static str, usize, usize)> {
    capacity
        .by_map()
        .into_iter()
        .zip(needed.by_map())
        .filter(|((_, cap), (_, need))| *cap > 0 && *need as f64 >= WARN_FILL * *cap as f64)
        .map(|((name, cap), (_, need))| (name, need, cap))
        .collect()
}

/// Bytes of kernel memory a CONNTRACK entry costs: key (16) and value
/// (24) plus an LRU hash element's header and bucket. `bpftool map show`
/// reports 74,702,616 bytes for 658,233 entries (113.5 each) on this
/// project's 6.18 kernel.
pub const CONNTRACK_ENTRY_BYTES: u64 = 112;
/// Share of the node's memory CONNTRACK may take by default: 0.25 %,
/// Cilium's default `bpf-map-dynamic-size-ratio`.
pub const CONNTRACK_MEMORY_PERMILLE: f64 = 2.5;
/// Never fewer entries than this: kube-proxy's floor of 131,072 flows
/// (`conntrack.min`), two entries per flow.
pub const CONNTRACK_MIN_ENTRIES: u32 = 262_144;
/// Nor more than this (Cilium's cap, 2^24), whatever the memory.
pub const CONNTRACK_MAX_ENTRIES: u32 = 1 << 24;

/// CONNTRACK's default size on a node with `total_memory` bytes, for an
/// agent limited to `memory_limit` bytes: 0.25 % of memory at
/// `CONNTRACK_ENTRY_BYTES` an entry, but no more than a quarter of the
/// limit (map memory is charged to the agent's memory cgroup: a huge node
/// must not make the agent's own maps exceed its container's limit),
/// within [`CONNTRACK_MIN_ENTRIES`, `CONNTRACK_MAX_ENTRIES`]. 24 GiB:
/// 575,218 entries (287,609 flows, 61 MiB).
pub fn conntrack_entries(total_memory: u64, memory_limit: Option<u64>) -> u32 {
    let node_share = total_memory as f64 * CONNTRACK_MEMORY_PERMILLE / 1000.0;
    let budget = memory_limit.map_or(node_share, |limit| node_share.min(limit as f64 / 4.0));
    let entries = (budget / CONNTRACK_ENTRY_BYTES as f64) as u64;
    entries.clamp(u64::from(CONNTRACK_MIN_ENTRIES), u64::from(CONNTRACK_MAX_ENTRIES)) as u32
}

/// MemTotal of /proc/meminfo's text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use lb_common::{ServiceKey, ServiceValue};

    use super::*;

    #[test]
    fn the_endpoint_filter_grows_with_the_maps_it_covers() {
        let bits =
            |services, backends| endpoint_filter_bits_log2(&MapSizes { services, backends, ..MapSizes::default() });
        // The defaults: 131,072 entries, 4 Mi bits (512 KiB).
        assert_eq!(endpoint_filter_bits_log2(&MapSizes::default()), lb_common::DEFAULT_ENDPOINT_FILTER_BITS_LOG2);
        // 100,000 Services of 4 backends: 32 Mi bits (4 MiB).
        assert_eq!(bits(501_024, 401_024), 25);
        assert_eq!(bits(1, 1), lb_common::MIN_ENDPOINT_FILTER_BITS_LOG2);
        assert_eq!(bits(u32::MAX, u32::MAX), lb_common::MAX_ENDPOINT_FILTER_BITS_LOG2);
    }

    fn contents(frontends: u8, slots: u16) -> MapContents {
        let mut c = MapContents::default();
        for f in 0..frontends {
            let key = ServiceKey::new([10, 96, 0, f], 80u16.to_be_bytes(), 6, 0);
            for slot in 0..=slots {
                c.services.insert(key.with_slot(slot), ServiceValue::default());
            }
            c.addrs.insert([10, 96, 0, f], Default::default());
        }
        c
    }

    #[test]
    fn a_sync_needs_room_for_the_old_and_the_new_entries_at_once() {
        let (old, new) = (contents(3, 2), contents(5, 2));
        let needed = Entries::needed(&old, &new);
        assert_eq!((needed.services, needed.service_addrs), (15, 5), "old keys are a subset here");
        let mut moved = contents(0, 0);
        moved.services.insert(ServiceKey::new([10, 97, 0, 1], [0, 80], 6, 0), ServiceValue::default());
        assert_eq!(Entries::needed(&old, &moved).services, 9 + 1, "both until the old are deleted");
    }

    #[test]
    fn maps_grow_with_headroom_only_when_short_and_never_below_the_flags() {
        let floors = MapSizes { services: 100, backends: 50, source_ranges: 10, ..MapSizes::default() };
        let capacity = Entries { services: 100, service_addrs: 100, backends: 50, source_ranges: 10 };
        let fits = Entries { services: 100, service_addrs: 40, backends: 50, source_ranges: 0 };
        assert_eq!(grown(&capacity, &fits, &floors, Ipv6Maps::Dormant), None, "exactly full still fits");

        let needed = Entries { services: 101, ..fits };
        let sizes = grown(&capacity, &needed, &floors, Ipv6Maps::Dormant).expect("SERVICES is short");
        assert_eq!(
            (sizes.services, sizes.backends, sizes.source_ranges),
            (152, 50, 10),
            "only SERVICES grows, by half"
        );

        let needed = Entries { backends: 1_000, source_ranges: 11, ..fits };
        let sizes = grown(&capacity, &needed, &floors, Ipv6Maps::Dormant).unwrap();
        assert_eq!((sizes.services, sizes.backends, sizes.source_ranges), (100, 1_500, 17));

        // Maps pinned by an earlier agent bigger than the flags keep their
        // size when they fit; a floor higher than the need wins.
        let pinned = Entries { backends: 5_000, ..capacity };
        let sizes = grown(&pinned, &Entries { services: 200, ..fits }, &floors, Ipv6Maps::Dormant).unwrap();
        assert_eq!((sizes.services, sizes.backends), (300, 5_000));
        let big_floors = MapSizes { services: 10_000, ..floors };
        assert_eq!(
            grown(&capacity, &Entries { services: 200, ..fits }, &big_floors, Ipv6Maps::Dormant).unwrap().services,
            10_000
        );

        // 30,000 Services of 4 endpoints: 150,000 SERVICES entries.
        let defaults = Entries { services: 65_536, service_addrs: 65_536, backends: 65_536, source_ranges: 16_384 };
        let cluster = Entries { services: 150_000, service_addrs: 30_000, backends: 120_000, source_ranges: 0 };
        let sizes = grown(&defaults, &cluster, &MapSizes::default(), Ipv6Maps::Dormant).unwrap();
        assert_eq!((sizes.services, sizes.backends, sizes.source_ranges), (225_000, 180_000, 16_384));
        assert!(!sizes.ipv6, "dormant IPv6 maps stay dormant");
    }

    #[test]
    fn ipv6_maps_wake_by_a_reload_of_their_own_and_stay_awake() {
        let floors = MapSizes { services: 100, backends: 50, source_ranges: 10, ..MapSizes::default() };
        let capacity = Entries { services: 200, service_addrs: 200, backends: 50, source_ranges: 10 };
        let fits = Entries { services: 10, service_addrs: 4, backends: 5, source_ranges: 0 };
        assert_eq!(grown(&capacity, &fits, &floors, Ipv6Maps::Awake), None, "awake maps that fit stay");
        let woken = grown(&capacity, &fits, &floors, Ipv6Maps::Waking).expect("waking is a reload");
        assert!(woken.ipv6);
        assert_eq!((woken.services, woken.backends), (200, 50), "nothing else changes size");
        let grown_later = grown(&capacity, &Entries { services: 300, ..fits }, &floors, Ipv6Maps::Awake).unwrap();
        assert!(grown_later.ipv6, "a later growth keeps them awake");
    }

    #[test]
    fn nearly_full_maps_are_named_from_ninety_percent() {
        let capacity = Entries { services: 100, service_addrs: 100, backends: 10, source_ranges: 0 };
        let needed = Entries { services: 89, service_addrs: 90, backends: 10, source_ranges: 0 };
        assert_eq!(
            nearly_full(&capacity, &needed),
            vec![(lb_common::MAP_SERVICE_ADDRS, 90, 100), (lb_common::MAP_BACKENDS, 10, 10)]
        );
    }

    #[test]
    fn conntrack_is_sized_from_memory_within_the_floor_and_the_cap() {
        const GIB: u64 = 1 << 30;
        assert_eq!(conntrack_entries(24 * GIB, None), 575_218, "the README's figure");
        assert_eq!(conntrack_entries(24 * GIB, Some(512 << 20)), 575_218, "the chart's limit is no bound here");
        assert_eq!(conntrack_entries(GIB, None), CONNTRACK_MIN_ENTRIES, "kube-proxy's floor on a small node");
        assert_eq!(conntrack_entries(4096 * GIB, None), CONNTRACK_MAX_ENTRIES);
        // 512 GiB under the chart's 512 MiB limit: 128 MiB of entries, not 1.3 GiB.
        assert_eq!(conntrack_entries(512 * GIB, Some(512 << 20)), 1_198_372);
        assert_eq!(conntrack_entries(0, None), CONNTRACK_MIN_ENTRIES);
        let meminfo = "MemTotal:       24683772 kB\nMemFree:        20000000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_683_772 * 1024));
        assert_eq!(mem_total("nothing"), None);
    }
}
