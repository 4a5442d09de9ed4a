//! Source NAT of external clients whose backend is on another node.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC},
    helpers::bpf_get_prandom_u32,
};
use lb_common::{Backend, CtKey, Ipv4, Ipv6};

use crate::{
    family::Family,
    maps::CONNTRACK,
    parse::Packet,
    route::{fib_lookup, fib_params},
};

/// A family whose external clients can be source-NATed toward a backend
/// on another node.
pub trait SnatSource: Family {
    fn snat_source(
        ctx: *mut c_void,
        ifindex: u32,
        packet: &Packet<Self>,
        backend: &Backend<Self>,
    ) -> Option<(Self, [u8; 2])>;
}

impl SnatSource for Ipv4 {
    #[inline(always)]
    fn snat_source(ctx: *mut c_void, ifindex: u32, packet: &Packet, backend: &Backend) -> Option<([u8; 4], [u8; 2])> {
        source(ctx, ifindex, packet, backend)
    }
}

/// Not yet: the external hooks do not parse IPv6, so no IPv6 packet comes
/// from the wire to be source-NATed (issue 17 lists what remains). A new
/// flow asking for it is dropped (`Verdict::SnatFailed`), never sent on
/// with a pod's address.
impl SnatSource for Ipv6 {
    #[inline(always)]
    fn snat_source(_: *mut c_void, _: u32, _: &Packet<Ipv6>, _: &Backend<Ipv6>) -> Option<(Ipv6, [u8; 2])> {
        None
    }
}

/// Ports tried when the client's own port is taken toward that backend.
const PORT_FIRST: u32 = 32_768;
const PORT_COUNT: u32 = 32_768;
const PORT_ATTEMPTS: u32 = 4;

/// The address and port this node sends the flow of `packet` from, toward
/// `backend`: the address the kernel would pick for that route, and the
/// client's own port unless another flow already uses it toward that
/// backend (then a random high one), as netfilter's masquerade does.
/// (A function of its own, so its lookup buffer is not on every packet's stack.)
#[inline(never)]
pub fn source(ctx: *mut c_void, ifindex: u32, packet: &Packet, backend: &Backend) -> Option<([u8; 4], [u8; 2])> {
    let mut params = fib_params(packet, [0; 4], backend.addr, ifindex, 0);
    let flags = BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH;
    if fib_lookup(ctx, &mut params, flags) != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    // SAFETY: the helper filled in the source address.
    let node = unsafe { params.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
    let mut port = packet.sport;
    let mut attempt = 0;
    while attempt < PORT_ATTEMPTS {
        let reply = CtKey {
            saddr: backend.addr,
            daddr: node,
            sport: backend.port,
            dport: port,
            protocol: packet.protocol,
            _pad: [0; 3],
        };
        // SAFETY: plain data; only its existence and owner matter here.
        match unsafe { CONNTRACK.get(&reply) } {
            None => return Some((node, port)),
            // This very flow (a retransmitted first packet) keeps its port.
            Some(entry) if entry.snat_addr == packet.saddr && entry.snat_port == packet.sport => {
                return Some((node, port));
            }
            Some(_) => {}
        }
        // SAFETY: a plain helper call.
        port = ((PORT_FIRST + unsafe { bpf_get_prandom_u32() } % PORT_COUNT) as u16).to_be_bytes();
        attempt += 1;
    }
    None
}
