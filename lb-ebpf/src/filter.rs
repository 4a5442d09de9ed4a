//! The first question a TCP or UDP packet meets: can it be service
//! traffic at all? ENDPOINT_FILTER (see lb-common) answers with three bit
//! reads; only packets it cannot rule out pay for the hash lookups of
//! conntrack and the Service maps.
use lb_common::{FILTER_ANY_PORT, FILTER_FROM, FILTER_TO, filter_bit, filter_position};

use crate::{
    family::Family,
    maps::{ENDPOINT_FILTER, endpoint_filter_bits_log2},
    parse::Packet,
};

/// False when `packet` is certainly neither to a frontend (or a cluster
/// IP, on any port) nor from a backend: then no Service and no conntrack
/// entry concerns it. True on a false positive, and when the map cannot
/// be read (the full path decides then, as without the filter).
#[inline(always)]
pub fn may_be_service_traffic<A: Family>(packet: &Packet<A>) -> bool {
    let bits = endpoint_filter_bits_log2();
    is_set(filter_bit(FILTER_TO, packet.daddr, packet.dport, bits))
        || is_set(filter_bit(FILTER_FROM, packet.saddr, packet.sport, bits))
        || is_set(filter_bit(FILTER_TO, packet.daddr, FILTER_ANY_PORT, bits))
}

#[inline(always)]
fn is_set(bit: u32) -> bool {
    let (line, word, mask) = filter_position(bit);
    // An array lookup, which the verifier inlines: no helper call.
    match ENDPOINT_FILTER.get(line) {
        Some(line) => line[word & 7] & mask != 0,
        None => true,
    }
}
