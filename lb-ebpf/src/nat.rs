//! Address and port rewrites with incremental checksum updates, for both
//! kinds of hook.
//!
//! Headers are rewritten in place through direct packet access, with one
//! bounds check per field: the load/store helpers cost several times more.
//! The IPv4 header checksum is always complete and is updated by RFC 1624
//! arithmetic. So is the L4 checksum of an XDP frame, which comes off the
//! wire. On an skb the L4 checksum may hold only the pseudo-header sum
//! (CHECKSUM_PARTIAL, common on veth), which a program cannot see, so the
//! kernel's l4_csum_replace helper, which knows, updates it.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use core::ptr::{read_unaligned, read_volatile, write_unaligned};

use lb_common::{Ipv4, PROTO_UDP};

use crate::{family::Family, parse::Packet};

/// An address and port, network order.
pub type Endpoint<A = Ipv4> = (A, [u8; 2]);

/// The source and destination a packet leaves with.
#[derive(Clone, Copy, Default)]
pub struct Rewrite<A = Ipv4> {
    pub source: Endpoint<A>,
    pub destination: Endpoint<A>,
    /// Routed on from here (an SNAT flow), not handed to the stack.
    pub forward: bool,
}

/// A packet a hook may read and rewrite in place.
pub trait Frame {
    /// The length of the whole packet.
    fn len(&self) -> usize;
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], i64>;
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64>;
    /// Reads `dst.len()` bytes at `offset` into `dst`, through the hook's
    /// helper: for lengths that would not fit on the stack. The length must
    /// be known when this is compiled (the verifier refuses one that may
    /// be 0, which aya's `load_bytes`, clamping to the packet, passes).
    fn load_into(&self, offset: usize, dst: &mut [u8]) -> Result<(), i64>;
    /// `store` of bytes no header checksum covers (IPv6's hop limit): on
    /// an skb whose checksum is complete (CHECKSUM_COMPLETE), skb->csum
    /// follows, or a receiver on this host would find it stale.
    fn store_uncovered<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64>;
    /// Gives `packet` the source and destination of `rewrite`, checksums included.
    fn rewrite<A: Family>(&self, packet: &Packet<A>, rewrite: &Rewrite<A>) -> Result<(), i64>;
}

impl Frame for TcContext {
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    /// Through the helper, which also reaches data outside the linear
    /// part: ICMP errors are read and written so, where the headers are not
    /// pulled in first.
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], i64> {
        TcContext::load(self, offset)
    }

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64> {
        TcContext::store(self, offset, bytes, 0)
    }

    #[inline(always)]
    fn store_uncovered<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64> {
        TcContext::store(self, offset, bytes, aya_ebpf::bindings::BPF_F_RECOMPUTE_CSUM as u64)
    }

    #[inline(always)]
    fn load_into(&self, offset: usize, dst: &mut [u8]) -> Result<(), i64> {
        // SAFETY: `dst` is writable for its length.
        let rc = unsafe {
            aya_ebpf::helpers::bpf_skb_load_bytes(
                self.skb.skb as *const _,
                offset as u32,
                dst.as_mut_ptr() as *mut _,
                dst.len() as u32,
            )
        };
        if rc < 0 { Err(rc) } else { Ok(()) }
    }

    /// Each L4 checksum update is a helper call, so only what changes is
    /// updated: the addresses one by one, the two ports as one word. A
    /// function of its own, as for XDP: inlined, its stack would add to
    /// the pipeline's and break the verifier's limit on the external hook.
    /// An IPv6 address is four words: its change goes in as one sum
    /// (the helper's "by diff" form), not four calls.
    #[inline(never)]
    fn rewrite<A: Family>(&self, packet: &Packet<A>, rewrite: &Rewrite<A>) -> Result<(), i64> {
        let (source, destination) = (rewrite.source, rewrite.destination);
        // A UDP checksum of 0 means "none" and must stay 0.
        let mangled_0 = if packet.protocol == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let l4_check = packet.l4_check_offset();
        let old_addrs = [packet.saddr, packet.daddr];
        let new_addrs = [source.0, destination.0];
        let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled_0;
        for (old, new) in old_addrs.iter().zip(&new_addrs) {
            if old != new {
                match (old.word(), new.word()) {
                    (Some(old), Some(new)) => self.l4_csum_replace(l4_check, old, new, pseudo | 4)?,
                    _ => {
                        let diff = addr_diff(old, new);
                        self.l4_csum_replace(l4_check, 0, u64::from(diff), pseudo)?;
                        // On a CHECKSUM_COMPLETE skb the helper also takes
                        // `diff` off skb->csum, right for IPv4 (whose header
                        // checksum absorbs the address change) but not for
                        // IPv6, where the new addresses and the new L4
                        // checksum cancel out in the packet's sum. Give it
                        // back (a no-op on other skbs); BPF_F_IPV6, which
                        // says so to the helper, needs Linux 6.16.
                        // SAFETY: the context's own skb.
                        unsafe { aya_ebpf::helpers::bpf_csum_update(self.skb.skb, diff) };
                    }
                }
            }
        }
        let old_ports = [packet.sport[0], packet.sport[1], packet.dport[0], packet.dport[1]];
        let new_ports = [source.1[0], source.1[1], destination.1[0], destination.1[1]];
        if old_ports != new_ports {
            let (old, new) = (u32::from_ne_bytes(old_ports), u32::from_ne_bytes(new_ports));
            self.l4_csum_replace(l4_check, u64::from(old), u64::from(new), mangled_0 | 4)?;
        }
        // The helpers may have moved the data: only now take pointers.
        // SAFETY: the context's own __sk_buff, valid for the program run.
        let (data, data_end) =
            unsafe { (read_volatile(&(*self.skb.skb).data), read_volatile(&(*self.skb.skb).data_end)) };
        if old_addrs != new_addrs {
            if let Some(ip_check_offset) = A::IP_CHECK_OFFSET {
                let diff = addr_diff(&packet.saddr, &source.0) + addr_diff(&packet.daddr, &destination.0);
                let at = packet.l3_offset + ip_check_offset;
                let ip_check = load_at::<2>(data, data_end, at)?;
                store_at(data, data_end, at, &csum_apply(ip_check, diff))?;
            }
            store_addr(data, data_end, packet.saddr_offset(), &source.0)?;
            store_addr(data, data_end, packet.daddr_offset(), &destination.0)?;
        }
        store_at(data, data_end, packet.sport_offset(), &new_ports)
    }
}

