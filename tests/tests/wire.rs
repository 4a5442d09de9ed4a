//! The external interfaces' programs, tc (`tc_from_wire`) and XDP
//! (`xdp_from_wire`), through BPF_PROG_TEST_RUN: frames in as if they
//! arrived on an external interface, frames, verdicts, conntrack entries
//! and counters out. Every test runs on both, which must agree. FIB
//! lookups happen in a network namespace of the test's own, with a known
//! route and neighbours (`lb_tests::wire`). Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{CT_DIRECTION_SNAT, CT_DIRECTION_SNAT_REPLY, counter};
use lb_tests::{
    harness::{Harness, ct_key, round_trip_services, timing_frames},
    packet::{self, ACK, SYN, Seen, SeenIcmpError, Spec, TCP},
    wire::{CLIENT, CLIENT_MAC, Hook, NODE, OTHER_NODE_MAC, Verdict, Wire, on_both_hooks, parse_mac},
};
use lb_userspace::{
    cidr::Cidr,
    model::{Algorithm, Frontend, FrontendKind, Protocol, ServicePort},
};

use Verdict::{Drop as DROP, Pass as PASS, SentBack as SENT_BACK};

const LOCAL_POD: [u8; 4] = [10, 1, 1, 11];
const REMOTE_POD: [u8; 4] = [10, 1, 2, 21];
const LB_IP: [u8; 4] = [10, 250, 0, 10];
const NODE_PORT: u16 = 30080;

fn addr(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

fn frontend(
    kind: FrontendKind,
    ip: [u8; 4],
    port: u16,
    protocol: Protocol,
    backends: &[([u8; 4], bool)],
) -> ServicePort {
    let backend = |b: &([u8; 4], bool)| addr(b.0, 8080).into();
    ServicePort {
        name: "test".into(),
        frontend: Frontend { addr: Ipv4Addr::from(ip).into(), port, protocol },
        kind,
        backends: backends.iter().map(backend).collect(),
        local_backends: backends.iter().filter(|b| b.1).map(backend).collect(),
        ..Default::default()
    }
}

fn node_port(backends: &[([u8; 4], bool)]) -> ServicePort {
    frontend(FrontendKind::NodePort, NODE, NODE_PORT, Protocol::Tcp, backends)
}

fn run(h: &mut Harness, wire: &Wire, spec: &Spec) -> (Verdict, Vec<u8>, Seen) {
    let (verdict, out) = wire.run_frame(h, &packet::build(spec));
    let seen = packet::read(&out);
    (verdict, out, seen)
}

fn assert_checksums(seen: &Seen) {
    assert!(seen.ip_checksum_ok, "IPv4 checksum wrong: {seen:?}");
    assert_ne!(seen.l4_checksum_ok, Some(false), "L4 checksum wrong: {seen:?}");
}

#[test]
fn node_port_to_a_local_backend_is_dnated_and_passed_to_the_stack() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(LOCAL_POD, true)])]);
        let (verdict, _, seen) = run(&mut h, &wire, &Spec::tcp(addr(CLIENT, 40000), addr(NODE, NODE_PORT), SYN));
        assert_eq!(verdict, PASS);
        assert_eq!((seen.src, seen.dst), (addr(CLIENT, 40000), addr(LOCAL_POD, 8080)), "client address kept");
        assert_checksums(&seen);
        assert_eq!(h.counter(counter::DNAT_NEW), 1);
    });
}

