//! tc ingress on the host side of a pod interface: everything a pod sends.
//! Requests to a service are DNATed to a backend; replies from backends are
//! translated back to the service address.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{HAIRPIN_ADDR, counter};

use crate::{
    maps::count,
    icmp,
    nat::{self, End},
    parse::{self, MAX_HEADERS_LEN, Packet, Unparsed},
    service::{self, Verdict},
};

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    match try_tc_from_pod(&ctx) {
        Ok((index, action)) => {
            count(index, len);
            action
        }
        Err(_) => {
            count(counter::DROP_REWRITE_FAILED, len);
            TC_ACT_SHOT as i32
        }
    }
}

fn parse_skb(ctx: &TcContext) -> Result<Packet, Unparsed> {
    match parse::parse(ctx.data(), ctx.data_end()) {
        Err(Unparsed::Short) if ctx.data_end() - ctx.data() < ctx.len() as usize => {
            // Headers not in the linear part of the skb: pull them in, once.
            let want = (ctx.len() as usize).min(MAX_HEADERS_LEN);
            ctx.pull_data(want as u32).map_err(|_| Unparsed::Short)?;
            parse::parse(ctx.data(), ctx.data_end())
        }
        parsed => parsed,
    }
}

/// Returns the counter to bump and the tc action.
fn try_tc_from_pod(ctx: &TcContext) -> Result<(u32, i32), i64> {
    let ok = TC_ACT_OK as i32;
    let Ok(packet) = parse_skb(ctx) else {
        return Ok((counter::PASS_UNPARSED, ok));
    };
    match service::classify(&packet) {
        Verdict::Dnat { backend, new, hairpin } => {
            nat::rewrite(ctx, &packet, End::Destination, backend.addr, backend.port)?;
            if hairpin {
                nat::rewrite(ctx, &packet, End::Source, HAIRPIN_ADDR, packet.sport)?;
            }
            Ok((if new { counter::DNAT_NEW } else { counter::DNAT_ESTABLISHED }, ok))
        }
        Verdict::ReverseNat(addr, port) => {
            nat::rewrite(ctx, &packet, End::Source, addr, port)?;
            Ok((counter::REVERSE_NAT, ok))
        }
        Verdict::HairpinReply { service: (addr, port), client } => {
            nat::rewrite(ctx, &packet, End::Source, addr, port)?;
            nat::rewrite(ctx, &packet, End::Destination, client, packet.dport)?;
            Ok((counter::REVERSE_NAT, ok))
        }
        Verdict::Pass => Ok((counter::PASS, ok)),
        Verdict::NoBackend => Ok((counter::REJECT_NO_BACKEND, icmp::reply_port_unreachable(ctx, &packet)?)),
        Verdict::UnknownPort => Ok((counter::DROP_UNKNOWN_PORT, TC_ACT_SHOT as i32)),
    }
}
