//! The tc hooks' IPv6 halves: `tc_from_pod` tail-calls `tc_from_pod6`
//! for every IPv6 frame, `tc_from_wire` tail-calls `tc_from_wire6`. Both
//! run the IPv6 pipeline (pipeline6.rs) on an skb, and send frames on as
//! `tc_from_wire` does.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::Ipv6;

use crate::{
    parse::{Packet, Unparsed},
    pipeline6::{Hook6, pipeline6},
    skb, tc_wire,
};

#[classifier]
pub fn tc_from_pod6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    skb::counted(len, pipeline6(&ctx, 0))
}

#[classifier]
pub fn tc_from_wire6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let ifindex = skb::ifindex(&ctx);
    skb::counted(len, pipeline6(&ctx, ifindex))
}

impl Hook6 for TcContext {
    type Action = i32;
    const PASS: i32 = TC_ACT_OK as i32;
    const DROP: i32 = TC_ACT_SHOT as i32;

    #[inline(always)]
    fn parse6(&self) -> Result<Packet<Ipv6>, Unparsed> {
        skb::parse6(self)
    }

    #[inline(always)]
    fn reject6(&self, packet: &Packet<Ipv6>) -> Result<i32, i64> {
        skb::reject6(self, packet)
    }

    #[inline(always)]
    fn forward6(&self, packet: &Packet<Ipv6>, ifindex: u32) -> Result<i32, i64> {
        tc_wire::forward(self, packet, ifindex)
    }
}
