//! ENDPOINT_FILTER's bits (the map is described in lb-common): which bits
//! the map entries need, which a conntrack entry needs, and the agent's
//! copy of the map, which sets a bit before the entry that needs it is
//! written and clears one only when nothing has needed it for two sweeps.
//!
//! Why two sweeps: a program run that read an entry just before the agent
//! deleted it may still create a conntrack entry that needs the entry's
//! bit. Such a run ends within microseconds; a bit unneeded at one sweep
//! and still at the next (a minute later) has no such run left.
use std::collections::HashSet;

use lb_common::{
    ADDR_DROP_UNKNOWN_PORTS, Address, CT_DIRECTION_DNAT, CT_DIRECTION_HAIRPIN, CT_DIRECTION_HAIRPIN_REPLY,
    CT_DIRECTION_REVERSE_SNAT, CT_DIRECTION_SNAT, CT_DIRECTION_SNAT_REPLY, CtKey, CtValue, FILTER_ANY_PORT,
    FILTER_FROM, FILTER_TO, FilterLine, filter_bit, filter_lines, filter_position,
};

use crate::{
    explain::MapLookups,
    plan::{MapContents, MapOp},
};

/// The bit a map write needs set before it is made, in a filter of
/// 2^`bits_log2` bits: a frontend's, a cluster IP's (any port), a
/// backend's (its replies). None for writes that add no endpoint. The
/// filter is shared by both families.
pub fn bit_of_op<A: Address>(op: &MapOp<A>, bits_log2: u32) -> Option<u32> {
    match op {
        MapOp::PutService(key, _) if key.slot == 0 => Some(filter_bit(FILTER_TO, key.vip, key.port, bits_log2)),
        MapOp::PutAddr(addr, value) if value.flags & ADDR_DROP_UNKNOWN_PORTS != 0 => {
            Some(filter_bit(FILTER_TO, *addr, FILTER_ANY_PORT, bits_log2))
        }
        MapOp::PutBackend(_, backend) => Some(filter_bit(FILTER_FROM, backend.addr, backend.port, bits_log2)),
        _ => None,
    }
}

/// The bits the entries of `contents` need.
pub fn wanted<A: Address>(contents: &MapContents<A>, bits_log2: u32) -> HashSet<u32> {
    let frontends = contents.frontend_entries().map(|(key, _)| filter_bit(FILTER_TO, key.vip, key.port, bits_log2));
    let cluster_ips = contents
        .addrs
        .iter()
        .filter(|(_, value)| value.flags & ADDR_DROP_UNKNOWN_PORTS != 0)
        .map(|(addr, _)| filter_bit(FILTER_TO, *addr, FILTER_ANY_PORT, bits_log2));
    let backends = contents.backends.values().map(|b| filter_bit(FILTER_FROM, b.addr, b.port, bits_log2));
    frontends.chain(cluster_ips).chain(backends).collect()
}

/// The bit that keeps the packets of conntrack entry `key` → `value` on
/// the full path: a forward entry's destination (its frontend), a reply
/// entry's source (its backend). None for an entry of no known direction,
/// which translates nothing.
pub fn flow_bit<A: Address, P>(key: &CtKey<A>, value: &CtValue<A, P>, bits_log2: u32) -> Option<u32> {
    match value.direction {
        CT_DIRECTION_DNAT | CT_DIRECTION_HAIRPIN | CT_DIRECTION_SNAT => {
            Some(filter_bit(FILTER_TO, key.daddr, key.dport, bits_log2))
        }
        CT_DIRECTION_REVERSE_SNAT | CT_DIRECTION_HAIRPIN_REPLY | CT_DIRECTION_SNAT_REPLY => {
            Some(filter_bit(FILTER_FROM, key.saddr, key.sport, bits_log2))
        }
        _ => None,
    }
}

/// The bits a packet of flow `key` (as the packet has it) may pass the
/// filter by: its destination's and its source's (and, not here, its
/// destination address's "any port" bit).
pub fn packet_bits(key: &CtKey, bits_log2: u32) -> [u32; 2] {
    [filter_bit(FILTER_TO, key.daddr, key.dport, bits_log2), filter_bit(FILTER_FROM, key.saddr, key.sport, bits_log2)]
}

/// Whether the packet hooks' filter lets a packet of flow `key` (as the
/// packet has it) on to conntrack and the Service maps, as
/// `may_be_service_traffic` in lb-ebpf decides: a bit of its destination
/// (on its port or, for a cluster IP, any port) or of its source is set.
/// A line that cannot be read counts as all set, as in the programs.
pub fn lets_through<A: crate::family::Family>(key: &CtKey<A>, lookups: &dyn MapLookups<A>) -> bool {
    let bits = lookups.endpoint_filter_bits_log2();
    let is_set = |bit: u32| {
        let (line, word, mask) = filter_position(bit);
        lookups.endpoint_filter(line).is_none_or(|line| line[word] & mask != 0)
    };
    is_set(filter_bit(FILTER_TO, key.daddr, key.dport, bits))
        || is_set(filter_bit(FILTER_FROM, key.saddr, key.sport, bits))
        || is_set(filter_bit(FILTER_TO, key.daddr, FILTER_ANY_PORT, bits))
}