/// Writes the address `addr` at `offset` of the packet, in place.
#[inline(always)]
fn store_addr<A: Family>(data: u32, data_end: u32, offset: usize, addr: &A) -> Result<(), i64> {
    // An IPv6 address's offset is read volatile: otherwise LLVM checks the
    // bound of one address's offset and derives the other's from it, and
    // the verifier, which sees only the derived register, finds no lower
    // bound. (IPv4's needs no help, and keeps its code.)
    // SAFETY: a read of a local.
    let offset = if core::mem::size_of::<A>() > 4 { unsafe { read_volatile(&offset) } } else { offset };
    let at = bytes_at_len(data, data_end, offset, core::mem::size_of::<A>())?;
    // SAFETY: `bytes_at_len` checked that the address fits in the packet.
    unsafe { write_unaligned(at as *mut A, *addr) };
    Ok(())
}

/// Every field a hook rewrites lies within this many bytes of the frame's start.
const MAX_HEADER_OFFSET: usize = 255;
/// -EFAULT, as the helpers say it.
const OUTSIDE_FRAME: i64 = -14;

/// The N bytes at `offset` of the packet at `[data, data_end)`, read in
/// place. For XDP, the headers are always in the frame's first buffer, the
/// only one this reaches; an skb has its headers pulled into the linear
/// part by the parser first.
#[inline(always)]
fn load_at<const N: usize>(data: u32, data_end: u32, offset: usize) -> Result<[u8; N], i64> {
    let at = bytes_at::<N>(data, data_end, offset)?;
    // SAFETY: `bytes_at` checked that the N bytes are in the packet.
    Ok(unsafe { read_unaligned(at) })
}

/// Writes `bytes` at `offset` of the packet at `[data, data_end)`, in place.
#[inline(always)]
fn store_at<const N: usize>(data: u32, data_end: u32, offset: usize, bytes: &[u8; N]) -> Result<(), i64> {
    let at = bytes_at::<N>(data, data_end, offset)?;
    // SAFETY: `bytes_at` checked that the N bytes are in the packet, which
    // both hooks may write.
    unsafe { write_unaligned(at, *bytes) };
    Ok(())
}

#[inline(always)]
fn bytes_at<const N: usize>(data: u32, data_end: u32, offset: usize) -> Result<*mut [u8; N], i64> {
    Ok(bytes_at_len(data, data_end, offset, N)? as *mut [u8; N])
}

#[inline(always)]
fn bytes_at_len(data: u32, data_end: u32, offset: usize, len: usize) -> Result<*mut u8, i64> {
    // The verifier only accepts a variable offset into the packet with a
    // known upper bound.
    if offset > MAX_HEADER_OFFSET {
        return Err(OUTSIDE_FRAME);
    }
    let start = data as usize + offset;
    if start + len > data_end as usize {
        return Err(OUTSIDE_FRAME);
    }
    Ok(start as *mut u8)
}

