//! Address and port rewrites with incremental checksum updates.
//!
//! On an skb the kernel's checksum helpers are used rather than arithmetic
//! of our own: they know whether the L4 checksum is complete or only the
//! pseudo-header part (CHECKSUM_PARTIAL, common on veth), and update it right
//! in both cases.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::PROTO_UDP;

use crate::parse::Packet;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `packet` in `ctx`.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    packet: &Packet,
    end: End,
    addr: [u8; 4],
    port: [u8; 2],
) -> Result<(), i64> {
    let (old_addr, old_port, addr_offset, port_offset) = match end {
        End::Source => (packet.saddr, packet.sport, packet.saddr_offset(), packet.sport_offset()),
        End::Destination => {
            (packet.daddr, packet.dport, packet.daddr_offset(), packet.dport_offset())
        }
    };
    // A UDP checksum of 0 means "none" and must stay 0.
    let mangled_0 = if packet.protocol == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let l4_check = packet.l4_check_offset();
    let from_addr = u64::from(u32::from_ne_bytes(old_addr));
    let to_addr = u64::from(u32::from_ne_bytes(addr));
    let from_port = u64::from(u16::from_ne_bytes(old_port));
    let to_port = u64::from(u16::from_ne_bytes(port));

    ctx.l4_csum_replace(l4_check, from_addr, to_addr, BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4)?;
    ctx.l4_csum_replace(l4_check, from_port, to_port, mangled_0 | 2)?;
    ctx.l3_csum_replace(packet.ip_check_offset(), from_addr, to_addr, 4)?;
    ctx.store(addr_offset, &addr, 0)?;
    ctx.store(port_offset, &port, 0)?;
    Ok(())
}
