//! Refusing a packet the way kube-proxy's REJECT rule does: an ICMP port
//! unreachable back to the sender, from the address it tried to reach.
use crate::{
    maps::ICMP_REPLY,
    nat::Frame,
    parse::{ETH_HLEN, Packet},
};

const IPV4_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// RFC 792: the offending IP header and the first 8 bytes of its payload.
const QUOTED_LEN: usize = IPV4_HLEN + 8;
pub const REPLY_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + QUOTED_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const PROTO_ICMP: u8 = 1;

/// Internet checksum of `bytes` (an even number, as big-endian 16-bit words).
#[inline(always)]
fn checksum(bytes: &[u8]) -> [u8; 2] {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The ICMP port unreachable that refuses `packet`, addressed back to its
/// sender from the address it tried to reach, built in a per-CPU scratch
/// buffer (it would not fit on the stack next to the rest); `None` when
/// the packet has IP options (it is then only dropped).
#[inline(always)]
pub fn port_unreachable<F: Frame>(frame: &F, packet: &Packet) -> Result<Option<&'static [u8; REPLY_LEN]>, i64> {
    if packet.l4_offset != ETH_HLEN + IPV4_HLEN {
        return Ok(None);
    }
    let Some(reply) = ICMP_REPLY.get_ptr_mut(0) else { return Ok(None) };
    // SAFETY: this CPU's slot, used by one program run at a time.
    let reply = unsafe { &mut *reply };
    // Fixed-size loads: the verifier refuses a length that might be zero.
    let macs: [u8; 12] = frame.load(0)?;
    let quoted: [u8; QUOTED_LEN] = frame.load(ETH_HLEN)?;
    *reply = [0u8; REPLY_LEN];
    reply[ETH_HLEN + IPV4_HLEN + ICMP_HLEN..].copy_from_slice(&quoted);

    // Ethernet: back to the sender's MAC, from the MAC it sent to.
    reply[..6].copy_from_slice(&macs[6..12]);
    reply[6..12].copy_from_slice(&macs[..6]);
    reply[12..14].copy_from_slice(&[0x08, 0x00]);
    // IPv4: from the service address, to the client.
    let ip = ETH_HLEN;
    reply[ip] = 0x45;
    reply[ip + 2..ip + 4].copy_from_slice(&((REPLY_LEN - ETH_HLEN) as u16).to_be_bytes());
    reply[ip + 8] = 64;
    reply[ip + 9] = PROTO_ICMP;
    reply[ip + 12..ip + 16].copy_from_slice(&packet.daddr);
    reply[ip + 16..ip + 20].copy_from_slice(&packet.saddr);
    let ip_check = checksum(&reply[ip..ip + IPV4_HLEN]);
    reply[ip + 10..ip + 12].copy_from_slice(&ip_check);
    // ICMP: destination unreachable, port unreachable.
    let icmp = ip + IPV4_HLEN;
    reply[icmp] = ICMP_DEST_UNREACH;
    reply[icmp + 1] = ICMP_PORT_UNREACH;
    let icmp_check = checksum(&reply[icmp..]);
    reply[icmp + 2..icmp + 4].copy_from_slice(&icmp_check);
    Ok(Some(reply))
}