/// What replacing the bytes `old` by `new` adds to a one's complement sum
/// (RFC 1624, eqn. 3), not yet folded: N is even, and the bytes are taken
/// as they lie in the packet, since the sum does not depend on byte order
/// (RFC 1071) as long as the checksum is read and written the same way.
#[inline(always)]
fn csum_diff(old: &[u8], new: &[u8]) -> u32 {
    let mut diff = 0;
    let mut i = 0;
    while i + 1 < old.len() && i + 1 < new.len() {
        diff += u32::from(!u16::from_ne_bytes([old[i], old[i + 1]]));
        diff += u32::from(u16::from_ne_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    diff
}

/// `csum_diff` of two addresses of a family.
#[inline(always)]
fn addr_diff<A: Family>(old: &A, new: &A) -> u32 {
    old.sum16_complement() + new.sum16()
}

/// The Internet checksum `check` with `diff`, a sum of `csum_diff`s, applied.
#[inline(always)]
pub fn csum_apply(check: [u8; 2], diff: u32) -> [u8; 2] {
    let mut sum = u32::from(!u16::from_ne_bytes(check)) + diff;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}

/// The Internet checksum `check` after the bytes `old` become `new`.
#[inline(always)]
pub fn csum_replace<const N: usize>(check: [u8; 2], old: &[u8; N], new: &[u8; N]) -> [u8; 2] {
    csum_apply(check, csum_diff(old.as_slice(), new.as_slice()))
}

impl Frame for XdpContext {
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], i64> {
        let (data, data_end) = xdp_data(self);
        load_at(data, data_end, offset)
    }

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64> {
        let (data, data_end) = xdp_data(self);
        store_at(data, data_end, offset, bytes)
    }

    /// An XDP frame has no checksum beside its headers'.
    #[inline(always)]
    fn store_uncovered<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Result<(), i64> {
        Frame::store(self, offset, bytes)
    }

    #[inline(always)]
    fn load_into(&self, offset: usize, dst: &mut [u8]) -> Result<(), i64> {
        // SAFETY: `dst` is writable for its length.
        let rc = unsafe {
            aya_ebpf::helpers::bpf_xdp_load_bytes(self.ctx, offset as u32, dst.as_mut_ptr() as *mut _, dst.len() as u32)
        };
        if rc < 0 { Err(rc) } else { Ok(()) }
    }

    /// Both ends at once: one update of each checksum. A function of its
    /// own, so that its registers do not crowd the hook's stack.
    #[inline(never)]
    fn rewrite<A: Family>(&self, packet: &Packet<A>, rewrite: &Rewrite<A>) -> Result<(), i64> {
        let (source, destination) = (rewrite.source, rewrite.destination);
        let addrs = addr_diff(&packet.saddr, &source.0) + addr_diff(&packet.daddr, &destination.0);
        let ports = csum_diff(&packet.sport, &source.1) + csum_diff(&packet.dport, &destination.1);
        let l4_check_offset = packet.l4_check_offset();
        let l4_check = Frame::load::<2>(self, l4_check_offset)?;
        // A UDP checksum of 0 means "none" and must stay 0; a computed 0 is sent as all ones.
        if !(packet.protocol == PROTO_UDP && l4_check == [0, 0]) {
            let check = csum_apply(l4_check, addrs + ports);
            let check = if packet.protocol == PROTO_UDP && check == [0, 0] { [0xff, 0xff] } else { check };
            Frame::store(self, l4_check_offset, &check)?;
        }
        let (data, data_end) = xdp_data(self);
        if let Some(ip_check_offset) = A::IP_CHECK_OFFSET {
            let at = packet.l3_offset + ip_check_offset;
            let ip_check = load_at::<2>(data, data_end, at)?;
            store_at(data, data_end, at, &csum_apply(ip_check, addrs))?;
        }
        store_addr(data, data_end, packet.saddr_offset(), &source.0)?;
        store_addr(data, data_end, packet.daddr_offset(), &destination.0)?;
        Frame::store(self, packet.sport_offset(), &source.1)?;
        Frame::store(self, packet.dport_offset(), &destination.1)
    }
}

/// An XDP frame's data and data_end, read volatile: otherwise LLVM may move
/// the loads into a caller and pass the values in, zero-extended in the
/// callee by shifts, which the verifier refuses on packet pointers.
#[inline(always)]
pub fn xdp_data(ctx: &XdpContext) -> (u32, u32) {
    // SAFETY: the context's own xdp_md, valid for the program run.
    unsafe { (read_volatile(&(*ctx.ctx).data), read_volatile(&(*ctx.ctx).data_end)) }
}
