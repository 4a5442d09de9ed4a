//! The external interfaces' programs over IPv6, through
//! BPF_PROG_TEST_RUN: `tc_from_wire` and `xdp_from_wire` hand IPv6 frames
//! to their IPv6 halves (`tc_from_wire6`, `xdp_from_wire6`, by tail call),
//! which run the IPv6 pipeline. Frames in as if they arrived on an
//! external interface, frames, verdicts, conntrack entries and counters
//! out; every test runs on both hooks, which must agree (wire.rs is the
//! IPv4 counterpart). Needs root.
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use lb_common::{CT_DIRECTION_SNAT, CT_DIRECTION_SNAT_REPLY, PROTO_TCP, PROTO_UDP, counter, ipv6};
use lb_tests::{
    harness::{Harness, ct_key6},
    packet::{ACK, SYN},
    packet6::{
        ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMPV6_PORT_UNREACH, Spec6, build6, icmp6_error,
        neighbor_solicitation, read_icmp6, read6,
    },
    wire::{CLIENT_MAC, CLIENT6, Hook, NODE6, OTHER_NODE_MAC, OTHER_NODE6, Verdict, Wire, on_both_hooks, parse_mac},
};
use lb_userspace::model::{Frontend, FrontendKind, Protocol, ServicePort};

use Verdict::{Drop as DROP, Pass as PASS, SentBack as SENT_BACK};

const LOCAL_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11);
/// In the other node's pod CIDR (`lb_tests::wire::REMOTE_PODS6`).
const REMOTE_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x21);
const LB_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x10);
const ROUTER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0xfe);
const NODE_PORT: u16 = 30080;

fn at(addr: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(addr, port, 0, 0)
}

/// A frontend of `kind` at `addr`:`port` with backends on port 8080,
/// each local to this node or not.
fn frontend(
    kind: FrontendKind,
    addr: Ipv6Addr,
    port: u16,
    protocol: Protocol,
    backends: &[(Ipv6Addr, bool)],
) -> ServicePort {
    let backend = |b: &(Ipv6Addr, bool)| SocketAddr::V6(at(b.0, 8080));
    ServicePort {
        name: "test6".into(),
        frontend: Frontend { addr: addr.into(), port, protocol },
        kind,
        backends: backends.iter().map(backend).collect(),
        local_backends: backends.iter().filter(|b| b.1).map(backend).collect(),
        ..Default::default()
    }
}

fn node_port(backends: &[(Ipv6Addr, bool)]) -> ServicePort {
    frontend(FrontendKind::NodePort, NODE6, NODE_PORT, Protocol::Tcp, backends)
}

/// Runs `spec`'s frame; returns the verdict and the frame as it left,
/// read back (checksums verified by the reader).
fn run(h: &mut Harness, wire: &Wire, spec: &Spec6) -> (Verdict, lb_tests::packet6::Seen6) {
    let (verdict, out) = wire.run_frame(h, &build6(spec));
    (verdict, read6(&out))
}

#[test]
fn node_port_to_a_local_backend_is_dnated_and_passed_to_the_stack() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(LOCAL_POD, true)])]);
        let client = at(CLIENT6, 40000);
        let (verdict, seen) = run(&mut h, &wire, &Spec6::tcp(client, at(NODE6, NODE_PORT), SYN));
        assert_eq!(verdict, PASS);
        assert_eq!((seen.src, seen.dst), (client, at(LOCAL_POD, 8080)), "client address kept");
        assert!(seen.l4_checksum_ok, "{seen:?}");
        assert_eq!(h.counter(counter::DNAT_NEW), 1);
        // The reply is translated back at the pod's hook, not here; later
        // packets of the flow take its entry.
        let (verdict, seen) = run(&mut h, &wire, &Spec6::tcp(client, at(NODE6, NODE_PORT), ACK));
        assert_eq!((verdict, seen.dst), (PASS, at(LOCAL_POD, 8080)));
        assert_eq!(h.counter(counter::DNAT_ESTABLISHED), 1);
    });
}

