//! Socket-level balancing for host-network clients (the node itself,
//! hostNetwork pods): cgroup hooks that send a socket straight to a backend
//! when it connects (or per datagram, for unconnected UDP), so its packets
//! need no NAT; and show the application the service address back on
//! recvmsg and getpeername. Selection is random here: there is no 5-tuple
//! yet at connect time.
use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use lb_common::{ServiceKey, SockRevNatKey, SockRevNatValue};

use crate::{
    maps::{SERVICE_ADDRS, SERVICES, SOCK_REVNAT},
    service::{random_backend, scoped},
};

/// The syscall goes on (with whatever address we left in the context).
const ALLOW: i32 = 1;
/// The syscall fails (EPERM): a Service without endpoints refuses at once.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_service(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    to_service(&ctx)
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context's own pointer, as the helper expects.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// The address and port of the context, as network-order bytes.
#[inline(always)]
fn user_addr(sa: &bpf_sock_addr) -> ([u8; 4], [u8; 2]) {
    // Both fields hold network-order values; the port in the low 16 bits.
    (sa.user_ip4.to_ne_bytes(), (sa.user_port as u16).to_ne_bytes())
}

fn to_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid context for its run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (vip, port) = user_addr(sa);
    // SAFETY: map values are plain data.
    if unsafe { SERVICE_ADDRS.get(&vip) }.is_none() {
        return ALLOW;
    }
    let frontend = ServiceKey::new(vip, port, sa.protocol as u8, 0);
    // SAFETY: as above.
    let Some(service) = (unsafe { SERVICES.get(&frontend) }) else {
        return ALLOW;
    };
    // Host clients are inside the cluster.
    let (frontend, service) = scoped(frontend, service, true);
    let count = service.backend_count;
    if count == 0 {
        return REFUSE;
    }
    let Some((_, backend)) = random_backend(&frontend, count) else {
        return REFUSE;
    };
    let key =
        SockRevNatKey { cookie: cookie(ctx), backend_addr: backend.addr, backend_port: backend.port, _pad: [0; 2] };
    let value = SockRevNatValue { vip, port, _pad: [0; 2] };
    // An LRU map evicts rather than fails; if it did fail, the application
    // would see the backend's address, not a broken connection.
    let _ = SOCK_REVNAT.insert(&key, &value, 0);
    sa.user_ip4 = u32::from_ne_bytes(backend.addr);
    sa.user_port = u32::from(u16::from_ne_bytes(backend.port));
    ALLOW
}

fn to_service(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `to_backend`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (addr, port) = user_addr(sa);
    let key = SockRevNatKey { cookie: cookie(ctx), backend_addr: addr, backend_port: port, _pad: [0; 2] };
    // SAFETY: map values are plain data.
    if let Some(service) = unsafe { SOCK_REVNAT.get(&key) } {
        sa.user_ip4 = u32::from_ne_bytes(service.vip);
        sa.user_port = u32::from(u16::from_ne_bytes(service.port));
    }
    ALLOW
}
