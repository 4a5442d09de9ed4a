//! Address and port rewrites with incremental checksum updates, for both
//! kinds of hook.
//!
//! On an skb the kernel's checksum helpers are used rather than arithmetic
//! of our own: they know whether the L4 checksum is complete or only the
//! pseudo-header part (CHECKSUM_PARTIAL, common on veth), and update it right
//! in both cases. XDP sees frames as they came off the wire, whose
//! checksums are complete, and updates them by RFC 1624 arithmetic.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::{TcContext, XdpContext},
};
use lb_common::PROTO_UDP;

use crate::parse::Packet;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// A packet a hook may read and rewrite in place.
pub trait Frame {
    /// The length of the whole packet.
    fn len(&self) -> usize;
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], i64>;
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64>;
    /// Rewrites the source or destination address and port of `packet`.
    fn rewrite(&self, packet: &Packet, end: End, addr: [u8; 4], port: [u8; 2]) -> Result<(), i64>;
}

fn fields(packet: &Packet, end: End) -> ([u8; 4], [u8; 2], usize, usize) {
    match end {
        End::Source => (packet.saddr, packet.sport, packet.saddr_offset(), packet.sport_offset()),
        End::Destination => (packet.daddr, packet.dport, packet.daddr_offset(), packet.dport_offset()),
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], i64> {
        TcContext::load(self, offset)
    }

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64> {
        TcContext::store(self, offset, bytes, 0)
    }

    #[inline(always)]
    fn rewrite(&self, packet: &Packet, end: End, addr: [u8; 4], port: [u8; 2]) -> Result<(), i64> {
        let (old_addr, old_port, addr_offset, port_offset) = fields(packet, end);
        // A UDP checksum of 0 means "none" and must stay 0.
        let mangled_0 = if packet.protocol == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let l4_check = packet.l4_check_offset();
        let from_addr = u64::from(u32::from_ne_bytes(old_addr));
        let to_addr = u64::from(u32::from_ne_bytes(addr));
        let from_port = u64::from(u16::from_ne_bytes(old_port));
        let to_port = u64::from(u16::from_ne_bytes(port));

        self.l4_csum_replace(l4_check, from_addr, to_addr, BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4)?;
        self.l4_csum_replace(l4_check, from_port, to_port, mangled_0 | 2)?;
        self.l3_csum_replace(packet.ip_check_offset(), from_addr, to_addr, 4)?;
        TcContext::store(self, addr_offset, &addr, 0)?;
        TcContext::store(self, port_offset, &port, 0)?;
        Ok(())
    }
}

/// The Internet checksum `check` after the 16-bit words `old` become `new`
/// (RFC 1624, eqn. 3).
#[inline(always)]
pub fn csum_replace<const N: usize>(check: [u8; 2], old: &[u8; N], new: &[u8; N]) -> [u8; 2] {
    let mut sum = u32::from(!u16::from_be_bytes(check));
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

impl Frame for XdpContext {
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], i64> {
        let mut bytes = [0u8; N];
        // SAFETY: the helper checks the bounds and writes at most N bytes.
        let rc = unsafe { bpf_xdp_load_bytes(self.ctx, offset as u32, bytes.as_mut_ptr().cast(), N as u32) };
        if rc < 0 { Err(rc) } else { Ok(bytes) }
    }

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64> {
        // SAFETY: the helper checks the bounds and only reads N bytes, so
        // the pointer's mutability is never used.
        let rc = unsafe { bpf_xdp_store_bytes(self.ctx, offset as u32, bytes.as_ptr().cast_mut().cast(), N as u32) };
        if rc < 0 { Err(rc) } else { Ok(()) }
    }

    #[inline(always)]
    fn rewrite(&self, packet: &Packet, end: End, addr: [u8; 4], port: [u8; 2]) -> Result<(), i64> {
        let (old_addr, old_port, addr_offset, port_offset) = fields(packet, end);
        let ip_check = Frame::load::<2>(self, packet.ip_check_offset())?;
        Frame::store(self, packet.ip_check_offset(), &csum_replace(ip_check, &old_addr, &addr))?;
        let l4_check_offset = packet.l4_check_offset();
        let l4_check = Frame::load::<2>(self, l4_check_offset)?;
        // A UDP checksum of 0 means "none" and must stay 0; a computed 0 is sent as all ones.
        if !(packet.protocol == PROTO_UDP && l4_check == [0, 0]) {
            let check = csum_replace(csum_replace(l4_check, &old_addr, &addr), &old_port, &port);
            let check = if packet.protocol == PROTO_UDP && check == [0, 0] { [0xff, 0xff] } else { check };
            Frame::store(self, l4_check_offset, &check)?;
        }
        Frame::store(self, addr_offset, &addr)?;
        Frame::store(self, port_offset, &port)?;
        Ok(())
    }
}
