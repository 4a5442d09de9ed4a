//! The datapath. One file per hook; parsing, NAT and service selection are
//! shared helpers so the XDP hook can reuse them.
#![no_std]
#![no_main]

mod baseline;
mod cgroup_sock;
mod icmp;
mod maps;
mod nat;
mod parse;
mod service;
mod snat;
mod tc_pod;
mod translate;
mod xdp_wire;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