#[test]
fn node_port_to_a_remote_backend_is_snated_and_sent_back_out_and_so_is_its_reply() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(REMOTE_POD, false)])]);
        let client = addr(CLIENT, 40000);
        let (verdict, out, seen) = run(&mut h, &wire, &Spec::tcp(client, addr(NODE, NODE_PORT), SYN));
        assert_eq!(verdict, SENT_BACK, "out the interface it came in on, toward the other node");
        assert_eq!((seen.src, seen.dst), (addr(NODE, 40000), addr(REMOTE_POD, 8080)), "SNAT keeps a free port");
        assert_checksums(&seen);
        assert_eq!(out[..6], parse_mac(OTHER_NODE_MAC), "to the other node's MAC");
        assert_eq!(out[6..12], wire.mac, "from ours");
        assert_eq!(out[14 + 8], 63, "TTL decremented");

        let forward = h.ct(&ct_key(client, addr(NODE, NODE_PORT), TCP));
        assert_eq!((forward.direction, forward.snat_addr), (CT_DIRECTION_SNAT, NODE));
        let reply_key = ct_key(addr(REMOTE_POD, 8080), addr(NODE, 40000), TCP);
        assert_eq!(h.ct(&reply_key).direction, CT_DIRECTION_SNAT_REPLY);

        let (verdict, out, seen) = run(&mut h, &wire, &Spec::tcp(addr(REMOTE_POD, 8080), addr(NODE, 40000), SYN | ACK));
        assert_eq!(verdict, SENT_BACK);
        assert_eq!((seen.src, seen.dst), (addr(NODE, NODE_PORT), client), "the client sees the address it used");
        assert_checksums(&seen);
        assert_eq!(out[..6], parse_mac(CLIENT_MAC));

        // Later packets of the flow take the same path.
        let (verdict, _, seen) = run(&mut h, &wire, &Spec::tcp(client, addr(NODE, NODE_PORT), ACK));
        assert_eq!((verdict, seen.dst, seen.src), (SENT_BACK, addr(REMOTE_POD, 8080), addr(NODE, 40000)));
        assert_eq!(h.counter(counter::DNAT_ESTABLISHED), 1);
        assert_eq!(h.counter(counter::REVERSE_NAT), 1);
    });
}

/// The next hop toward the backend has no neighbour entry yet: tc sends
/// the frame on and the kernel resolves the MAC (`bpf_redirect_neigh`);
/// XDP cannot, and leaves the translated frame to the stack. Either way it
/// leaves translated, and the TTL goes down once.
#[test]
fn a_next_hop_without_a_neighbour_entry_is_resolved_by_tc_and_left_to_the_stack_by_xdp() {
    on_both_hooks(|wire| {
        wire.netns.ip(&["route", "add", "10.1.3.0/24", "via", "10.200.0.3"]).unwrap();
        let backend = [10, 1, 3, 31];
        let mut h = Harness::new(&[node_port(&[(backend, false)])]);
        let sent = packet::build(&Spec::tcp(addr(CLIENT, 40000), addr(NODE, NODE_PORT), SYN));
        let (verdict, out) = wire.run_frame(&mut h, &sent);
        let seen = packet::read(&out);
        assert_eq!((seen.src, seen.dst), (addr(NODE, 40000), addr(backend, 8080)));
        assert_checksums(&seen);
        match wire.hook {
            Hook::Tc => {
                assert_eq!(verdict, SENT_BACK, "redirected; the kernel fills in the MACs");
                assert_eq!(out[14 + 8], 63, "TTL decremented");
            }
            Hook::Xdp => {
                assert_eq!(verdict, PASS, "the stack resolves and routes it");
                assert_eq!(out[14 + 8], 64, "the stack decrements the TTL itself");
            }
        }
    });
}

#[test]
fn a_second_client_on_the_same_port_gets_another_snat_port() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(REMOTE_POD, false)])]);
        let first = run(&mut h, &wire, &Spec::tcp(addr(CLIENT, 40000), addr(NODE, NODE_PORT), SYN)).2;
        let second = run(&mut h, &wire, &Spec::tcp(addr([10, 200, 0, 101], 40000), addr(NODE, NODE_PORT), SYN)).2;
        assert_eq!(first.src, addr(NODE, 40000));
        assert_eq!(*second.src.ip(), Ipv4Addr::from(NODE));
        assert!(second.src.port() >= 32768, "a fresh high port, not {}", second.src.port());
        // The retransmitted first SYN keeps its port.
        let again = run(&mut h, &wire, &Spec::tcp(addr(CLIENT, 40000), addr(NODE, NODE_PORT), SYN)).2;
        assert_eq!(again.src, addr(NODE, 40000));
    });
}

