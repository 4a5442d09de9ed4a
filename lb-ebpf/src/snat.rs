//! Source NAT of external clients whose backend is on another node.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup,
    },
    helpers::bpf_get_prandom_u32,
};
use lb_common::{Backend, CtKey, Ipv4, Ipv6};

use crate::{
    family::Family,
    maps::SNAT6,
    parse::Packet,
    route::{FibFamily, fib_lookup, fib_params},
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

impl SnatSource for Ipv6 {
    #[inline(always)]
    fn snat_source(
        ctx: *mut c_void,
        ifindex: u32,
        packet: &Packet<Ipv6>,
        backend: &Backend<Ipv6>,
    ) -> Option<(Ipv6, [u8; 2])> {
        source6(ctx, ifindex, packet, backend)
    }
}

/// Ports tried when the client's own port is taken toward that backend.
const PORT_FIRST: u32 = 32_768;
const PORT_COUNT: u32 = 32_768;
const PORT_ATTEMPTS: u32 = 4;

/// The address and port this node sends the flow of `packet` from, toward
/// `backend` (`pick`). (A function of its own, so its lookup buffer is not
/// on every packet's stack.)
#[inline(never)]
pub fn source(ctx: *mut c_void, ifindex: u32, packet: &Packet, backend: &Backend) -> Option<([u8; 4], [u8; 2])> {
    let mut params = fib_params(packet.protocol, [0; 4], backend.addr, ifindex, 0);
    let mut reply = CtKey::default();
    let client = (packet.saddr, packet.sport);
    pick(ctx, &mut params, &mut reply, client, (backend.addr, backend.port), packet.protocol)
}

/// `source` for IPv6. Its lookup parameters and key live in a per-CPU
/// slot (SNAT6): on the stack they would take the wire hook's deepest
/// chain past the verifier's 512 bytes. Its arguments are read through
/// volatile accesses, which keeps them pointers (`Family::read_volatile`).
#[inline(never)]
fn source6(ctx: *mut c_void, ifindex: u32, packet: &Packet<Ipv6>, backend: &Backend<Ipv6>) -> Option<(Ipv6, [u8; 2])> {
    let slot = SNAT6.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used by one program run at a time.
    let slot = unsafe { &mut *slot };
    let backend_addr = <Ipv6 as Family>::read_volatile(&backend.addr);
    let client = <Ipv6 as Family>::read_volatile(&packet.saddr);
    // SAFETY: reads of valid references.
    let (backend_port, client_port, protocol) = unsafe {
        (
            core::ptr::read_volatile(&backend.port),
            core::ptr::read_volatile(&packet.sport),
            core::ptr::read_volatile(&packet.protocol),
        )
    };
    slot.params = fib_params(protocol, Ipv6::default(), backend_addr, ifindex, 0);
    pick(ctx, &mut slot.params, &mut slot.reply, (client, client_port), (backend_addr, backend_port), protocol)
}

/// The address the kernel would pick for the route to the backend, and
/// the client's own port unless another flow already uses it toward that
/// backend (then a random high one), as netfilter's masquerade does.
/// `params` is the route lookup toward the backend; `reply` room for the
/// keys tried.
#[inline(always)]
fn pick<A: FibFamily>(
    ctx: *mut c_void,
    params: &mut bpf_fib_lookup,
    reply: &mut CtKey<A>,
    client: (A, [u8; 2]),
    backend: (A, [u8; 2]),
    protocol: u8,
) -> Option<(A, [u8; 2])> {
    let flags = BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH;
    if fib_lookup(ctx, params, flags) != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    let node = A::source(params);
    let mut port = client.1;
    let mut attempt = 0;
    while attempt < PORT_ATTEMPTS {
        *reply = A::flow_key(backend.0, node, backend.1, port, protocol);
        // SAFETY: plain data; only its existence and owner matter here.
        match unsafe { A::conntrack().get(&*reply) } {
            None => return Some((node, port)),
            // This very flow (a retransmitted first packet) keeps its port.
            Some(entry) if entry.snat_addr == client.0 && entry.snat_port == client.1 => {
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