#[test]
fn node_port_to_a_remote_backend_is_snated_and_so_is_its_reply() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(REMOTE_POD, false)])]);
        let (client, service) = (at(CLIENT6, 40000), at(NODE6, NODE_PORT));
        let (verdict, out) = wire.run_frame(&mut h, &build6(&Spec6::tcp(client, service, SYN)));
        assert_eq!(verdict, SENT_BACK, "out the interface it came in on, toward the other node");
        let seen = read6(&out);
        assert_eq!((seen.src, seen.dst), (at(NODE6, 40000), at(REMOTE_POD, 8080)), "SNAT keeps a free port");
        assert!(seen.l4_checksum_ok, "{seen:?}");
        assert_eq!(out[..6], parse_mac(OTHER_NODE_MAC), "to the other node's MAC");
        assert_eq!(out[6..12], wire.mac, "from ours");
        assert_eq!(out[14 + 7], 63, "hop limit decremented");

        let forward = h.ct6(&ct_key6(client, service, PROTO_TCP));
        assert_eq!((forward.direction, forward.snat_addr), (CT_DIRECTION_SNAT, ipv6(NODE6.octets())));
        let reply_key = ct_key6(at(REMOTE_POD, 8080), at(NODE6, 40000), PROTO_TCP);
        assert_eq!(h.ct6(&reply_key).direction, CT_DIRECTION_SNAT_REPLY);

        let reply = build6(&Spec6::tcp(at(REMOTE_POD, 8080), at(NODE6, 40000), SYN | ACK));
        let (verdict, out) = wire.run_frame(&mut h, &reply);
        assert_eq!(verdict, SENT_BACK);
        let seen = read6(&out);
        assert_eq!((seen.src, seen.dst), (service, client), "the client sees the address it used");
        assert!(seen.l4_checksum_ok, "{seen:?}");
        assert_eq!(out[..6], parse_mac(CLIENT_MAC));

        let (verdict, seen) = run(&mut h, &wire, &Spec6::tcp(client, service, ACK));
        assert_eq!((verdict, seen.src, seen.dst), (SENT_BACK, at(NODE6, 40000), at(REMOTE_POD, 8080)));
        assert_eq!(h.counter(counter::DNAT_ESTABLISHED), 1);
        assert_eq!(h.counter(counter::REVERSE_NAT), 1);

        // A second client on the same port gets another SNAT port.
        let other = at(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x101), 40000);
        let (_, seen) = run(&mut h, &wire, &Spec6::tcp(other, service, SYN));
        assert_eq!(*seen.src.ip(), NODE6);
        assert_ne!(seen.src.port(), 40000, "the first client's flow keeps its port");
    });
}

/// The next hop toward the backend has no neighbour entry yet: tc sends
/// the frame on and the kernel resolves the MAC (`bpf_redirect_neigh`,
/// which for IPv6 looks the route up itself); XDP cannot, and leaves the
/// translated frame to the stack. Either way it leaves translated, and
/// the hop limit goes down once.
#[test]
fn a_next_hop_without_a_neighbour_entry_is_resolved_by_tc_and_left_to_the_stack_by_xdp() {
    on_both_hooks(|wire| {
        wire.netns.ip(&["-6", "route", "add", "fd00:244:3::/64", "via", "fd00:200::3"]).unwrap();
        let backend = Ipv6Addr::new(0xfd00, 0x244, 3, 0, 0, 0, 0, 0x31);
        let mut h = Harness::new(&[node_port(&[(backend, false)])]);
        let sent = build6(&Spec6::tcp(at(CLIENT6, 40000), at(NODE6, NODE_PORT), SYN));
        let (verdict, out) = wire.run_frame(&mut h, &sent);
        let seen = read6(&out);
        assert_eq!((seen.src, seen.dst), (at(NODE6, 40000), at(backend, 8080)));
        assert!(seen.l4_checksum_ok, "{seen:?}");
        match wire.hook {
            Hook::Tc => {
                assert_eq!(verdict, SENT_BACK, "redirected; the kernel fills in the MACs");
                assert_eq!(out[14 + 7], 63, "hop limit decremented");
            }
            Hook::Xdp => {
                assert_eq!(verdict, PASS, "the stack resolves and routes it");
                assert_eq!(out[14 + 7], 64, "the stack decrements the hop limit itself");
            }
        }
    });
}