#[test]
fn a_remote_backend_without_a_route_drops_the_packet_and_counts_it_as_snat_failed() {
    on_both_hooks(|wire| {
        // No route to 10.9.9.0/24 in the node namespace: the FIB cannot pick a
        // source address, so the flow cannot be source-NATed.
        let mut h = Harness::new(&[node_port(&[([10, 9, 9, 9], false)])]);
        let (verdict, _, _) = run(&mut h, &wire, &Spec::tcp(addr(CLIENT, 40000), addr(NODE, NODE_PORT), SYN));
        assert_eq!(verdict, DROP, "dropped, as masquerade drops what it cannot translate");
        assert_eq!(h.counter(counter::DROP_SNAT_FAILED), 1);
        assert_eq!(h.counter(counter::REJECT_NO_BACKEND), 0, "the Service has a backend: no refusal");
    });
}

#[test]
fn udp_node_port_and_load_balancer_ips_are_served() {
    on_both_hooks(|wire| {
        let udp = frontend(FrontendKind::NodePort, NODE, 30053, Protocol::Udp, &[(LOCAL_POD, true)]);
        let lb = frontend(FrontendKind::LoadBalancer, LB_IP, 80, Protocol::Tcp, &[(REMOTE_POD, false)]);
        let mut h = Harness::new(&[udp, lb]);
        let (verdict, _, seen) = run(&mut h, &wire, &Spec::udp(addr(CLIENT, 5000), addr(NODE, 30053)));
        assert_eq!((verdict, seen.dst), (PASS, addr(LOCAL_POD, 8080)));
        assert_checksums(&seen);
        let (verdict, _, seen) = run(&mut h, &wire, &Spec::tcp(addr(CLIENT, 40001), addr(LB_IP, 80), SYN));
        assert_eq!((verdict, seen.src, seen.dst), (SENT_BACK, addr(NODE, 40001), addr(REMOTE_POD, 8080)));
        let (_, _, seen) = run(&mut h, &wire, &Spec::tcp(addr(REMOTE_POD, 8080), addr(NODE, 40001), SYN | ACK));
        assert_eq!((seen.src, seen.dst), (addr(LB_IP, 80), addr(CLIENT, 40001)));
    });
}

#[test]
fn source_ranges_admit_clients_inside_and_drop_the_rest() {
    on_both_hooks(|wire| {
        let mut lb = frontend(FrontendKind::LoadBalancer, LB_IP, 80, Protocol::Tcp, &[(LOCAL_POD, true)]);
        lb.source_ranges = vec!["10.200.0.96/30".parse::<Cidr>().unwrap(), "192.0.2.7/32".parse().unwrap()];
        let mut h = Harness::new(&[lb]);
        for (client, admitted) in
            [([10, 200, 0, 97], true), ([192, 0, 2, 7], true), (CLIENT, false), ([192, 0, 2, 8], false)]
        {
            let (verdict, _, _) = run(&mut h, &wire, &Spec::tcp(addr(client, 40000), addr(LB_IP, 80), SYN));
            assert_eq!(verdict, if admitted { PASS } else { DROP }, "client {client:?}");
        }
        assert_eq!(h.counter(counter::DROP_SOURCE_RANGE), 2);
        assert_eq!(h.counter(counter::DNAT_NEW), 2);
    });
}

#[test]
fn policy_local_without_local_endpoints_drops_and_no_endpoints_at_all_refuses() {
    on_both_hooks(|wire| {
        let mut local = node_port(&[]);
        local.drop_when_empty = true;
        let empty = frontend(FrontendKind::NodePort, NODE, 30081, Protocol::Tcp, &[]);
        let mut h = Harness::new(&[local, empty]);
        let (verdict, _, _) = run(&mut h, &wire, &Spec::tcp(addr(CLIENT, 40000), addr(NODE, NODE_PORT), SYN));
        assert_eq!(verdict, DROP);
        assert_eq!(h.counter(counter::DROP_NO_LOCAL_BACKEND), 1);
        let (verdict, out) =
            wire.run_frame(&mut h, &packet::build(&Spec::tcp(addr(CLIENT, 40000), addr(NODE, 30081), SYN)));
        assert_eq!(verdict, SENT_BACK, "refused with an ICMP error sent back");
        assert_eq!((out[14 + 9], out[14 + 20], out[14 + 21]), (1, 3, 3), "ICMP port unreachable");
        assert_eq!(out[14 + 12..14 + 16], NODE, "from the address the client tried");
        assert_eq!(out[14 + 16..14 + 20], CLIENT);
    });
}

