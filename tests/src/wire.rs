//! A node's external interface for the wire hooks' BPF_PROG_TEST_RUN
//! tests (wire.rs, wire6.rs): a network namespace of the test's own with
//! `ext0` on both families, a route to the other node's pods and
//! neighbour entries for it and the client, where the hooks' FIB lookups
//! happen; and the hook under test, tc or XDP, whose verdicts are read in
//! terms both share.
use std::net::Ipv6Addr;

use crate::{
    harness::Harness,
    netns::{Netns, unique_tag},
};

/// What a hook did with a frame, in terms both share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To the stack: XDP_PASS, TC_ACT_OK.
    Pass,
    /// XDP_DROP, TC_ACT_SHOT.
    Drop,
    /// Sent out the interface it came in on: XDP_TX, or a tc redirect.
    SentBack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub fn verdict(self, code: u32) -> Verdict {
        match (self, code) {
            (Hook::Xdp, 2) | (Hook::Tc, 0) => Verdict::Pass,
            (Hook::Xdp, 1) | (Hook::Tc, 2) => Verdict::Drop,
            (Hook::Xdp, 3) | (Hook::Tc, 7) => Verdict::SentBack,
            _ => panic!("{self:?}: unexpected verdict {code}"),
        }
    }

    /// The program the agent attaches for this hook.
    pub fn program(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp_from_wire",
            Hook::Tc => "tc_from_wire",
        }
    }
}

/// The node's address on `ext0`, and the other node's and the client's
/// beside it, per family.
pub const NODE: [u8; 4] = [10, 200, 0, 1];
pub const OTHER_NODE: [u8; 4] = [10, 200, 0, 2];
pub const CLIENT: [u8; 4] = [10, 200, 0, 100];
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
pub const OTHER_NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x100);
pub const OTHER_NODE_MAC: &str = "02:00:00:00:00:22";
pub const CLIENT_MAC: &str = "02:00:00:00:00:64";
/// The other node's pods, routed via the other node, per family.
pub const REMOTE_PODS: &str = "10.1.2.0/24";
pub const REMOTE_PODS6: &str = "fd00:244:2::/64";

/// A node namespace and the hook under test.
pub struct Wire {
    pub netns: Netns,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub hook: Hook,
}

impl Wire {
    /// A node namespace with `ext0` (10.200.0.1/24, fd00:200::1/64), the
    /// other node's pod CIDRs routed via the other node, and neighbour
    /// entries for the other node and the client.
    pub fn new(hook: Hook) -> Self {
        let netns = Netns::new(format!("lbt{}-xdp", unique_tag())).unwrap();
        netns.ip(&["link", "add", "ext0", "type", "veth", "peer", "name", "ext1"]).unwrap();
        netns.ip(&["addr", "add", "10.200.0.1/24", "dev", "ext0"]).unwrap();
        // Without duplicate address detection: a tentative address is no
        // route lookup's source.
        netns.ip(&["-6", "addr", "add", &format!("{NODE6}/64"), "dev", "ext0", "nodad"]).unwrap();
        for dev in ["ext0", "ext1"] {
            netns.ip(&["link", "set", dev, "up"]).unwrap();
        }
        for (addr, mac) in [
            ("10.200.0.2", OTHER_NODE_MAC),
            ("10.200.0.100", CLIENT_MAC),
            (&OTHER_NODE6.to_string(), OTHER_NODE_MAC),
            (&CLIENT6.to_string(), CLIENT_MAC),
        ] {
            netns.ip(&["neigh", "add", addr, "lladdr", mac, "dev", "ext0", "nud", "permanent"]).unwrap();
        }
        netns.ip(&["route", "add", REMOTE_PODS, "via", "10.200.0.2"]).unwrap();
        netns.ip(&["-6", "route", "add", REMOTE_PODS6, "via", &OTHER_NODE6.to_string()]).unwrap();
        netns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        netns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        let ifindex = netns
            .enter(|| lb_userspace::interfaces::list().unwrap())
            .into_iter()
            .find(|i| i.name == "ext0")
            .unwrap()
            .index;
        let link = netns.ip(&["-o", "link", "show", "ext0"]).unwrap();
        let mac_text = link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap().to_owned();
        Wire { netns, ifindex, mac: parse_mac(&mac_text), hook }
    }

    /// Runs `frame` through the hook; returns what it did and the frame as it left.
    pub fn run_frame(&self, h: &mut Harness, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let (code, out, _) = self.time(h, frame, 1);
        (self.hook.verdict(code), out)
    }

    /// Runs `frame` `repeat` times; returns the raw verdict, the frame as it left and ns per run.
    pub fn time(&self, h: &mut Harness, frame: &[u8], repeat: u32) -> (u32, Vec<u8>, u64) {
        match self.hook {
            Hook::Xdp => h.run_xdp(&self.netns, self.ifindex, frame, repeat),
            Hook::Tc => h.run_tc_wire(&self.netns, self.ifindex, frame, repeat),
        }
    }
}

/// Runs `test` on each external hook, each with a node namespace of its own.
pub fn on_both_hooks(test: impl Fn(Wire)) {
    for hook in [Hook::Xdp, Hook::Tc] {
        eprintln!("on the {hook:?} hook:");
        test(Wire::new(hook));
    }
}

pub fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
    bytes.try_into().unwrap()
}
