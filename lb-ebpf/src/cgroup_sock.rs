//! Socket-level balancing: cgroup hooks that send a socket straight to a
//! backend when it connects (or per datagram, for unconnected UDP), so its
//! packets need no NAT, and show the application the service address back
//! on recvmsg and getpeername. AF_INET sockets; AF_INET6 sockets to IPv6
//! service addresses (the IPv6 maps, SOCK_REVNAT6) and to v4-mapped ones
//! (`::ffff:a.b.c.d`, as dual-stack applications reach IPv4: the IPv4
//! maps). One code, compiled per family.
//!
//! Which sockets: those of one network namespace (`SOCKET_LB_NETNS`, the
//! agent's own: the node's host-network processes), or of every namespace
//! when it is 0. Lookup, refusal and selection are `lb`'s, as for packets;
//! what a socket hook cannot do the way a packet hook does is said in
//! ARCHITECTURE.md.
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use lb_common::{
    AFFINITY_CLIENT_NETNS, AFFINITY_CLIENT_SOCKET, Backend, CtKey, FRONTEND_EXTERNAL, Ipv4, Ipv6, NODE_PORT_TCP,
    NODE_PORT_TCP6, NODE_PORT_UDP, NODE_PORT_UDP6, PROTO_TCP, PROTO_UDP, ServiceKey, SockRevNatKey, SockRevNatValue,
    ct_timeout, flow_hash,
};

use crate::{
    conntrack,
    family::Family,
    lb::{self, Lookup, Selector},
    maps::NODE_PORTS,
};

/// The syscall goes on (with whatever address we left in the context).
const ALLOW: i32 = 1;
/// The syscall fails, with the error `bpf_set_retval` set.
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EADDRINUSE: i32 = 98;

/// The network namespace whose sockets are translated (its cookie); 0 for
/// all. The agent sets it at load time.
#[unsafe(no_mangle)]
static SOCKET_LB_NETNS: u64 = 0;

/// The host's network namespace (the agent's, its cookie), whose binds the
/// bind hooks check; 0 checks none. The agent sets it at load time.
#[unsafe(no_mangle)]
static HOST_NETNS: u64 = 0;

/// A host process binding a port that a NodePort serves on this node's
/// addresses would never see its traffic (the datapath takes it first):
/// its bind fails with EADDRINUSE instead, as with Cilium's post_bind.
/// Loopback and addresses no NodePort serves stay free.
#[cgroup_sock(post_bind4)]
pub fn sock_post_bind4(ctx: SockContext) -> i32 {
    // SAFETY: the context's own socket, readable in this hook.
    let sock = unsafe { &*ctx.sock };
    bind_check::<Ipv4>(&ctx, sock.src_ip4.to_ne_bytes(), sock.src_port, sock.protocol, false)
}

/// As `sock_post_bind4`, for AF_INET6 sockets: the wildcard (which takes
/// IPv4 connections too), v4-mapped addresses, and IPv6 node addresses
/// (the IPv6 maps).
#[cgroup_sock(post_bind6)]
pub fn sock_post_bind6(ctx: SockContext) -> i32 {
    // SAFETY: the context's own socket, readable in this hook.
    let sock = unsafe { &*ctx.sock };
    let words = sock.src_ip6;
    match words {
        // `::` takes IPv4 connections too: both families' NodePorts.
        [0, 0, 0, 0] => bind_check::<Ipv6>(&ctx, [0; 4], sock.src_port, sock.protocol, true),
        [0, 0, mapped, v4] if mapped == u32::from_be(0xffff) => {
            bind_check::<Ipv4>(&ctx, v4.to_ne_bytes(), sock.src_port, sock.protocol, false)
        }
        addr => bind_check::<Ipv6>(&ctx, addr, sock.src_port, sock.protocol, false),
    }
}