/// kube-proxy's short-circuit: a pod reaching a Local-policy load-balancer
/// IP gets the whole Service, even where this node has no endpoint, while
/// an external client there is dropped.
#[test]
fn pods_reaching_a_local_policy_address_get_the_whole_service() {
    on_both_hooks(|wire| {
        let mut lb = frontend(FrontendKind::LoadBalancer, LB_IP, 80, Protocol::Tcp, &[]);
        lb.drop_when_empty = true;
        lb.internal_backends = Some([addr(REMOTE_POD, 8080).into()].into());
        let mut h = Harness::new(&[lb]);
        let (verdict, _, _) = run(&mut h, &wire, &Spec::tcp(addr(CLIENT, 40000), addr(LB_IP, 80), SYN));
        assert_eq!(verdict, DROP, "an external client: no local endpoint");
        let pod = addr(LOCAL_POD, 41000);
        let (verdict, seen) = h.run_spec(&Spec::tcp(pod, addr(LB_IP, 80), SYN));
        assert_eq!((verdict, seen.src, seen.dst), (0, pod, addr(REMOTE_POD, 8080)), "a pod: the remote endpoint");
    });
}

#[test]
fn other_ports_of_a_node_address_pass_and_other_traffic_is_untouched() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(LOCAL_POD, true)])]);
        for spec in [
            Spec::tcp(addr(CLIENT, 40000), addr(NODE, 22), SYN),
            Spec::tcp(addr(CLIENT, 40000), addr([10, 200, 0, 7], NODE_PORT), SYN),
            Spec::udp(addr(CLIENT, 40000), addr(NODE, NODE_PORT)),
        ] {
            let frame = packet::build(&spec);
            let (verdict, out) = wire.run_frame(&mut h, &frame);
            assert_eq!((verdict, &out), (PASS, &frame), "{spec:?}");
        }
        assert_eq!(h.counter(counter::PASS), 3);
    });
}

#[test]
fn replies_of_cluster_ip_flows_from_remote_backends_are_translated_on_arrival() {
    on_both_hooks(|wire| {
        let vip = [10, 96, 0, 10];
        let cluster_ip = frontend(FrontendKind::ClusterIp, vip, 80, Protocol::Tcp, &[(REMOTE_POD, false)]);
        let mut h = Harness::new(&[cluster_ip]);
        // A local pod's request leaves through tc, DNATed, to the other node.
        let pod = addr(LOCAL_POD, 41000);
        let (_, request) = h.run_spec(&Spec::tcp(pod, addr(vip, 80), SYN));
        assert_eq!((request.src, request.dst), (pod, addr(REMOTE_POD, 8080)), "no SNAT for pods");
        // The reply arrives on the external interface.
        let (verdict, _, seen) = run(&mut h, &wire, &Spec::tcp(addr(REMOTE_POD, 8080), pod, SYN | ACK));
        assert_eq!(verdict, PASS);
        assert_eq!((seen.src, seen.dst), (addr(vip, 80), pod));
        assert_checksums(&seen);
    });
}

/// A router between this node and the client cannot pass the reply on
/// without fragmenting it: its "fragmentation needed" quotes the reply as
/// it left this node, and must reach the backend that sent it, quoting the
/// packet as the backend sent it, for path-MTU discovery to work.
#[test]
fn fragmentation_needed_for_a_node_port_reply_reaches_the_backend_translated() {
    on_both_hooks(|wire| {
        let router = Ipv4Addr::new(10, 200, 0, 254);
        let client = addr(CLIENT, 40000);
        for (backend, local) in [(LOCAL_POD, true), (REMOTE_POD, false)] {
            let mut h = Harness::new(&[node_port(&[(backend, local)])]);
            let (_, _, request) = run(&mut h, &wire, &Spec::tcp(client, addr(NODE, NODE_PORT), SYN));
            // The reply as the client would get it, quoted by the router.
            let reply = packet::build(&Spec::tcp(addr(NODE, NODE_PORT), client, ACK));
            let error = packet::icmp_error(router, Ipv4Addr::from(NODE), packet::ICMP_FRAG_NEEDED, 1400, &reply);
            let (verdict, out) = wire.run_frame(&mut h, &error);
            let seen = packet::read_icmp_error(&out);
            // The backend sent its reply to the client, or (SNAT) to this node.
            let expected = SeenIcmpError {
                from: router,
                to: Ipv4Addr::from(backend),
                quoted_src: addr(backend, 8080),
                quoted_dst: request.src,
                checksums_ok: true,
            };
            assert_eq!(seen, expected, "local backend: {local}");
            assert_eq!(verdict, if local { PASS } else { SENT_BACK }, "local backend: {local}");
            assert_eq!(h.counter(counter::ICMP_ERROR_TRANSLATED), 1);
        }
    });
}