#[test]
fn udp_to_a_load_balancer_ip_is_translated_with_its_mandatory_checksum() {
    on_both_hooks(|wire| {
        let lb = frontend(FrontendKind::LoadBalancer, LB_IP, 53, Protocol::Udp, &[(REMOTE_POD, false)]);
        let mut h = Harness::new(&[lb]);
        let client = at(CLIENT6, 41000);
        let (verdict, seen) = run(&mut h, &wire, &Spec6::udp(client, at(LB_IP, 53)));
        assert_eq!(verdict, SENT_BACK);
        assert_eq!((seen.src, seen.dst), (at(NODE6, 41000), at(REMOTE_POD, 8080)));
        assert!(seen.l4_checksum_ok, "{seen:?}");
        let (_, seen) = run(&mut h, &wire, &Spec6::udp(at(REMOTE_POD, 8080), at(NODE6, 41000)));
        assert_eq!((seen.src, seen.dst), (at(LB_IP, 53), client));
        assert!(seen.l4_checksum_ok, "{seen:?}");
        let key = ct_key6(client, at(LB_IP, 53), PROTO_UDP);
        assert_eq!(h.ct6(&key).direction, CT_DIRECTION_SNAT);
    });
}

#[test]
fn source_ranges_admit_clients_inside_and_drop_the_rest() {
    on_both_hooks(|wire| {
        let mut lb = frontend(FrontendKind::LoadBalancer, LB_IP, 80, Protocol::Tcp, &[(LOCAL_POD, true)]);
        lb.source_ranges = vec!["fd00:200::100/128".parse().unwrap()];
        let mut h = Harness::new(&[lb]);
        let (verdict, seen) = run(&mut h, &wire, &Spec6::tcp(at(CLIENT6, 40000), at(LB_IP, 80), SYN));
        assert_eq!((verdict, seen.dst), (PASS, at(LOCAL_POD, 8080)));
        let outsider = at(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x101), 40000);
        let (verdict, _) = wire.run_frame(&mut h, &build6(&Spec6::tcp(outsider, at(LB_IP, 80), SYN)));
        assert_eq!(verdict, DROP);
        assert_eq!(h.counter(counter::DROP_SOURCE_RANGE), 1);
    });
}

#[test]
fn policy_local_without_local_endpoints_drops_and_no_endpoints_at_all_refuses() {
    on_both_hooks(|wire| {
        let mut local = node_port(&[]);
        local.drop_when_empty = true;
        let empty = frontend(FrontendKind::NodePort, NODE6, 30081, Protocol::Tcp, &[]);
        let mut h = Harness::new(&[local, empty]);
        let client = at(CLIENT6, 40000);
        let (verdict, _) = wire.run_frame(&mut h, &build6(&Spec6::tcp(client, at(NODE6, NODE_PORT), SYN)));
        assert_eq!(verdict, DROP);
        assert_eq!(h.counter(counter::DROP_NO_LOCAL_BACKEND), 1);

        let sent = build6(&Spec6::tcp(client, at(NODE6, 30081), SYN));
        let (verdict, out) = wire.run_frame(&mut h, &sent);
        assert_eq!(verdict, SENT_BACK, "refused with an ICMPv6 error sent back");
        let seen = read_icmp6(&out);
        assert_eq!((seen.kind, seen.code), (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH));
        assert_eq!((seen.src, seen.dst), (NODE6, CLIENT6), "from the address the client tried");
        assert_eq!(seen.quoted, (client, at(NODE6, 30081)), "quoting the client's packet");
        assert!(seen.checksum_ok, "{seen:?}");
        let macs: ([u8; 6], [u8; 6]) = (sent[6..12].try_into().unwrap(), sent[..6].try_into().unwrap());
        assert_eq!(seen.macs, macs, "back to the sender's MAC");
        assert_eq!(h.counter(counter::REJECT_NO_BACKEND), 1);
    });
}