/// The agent's copy of ENDPOINT_FILTER, and the bits it found unneeded at
/// the last sweep.
#[derive(Clone, Debug)]
pub struct FilterCopy {
    lines: Vec<FilterLine>,
    bits_log2: u32,
    /// How many bits are set, kept as bits are set and cleared.
    set: u64,
    unneeded: HashSet<u32>,
}

impl FilterCopy {
    /// A copy of a map of 2^`bits_log2` bits holding `lines` (shorter: the
    /// rest are zero).
    pub fn new(mut lines: Vec<FilterLine>, bits_log2: u32) -> Self {
        lines.resize(filter_lines(bits_log2) as usize, [0; 8]);
        let set = lines.iter().flatten().map(|word| u64::from(word.count_ones())).sum();
        Self { lines, bits_log2, set, unneeded: HashSet::new() }
    }

    /// Bits set, and bits in all: how full the filter is (its false
    /// positive rate, with one hash function, is the ratio).
    pub fn fill(&self) -> (u64, u64) {
        (self.set, 1 << self.bits_log2)
    }

    /// log2 of the map's bits, which every bit of it is computed for.
    pub fn bits_log2(&self) -> u32 {
        self.bits_log2
    }

    pub fn is_set(&self, bit: u32) -> bool {
        let (line, word, mask) = filter_position(bit);
        self.lines.get(line as usize).is_some_and(|l| l[word] & mask != 0)
    }

    /// Sets `bit`; the line to write (index and value) when it was not set.
    pub fn set(&mut self, bit: u32) -> Option<(u32, FilterLine)> {
        // Needed now: a later sweep counts afresh from when it is not.
        self.unneeded.remove(&bit);
        let (line, word, mask) = filter_position(bit);
        let value = self.lines.get_mut(line as usize)?;
        if value[word] & mask != 0 {
            return None;
        }
        value[word] |= mask;
        self.set += 1;
        Some((line, *value))
    }

    /// Sets every bit of `bits`; the lines to write, each once.
    pub fn set_all(&mut self, bits: impl IntoIterator<Item = u32>) -> Vec<(u32, FilterLine)> {
        let mut changed = std::collections::BTreeSet::new();
        for bit in bits {
            if let Some((line, _)) = self.set(bit) {
                changed.insert(line);
            }
        }
        changed.into_iter().map(|line| (line, self.lines[line as usize])).collect()
    }

