//! The datapath. One file per hook; parsing, NAT, conntrack and the
//! Service's lookup and selection are shared layers below them.
#![no_std]
#![no_main]

// Leaves: packet layout, map statics, rewrites and checksums, verdicts.
mod family;
mod maps;
mod nat;
mod parse;
mod verdict;
// Then state and semantics: conntrack, the Service's lookup and selection,
// route lookups, and source NAT; and the filter in front of them.
mod conntrack;
mod filter;
mod lb;
mod route;
mod snat;
// Then the packet pipeline the packet hooks share, its ICMP side, and
// what the tc hooks share.
mod classify;
mod icmp;
mod pipeline6;
mod skb;
mod translate;
// The hooks, thin: they adapt packets and sockets to the above.
mod baseline;
mod cgroup_sock;
mod tc6;
mod tc_pod;
mod tc_wire;
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
