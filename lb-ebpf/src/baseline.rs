//! The minimal programs: the datapath's own header parsing, then pass, with
//! no map lookups. They are the floor the benchmarks measure the real hooks
//! against, and the test LAN's "switch ports" run the XDP one (a veth only
//! delivers frames its peer sends with XDP_TX when it runs XDP itself).
use core::hint::black_box;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action::XDP_PASS},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::parse::{self, Packet, Unparsed};

/// In both, IPv6 frames are parsed as the IPv6 pipeline parses them: the
/// IPv6 floor.
#[xdp]
pub fn xdp_baseline(ctx: XdpContext) -> u32 {
    parse_either(ctx.data(), ctx.data_end());
    XDP_PASS
}

#[classifier]
pub fn tc_baseline(ctx: TcContext) -> i32 {
    parse_either(ctx.data(), ctx.data_end());
    TC_ACT_OK as i32
}

#[inline(always)]
fn parse_either(data: usize, data_end: usize) {
    match parse::parse(data, data_end) {
        Err(Unparsed::Ipv6) => keep(parse::parse6(data, data_end)),
        parsed => keep(parsed),
    }
}

/// Keeps the parse from being optimised away: its result is used.
#[inline(always)]
fn keep<A>(parsed: Result<Packet<A>, Unparsed>) {
    black_box(parsed.map_or(0, |p| u32::from_ne_bytes([p.dport[0], p.dport[1], p.protocol, 0])));
}