    /// Bits set in the copy.
    pub fn set_bits(&self) -> impl Iterator<Item = u32> + '_ {
        (0u32..).zip(&self.lines).flat_map(|(line, words)| {
            (0u32..).zip(words).filter(|(_, w)| **w != 0).flat_map(move |(word, w)| {
                (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| line * 512 + word * 64 + b)
            })
        })
    }

    /// Bits set that `wanted` (the map entries') lacks: what a sweep would
    /// need the conntrack entries for. Cheap: no conntrack scan is needed
    /// when there are none.
    pub fn has_unneeded(&self, wanted: &HashSet<u32>) -> bool {
        self.set_bits().any(|bit| !wanted.contains(&bit))
    }

    /// One sweep: clears the bits neither `wanted` nor `live` (the live
    /// conntrack entries' `flow_bit`s) needs that were unneeded at the
    /// last sweep too, sets any wanted bit missing, and remembers the
    /// rest of the unneeded for the next sweep. Returns the lines to write.
    pub fn sweep(&mut self, wanted: &HashSet<u32>, live: &HashSet<u32>) -> Vec<(u32, FilterLine)> {
        let unneeded: HashSet<u32> =
            self.set_bits().filter(|bit| !wanted.contains(bit) && !live.contains(bit)).collect();
        let (clear, keep): (Vec<u32>, Vec<u32>) = unneeded.into_iter().partition(|bit| self.unneeded.contains(bit));
        let mut changed = std::collections::BTreeSet::new();
        for bit in clear {
            let (line, word, mask) = filter_position(bit);
            self.lines[line as usize][word] &= !mask;
            self.set -= 1;
            changed.insert(line);
        }
        changed.extend(self.set_all(wanted.iter().copied()).into_iter().map(|(line, _)| line));
        self.unneeded = keep.into_iter().collect();
        changed.into_iter().map(|line| (line, self.lines[line as usize])).collect()
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{Backend, ServiceAddr, ServiceKey, ServiceValue};

    use super::*;

    const BITS: u32 = lb_common::DEFAULT_ENDPOINT_FILTER_BITS_LOG2;

    fn contents() -> MapContents {
        let frontend = ServiceKey::new([10, 96, 0, 10], [0, 80], 6, 0);
        let mut contents = MapContents::default();
        contents.apply(&MapOp::PutBackend(1, Backend::new([10, 244, 1, 5], [0x1f, 0x90])));
        contents.apply(&MapOp::PutService(frontend.with_slot(1), ServiceValue::slot(1)));
        contents.apply(&MapOp::PutService(frontend, ServiceValue::frontend(1, 0, 0, 0)));
        let cluster_ip = ServiceAddr { frontends: 1, flags: ADDR_DROP_UNKNOWN_PORTS, _pad: 0 };
        contents.apply(&MapOp::PutAddr([10, 96, 0, 10], cluster_ip));
        contents
    }

    #[test]
    fn entries_need_their_frontends_cluster_ips_and_backends_bits() {
        let wanted = wanted(&contents(), BITS);
        let expected = [
            filter_bit(FILTER_TO, [10u8, 96, 0, 10], [0, 80], BITS),
            filter_bit(FILTER_TO, [10u8, 96, 0, 10], FILTER_ANY_PORT, BITS),
            filter_bit(FILTER_FROM, [10u8, 244, 1, 5], [0x1f, 0x90], BITS),
        ];
        assert_eq!(wanted, expected.into_iter().collect());
        // Each write that adds one of them names its bit; slots name none.
        let key = ServiceKey::new([10u8, 96, 0, 10], [0, 80], 6, 0);
        assert_eq!(bit_of_op(&MapOp::PutService(key, ServiceValue::frontend(1, 0, 0, 0)), BITS), Some(expected[0]));
        assert_eq!(bit_of_op(&MapOp::PutService(key.with_slot(1), ServiceValue::slot(1)), BITS), None);
        let node_addr = ServiceAddr { frontends: 1, flags: 0, _pad: 0 };
        assert_eq!(bit_of_op(&MapOp::PutAddr([192u8, 168, 0, 2], node_addr), BITS), None, "other ports are not ours");
    }

    #[test]
    fn a_bit_is_cleared_only_when_unneeded_at_two_sweeps_in_a_row() {
        let mut copy = FilterCopy::new(Vec::new(), BITS);
        let all = wanted(&contents(), BITS);
        let lines = copy.set_all(all.iter().copied());
        assert!(!lines.is_empty() && all.iter().all(|bit| copy.is_set(*bit)));
        assert!(copy.set_all(all.iter().copied()).is_empty(), "set bits are not written again");
        assert!(!copy.has_unneeded(&all));

        // The Service goes; one flow to it lives on, one reply of another ends.
        let flow = CtKey {
            saddr: [10, 244, 2, 7],
            daddr: [10, 96, 0, 10],
            sport: [0x9c, 0x40],
            dport: [0, 80],
            protocol: 6,
            _pad: [0; 3],
        };
        let forward: CtValue = CtValue { direction: CT_DIRECTION_DNAT, ..Default::default() };
        let live: HashSet<u32> = flow_bit(&flow, &forward, BITS).into_iter().collect();
        assert_eq!(packet_bits(&flow, BITS)[0], flow_bit(&flow, &forward, BITS).unwrap());
        let none = HashSet::new();
        assert!(copy.has_unneeded(&none));
        assert!(copy.sweep(&none, &live).is_empty(), "the first sweep only notes the unneeded");
        let frontend = filter_bit(FILTER_TO, [10u8, 96, 0, 10], [0, 80], BITS);
        let backend = filter_bit(FILTER_FROM, [10u8, 244, 1, 5], [0x1f, 0x90], BITS);
        let any_port = filter_bit(FILTER_TO, [10u8, 96, 0, 10], FILTER_ANY_PORT, BITS);
        assert!(!copy.sweep(&none, &live).is_empty());
        assert!(copy.is_set(frontend), "a live flow keeps its frontend's bit");
        assert!(!copy.is_set(backend) && !copy.is_set(any_port));

        // Needed again between two sweeps: kept, and the count restarts.
        let mut copy = FilterCopy::new(Vec::new(), BITS);
        copy.set_all([backend]);
        copy.sweep(&none, &none);
        let wanted_again = [backend].into_iter().collect();
        copy.sweep(&wanted_again, &none);
        copy.sweep(&none, &none);
        assert!(copy.is_set(backend), "unneeded at one sweep only");
        assert_eq!(copy.fill(), (1, 1 << BITS));
        copy.sweep(&none, &none);
        assert!(!copy.is_set(backend));
        assert_eq!(copy.set_bits().count(), 0);
        assert_eq!(copy.fill(), (0, 1 << BITS));
        let read_back = FilterCopy::new(vec![[0b101, 0, 0, 0, 0, 0, 0, 1 << 63]], BITS);
        assert_eq!(read_back.fill().0, 3, "a copy read from the map counts its bits");
    }

    #[test]
    fn a_sweep_repairs_a_wanted_bit_the_map_lacks() {
        let mut copy = FilterCopy::new(Vec::new(), BITS);
        let all = wanted(&contents(), BITS);
        let lines = copy.sweep(&all, &HashSet::new());
        assert!(!lines.is_empty());
        assert!(all.iter().all(|bit| copy.is_set(*bit)));
        assert_eq!(copy.set_bits().collect::<HashSet<_>>(), all);
    }
}