/// Refuses a bind of the host namespace to `addr`:`port` (port in host
/// order, as `bpf_sock` has it) that a NodePort frontend takes; the
/// unspecified address (any) takes the port of every NodePort of its
/// family, and of IPv4 too with `also_ipv4` (IPv6's `::`).
#[inline(always)]
fn bind_check<A: Family>(ctx: &SockContext, addr: A, port: u32, protocol: u32, also_ipv4: bool) -> i32 {
    // SAFETY: a global the loader may have rewritten; read it as such.
    let host = unsafe { core::ptr::read_volatile(&HOST_NETNS) };
    // SAFETY: the context's own pointer, as the helper expects.
    if host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock.cast()) } != host {
        return ALLOW;
    }
    let ipv6 = core::mem::size_of::<A>() == 16;
    let (protocol, ipv4_bit, ipv6_bit) = match protocol {
        p if p == PROTO_TCP as u32 => (PROTO_TCP, NODE_PORT_TCP, NODE_PORT_TCP6),
        p if p == PROTO_UDP as u32 => (PROTO_UDP, NODE_PORT_UDP, NODE_PORT_UDP6),
        _ => return ALLOW,
    };
    let bit = match (ipv6, also_ipv4) {
        (false, _) => ipv4_bit,
        (true, false) => ipv6_bit,
        (true, true) => ipv4_bit | ipv6_bit,
    };
    let port = port as u16;
    let taken = if addr == A::default() {
        NODE_PORTS.get(port as u32).is_some_and(|bits| bits & bit != 0)
    } else {
        let key = ServiceKey::new(addr, port.to_be_bytes(), protocol, 0);
        // SAFETY: the value is only read, while the map entry lives.
        unsafe { A::services().get(&key) }.is_some_and(|frontend| frontend.flags & FRONTEND_EXTERNAL != 0)
    };
    if !taken {
        return ALLOW;
    }
    // SAFETY: sets the errno of the refused syscall.
    unsafe { bpf_set_retval(-EADDRINUSE) };
    REJECT
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    to_backend4(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend4(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_service4(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    to_service4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_service6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    to_service6(&ctx)
}

/// What the socket hook does with a destination.
enum Choice<A> {
    /// Not a service (or not a socket of ours): leave it.
    Leave,
    /// Send the socket to this backend instead.
    To(Backend<A>),
    /// Fail the call with ECONNREFUSED: a Service without endpoints, or a
    /// port a cluster IP does not define.
    Refuse,
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context's own pointer, as the helper expects.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Whether the socket is in a network namespace this agent translates.
#[inline(always)]
fn ours(netns: u64) -> bool {
    // SAFETY: a global the loader may have rewritten; read it as such.
    let wanted = unsafe { core::ptr::read_volatile(&SOCKET_LB_NETNS) };
    wanted == 0 || netns == wanted
}

/// The hash that picks a socket's Maglev entry: there is no 5-tuple yet at
/// connect time, so the socket stands for the flow.
#[inline(always)]
fn socket_hash<A: Family>(cookie: u64, vip: A, port: [u8; 2], protocol: u8) -> u32 {
    let c = cookie.to_ne_bytes();
    flow_hash(&CtKey { saddr: A::cookie_addr(c), daddr: vip, sport: [c[4], c[5]], dport: port, protocol, _pad: [0; 3] })
}

/// The backend for a socket of `ctx` going to `vip`:`port`; `datagram`
/// for one datagram of an unconnected UDP socket (sendmsg).
#[inline(always)]
fn choose<A: Family>(ctx: &SockAddrContext, vip: A, port: [u8; 2], protocol: u8, datagram: bool) -> Choice<A> {
    // SAFETY: the context's own pointer, as the helper expects.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    if !ours(netns) {
        return Choice::Leave;
    }
    // Every socket we translate belongs to a client inside the cluster.
    let frontend = match lb::lookup(vip, port, protocol, true) {
        Lookup::NotService | Lookup::UnknownPort { cluster_ip: false } => return Choice::Leave,
        // Left alone, it would be routed out of the node toward nobody.
        Lookup::UnknownPort { cluster_ip: true } => return Choice::Refuse,
        Lookup::Frontend(frontend) => frontend,
    };
    // Dropping is not possible at a socket: refusing at once is the
    // nearest (an internal client has no other node to try).
    if frontend.empty().is_some() {
        return Choice::Refuse;
    }
    let cookie = socket_cookie(ctx);
    let selector = Selector {
        // The namespace is the client: a pod, or the node's processes,
        // whose packets would all carry the node's address.
        client_kind: AFFINITY_CLIENT_NETNS,
        client: A::cookie_client(netns),
        hash: socket_hash(cookie, vip, port, protocol),
        // An unconnected UDP socket is one flow: its datagrams keep one
        // backend, as a conntrack entry keeps a packet flow's.
        sticky: datagram.then_some((AFFINITY_CLIENT_SOCKET, A::cookie_client(cookie), ct_timeout::UDP_ESTABLISHED_NS)),
    };
    match lb::select(&frontend, &selector, conntrack::now()) {
        Some((_, backend)) => Choice::To(backend),
        None => Choice::Refuse,
    }
}

/// Remembers that the socket reaches `vip`:`port` through `backend`, for
/// recvmsg and getpeername.
#[inline(always)]
fn remember<A: Family>(ctx: &SockAddrContext, backend: &Backend<A>, vip: A, port: [u8; 2]) {
    let key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: Default::default(),
    };
    let value = SockRevNatValue { vip, port, _pad: [0; 2] };
    // An LRU map evicts rather than fails; if it did fail, the application
    // would see the backend's address, not a broken connection.
    let _ = A::sock_revnat().insert(&key, &value, 0);
}

/// The service address and port the socket of `ctx` was sent away from,
/// if `addr`:`port` is a backend it was sent to.
#[inline(always)]
fn service_of<A: Family>(ctx: &SockAddrContext, addr: A, port: [u8; 2]) -> Option<SockRevNatValue<A>> {
    let key =
        SockRevNatKey { cookie: socket_cookie(ctx), backend_addr: addr, backend_port: port, _pad: Default::default() };
    // SAFETY: map values are plain data.
    unsafe { A::sock_revnat().get(&key) }.copied()
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: a plain helper call; the cgroup hook's error for the syscall.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// The port of the context, network order (in the low 16 bits).
#[inline(always)]
fn user_port(sa: &bpf_sock_addr) -> [u8; 2] {
    (sa.user_port as u16).to_ne_bytes()
}

#[inline(always)]
fn set_user_port(sa: &mut bpf_sock_addr, port: [u8; 2]) {
    sa.user_port = u32::from(u16::from_ne_bytes(port));
}

fn to_backend4(ctx: &SockAddrContext, datagram: bool) -> i32 {
    // SAFETY: the kernel hands the program a valid context for its run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (vip, port) = (sa.user_ip4.to_ne_bytes(), user_port(sa));
    match choose::<Ipv4>(ctx, vip, port, sa.protocol as u8, datagram) {
        Choice::Leave => ALLOW,
        Choice::Refuse => refuse(),
        Choice::To(backend) => {
            remember(ctx, &backend, vip, port);
            sa.user_ip4 = u32::from_ne_bytes(backend.addr);
            set_user_port(sa, backend.port);
            ALLOW
        }
    }
}

fn to_service4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `to_backend4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(service) = service_of::<Ipv4>(ctx, sa.user_ip4.to_ne_bytes(), user_port(sa)) {
        sa.user_ip4 = u32::from_ne_bytes(service.vip);
        set_user_port(sa, service.port);
    }
    ALLOW
}

/// The address of an AF_INET6 context, as lb-common's `Ipv6` holds one
/// (network-order bytes as words).
#[inline(always)]
fn user_ip6(sa: &bpf_sock_addr) -> Ipv6 {
    // SAFETY: reads of the context's own fields, one word at a time (the
    // verifier checks each context access).
    unsafe {
        [
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
            core::ptr::read_volatile(&sa.user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn set_user_ip6(sa: &mut bpf_sock_addr, addr: Ipv6) {
    // SAFETY: word writes of the context's own field, as the verifier
    // allows them.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], addr[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], addr[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], addr[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], addr[3]);
    }
}

/// The IPv4 address inside a v4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[inline(always)]
fn v4_mapped(words: Ipv6) -> Option<[u8; 4]> {
    (words[0] == 0 && words[1] == 0 && words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
        .then(|| words[3].to_ne_bytes())
}

#[inline(always)]
fn set_v4_mapped(sa: &mut bpf_sock_addr, addr: [u8; 4]) {
    // SAFETY: a write of the context's own field; the prefix stays mapped.
    unsafe { core::ptr::write_volatile(&mut sa.user_ip6[3], u32::from_ne_bytes(addr)) };
}

fn to_backend6(ctx: &SockAddrContext, datagram: bool) -> i32 {
    // SAFETY: as in `to_backend4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (addr, port, protocol) = (user_ip6(sa), user_port(sa), sa.protocol as u8);
    if let Some(vip) = v4_mapped(addr) {
        return match choose::<Ipv4>(ctx, vip, port, protocol, datagram) {
            Choice::Leave => ALLOW,
            Choice::Refuse => refuse(),
            Choice::To(backend) => {
                remember(ctx, &backend, vip, port);
                set_v4_mapped(sa, backend.addr);
                set_user_port(sa, backend.port);
                ALLOW
            }
        };
    }
    match choose::<Ipv6>(ctx, addr, port, protocol, datagram) {
        Choice::Leave => ALLOW,
        Choice::Refuse => refuse(),
        Choice::To(backend) => {
            remember(ctx, &backend, addr, port);
            set_user_ip6(sa, backend.addr);
            set_user_port(sa, backend.port);
            ALLOW
        }
    }
}

fn to_service6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `to_backend4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (addr, port) = (user_ip6(sa), user_port(sa));
    if let Some(addr) = v4_mapped(addr) {
        if let Some(service) = service_of::<Ipv4>(ctx, addr, port) {
            set_v4_mapped(sa, service.vip);
            set_user_port(sa, service.port);
        }
    } else if let Some(service) = service_of::<Ipv6>(ctx, addr, port) {
        set_user_ip6(sa, service.vip);
        set_user_port(sa, service.port);
    }
    ALLOW
}