/// An ICMP error about the request (the backend's node, or a router on
/// the way, cannot take it) goes back to the client quoting its own packet.
#[test]
fn an_error_about_a_forwarded_request_goes_back_to_the_client_translated() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(REMOTE_POD, false)])]);
        let client = addr(CLIENT, 40000);
        let (_, forwarded, _) = run(&mut h, &wire, &Spec::tcp(client, addr(NODE, NODE_PORT), SYN));
        let error = packet::icmp_error(
            Ipv4Addr::new(10, 200, 0, 2),
            Ipv4Addr::from(NODE),
            packet::ICMP_FRAG_NEEDED,
            1400,
            &forwarded,
        );
        let (verdict, out) = wire.run_frame(&mut h, &error);
        let expected = SeenIcmpError {
            from: Ipv4Addr::new(10, 200, 0, 2),
            to: Ipv4Addr::from(CLIENT),
            quoted_src: client,
            quoted_dst: addr(NODE, NODE_PORT),
            checksums_ok: true,
        };
        assert_eq!((verdict, packet::read_icmp_error(&out)), (SENT_BACK, expected));
        assert_eq!(out[..6], parse_mac(CLIENT_MAC));
    });
}

#[test]
fn icmp_errors_about_other_flows_and_other_icmp_pass_untouched() {
    on_both_hooks(|wire| {
        let mut h = Harness::new(&[node_port(&[(REMOTE_POD, false)])]);
        let unrelated = packet::build(&Spec::tcp(addr(NODE, 22), addr(CLIENT, 40000), ACK));
        let error = packet::icmp_error(
            Ipv4Addr::new(10, 200, 0, 254),
            Ipv4Addr::from(NODE),
            packet::ICMP_FRAG_NEEDED,
            1400,
            &unrelated,
        );
        let mut echo = error.clone();
        echo[14 + 20] = 8; // an echo request; its checksum does not matter here
        let short_echo = echo[..14 + 20 + 16].to_vec();
        for frame in [error, echo, short_echo] {
            let (verdict, out) = wire.run_frame(&mut h, &frame);
            assert_eq!((verdict, &out), (PASS, &frame));
        }
        assert_eq!(h.counter(counter::ICMP_ERROR_TRANSLATED), 0);
    });
}

/// Not a check: the ns per packet the issue asks to note, printed. A
/// repeated run sees the frame as the previous run left it, so the
/// frontend's backend is the frontend itself: every SYN is a new flow
/// (a SYN always selects anew), every ACK an established-flow hit.
#[test]
fn external_cost_per_packet() {
    on_both_hooks(|wire| {
        let timed = addr(NODE, 8080);
        let others = [addr([10, 96, 0, 11], 8080)];
        let mut h = Harness::new(&round_trip_services(timed, FrontendKind::NodePort, &others, Algorithm::Random));
        let repeat = 1_000_000;
        for (what, frame) in timing_frames(addr(CLIENT, 40000), timed, addr([10, 200, 0, 7], 80)) {
            let (verdict, _, ns) = wire.time(&mut h, &frame, repeat);
            assert_eq!(wire.hook.verdict(verdict), PASS);
            let program = wire.hook.program();
            println!("{program}, NodePort {what}: {ns} ns/packet (BPF_PROG_TEST_RUN, repeat {repeat})");
        }
        assert_eq!(h.counter(counter::DNAT_NEW), u64::from(repeat), "every SYN run is a new flow");
        assert_eq!(h.counter(counter::DNAT_ESTABLISHED), u64::from(repeat), "every ACK run is an established flow");
    });
}