/// A router between this node and the client cannot take the reply as
/// it is (Packet Too Big): the error must reach the backend, quoting the
/// packet as the backend sent it, or path-MTU discovery through the
/// Service fails (Cilium's issue 16080).
#[test]
fn packet_too_big_for_a_node_port_reply_reaches_the_backend_translated() {
    on_both_hooks(|wire| {
        let client = at(CLIENT6, 40000);
        for (backend, local) in [(LOCAL_POD, true), (REMOTE_POD, false)] {
            let mut h = Harness::new(&[node_port(&[(backend, local)])]);
            let (_, request) = run(&mut h, &wire, &Spec6::tcp(client, at(NODE6, NODE_PORT), SYN));
            // The reply as the client would get it, quoted by the router.
            let reply = build6(&Spec6::tcp(at(NODE6, NODE_PORT), client, ACK));
            let error = icmp6_error(&ROUTER, &NODE6, ICMPV6_PACKET_TOO_BIG, 0, 1400, &reply[14..]);
            let (verdict, out) = wire.run_frame(&mut h, &error);
            assert_eq!(verdict, PASS, "the stack routes it to the backend; local backend: {local}");
            let seen = read_icmp6(&out);
            assert_eq!((seen.src, seen.dst), (ROUTER, backend), "local backend: {local}");
            // The backend sent its reply to the client, or (SNAT) to this node.
            assert_eq!(seen.quoted, (at(backend, 8080), request.src), "local backend: {local}");
            assert_eq!((seen.kind, seen.rest), (ICMPV6_PACKET_TOO_BIG, 1400));
            assert!(seen.checksum_ok, "{seen:?}");
            assert_eq!(h.counter(counter::ICMP_ERROR_TRANSLATED), 1);
        }
    });
}

/// An error about the request (the backend's node, or a router on the
/// way, cannot take it) goes back to the client quoting its own packet.
#[test]
fn an_error_about_a_forwarded_request_goes_back_to_the_client_translated() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(REMOTE_POD, false)])]);
        let (client, service) = (at(CLIENT6, 40000), at(NODE6, NODE_PORT));
        let (verdict, forwarded) = wire.run_frame(&mut h, &build6(&Spec6::tcp(client, service, SYN)));
        assert_eq!(verdict, SENT_BACK);
        let error = icmp6_error(&OTHER_NODE6, &NODE6, ICMPV6_PACKET_TOO_BIG, 0, 1280, &forwarded[14..]);
        let (verdict, out) = wire.run_frame(&mut h, &error);
        assert_eq!(verdict, PASS);
        let seen = read_icmp6(&out);
        assert_eq!((seen.src, seen.dst), (OTHER_NODE6, CLIENT6));
        assert_eq!(seen.quoted, (client, service), "quoting the packet the client sent");
        assert!(seen.checksum_ok, "{seen:?}");
    });
}

#[test]
fn other_ports_ndp_and_errors_about_other_flows_pass_untouched() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(REMOTE_POD, false)])]);
        let unrelated = build6(&Spec6::tcp(at(NODE6, 22), at(CLIENT6, 40000), ACK));
        let frames = [
            build6(&Spec6::tcp(at(CLIENT6, 40000), at(NODE6, 22), SYN)),
            neighbor_solicitation(&CLIENT6, &NODE6),
            icmp6_error(&ROUTER, &NODE6, ICMPV6_PACKET_TOO_BIG, 0, 1400, &unrelated[14..]),
        ];
        for frame in frames {
            let (verdict, out) = wire.run_frame(&mut h, &frame);
            assert_eq!((verdict, &out), (PASS, &frame));
        }
        assert_eq!(h.counter(counter::DNAT_NEW), 0);
        assert_eq!(h.counter(counter::ICMP_ERROR_TRANSLATED), 0);
    });
}
