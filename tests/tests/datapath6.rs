//! IPv6 at the pods' hook through BPF_PROG_TEST_RUN: `tc_from_pod` hands
//! every IPv6 frame to `tc_from_pod6` (a tail call), which runs the
//! pipeline every hook shares, compiled for IPv6, over the IPv6 maps,
//! written as the agent writes them (`Harness::seed_ipv6`). Needs root.
use std::net::{Ipv6Addr, SocketAddrV6};

use lb_common::{
    Backend6, CT_DIRECTION_DNAT, CT_DIRECTION_REVERSE_SNAT, CtKey6, HAIRPIN_ADDR6, PROTO_TCP, PROTO_UDP, counter, ipv6,
    ipv6_octets,
};
use lb_tests::{
    harness::{Harness, Service6, ct_key6},
    packet::{ACK, SYN},
    packet6::{
        self, ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMPV6_PORT_UNREACH, Seen6, Spec6, build6, icmp6_error,
        neighbor_solicitation, read_icmp6, read6,
    },
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

fn at(addr: &str, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(addr.parse().unwrap(), port, 0, 0)
}

const VIP: &str = "fd00:96::10";
const CLIENT: &str = "fd00:244::5";

fn harness(services: &[Service6]) -> Harness {
    let mut h = Harness::new(&[]);
    h.seed_ipv6(services);
    h
}

fn web(backends: &[SocketAddrV6]) -> Service6 {
    Service6::new(at(VIP, 80), PROTO_TCP, backends)
}

fn run(h: &mut Harness, spec: &Spec6) -> (u32, Seen6) {
    let (verdict, out) = h.run(&build6(spec));
    (verdict, read6(&out))
}

#[test]
fn a_tcp_flow_to_an_ipv6_cluster_ip_is_dnated_tracked_and_its_replies_translated_back() {
    let backend = at("fd00:244::20", 8080);
    let mut h = harness(&[web(&[backend])]);
    let (client, vip) = (at(CLIENT, 40000), at(VIP, 80));

    let (verdict, seen) = run(&mut h, &Spec6::tcp(client, vip, SYN));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((seen.src, seen.dst), (client, backend));
    assert!(seen.l4_checksum_ok, "TCP checksum over the new pseudo-header: {seen:?}");
    assert_eq!(seen.payload, b"hello");
    assert_eq!(h.counter(counter::DNAT_NEW), 1);

    // Both directions are tracked, as for IPv4.
    let maps = h.datapath.maps.ipv6.as_ref().unwrap();
    let forward = maps.conntrack.get(&ct_key6(client, vip, PROTO_TCP), 0).expect("forward entry");
    assert_eq!(forward.direction, CT_DIRECTION_DNAT);
    assert_eq!(forward.nat_addr, ipv6(backend.ip().octets()));
    let reply = maps.conntrack.get(&ct_key6(backend, client, PROTO_TCP), 0).expect("reply entry");
    assert_eq!((reply.direction, reply.nat_addr), (CT_DIRECTION_REVERSE_SNAT, ipv6(vip.ip().octets())));

    // The backend's reply leaves from the service address.
    let (verdict, seen) = run(&mut h, &Spec6::tcp(backend, client, SYN | ACK));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((seen.src, seen.dst), (vip, client));
    assert!(seen.l4_checksum_ok, "{seen:?}");
    assert_eq!(h.counter(counter::REVERSE_NAT), 1);

    // Later packets follow the entry, even once the backend's id names
    // another address (a new flow would go there).
    let elsewhere = Backend6::new(ipv6(at("fd00:244::99", 1).ip().octets()), 1u16.to_be_bytes());
    h.datapath.maps.ipv6.as_mut().unwrap().svc.backends.insert(1, elsewhere, 0).unwrap();
    let (_, seen) = run(&mut h, &Spec6::tcp(client, vip, ACK));
    assert_eq!(seen.dst, backend);
    assert!(seen.l4_checksum_ok);
    assert_eq!(h.counter(counter::DNAT_ESTABLISHED), 1);
}

#[test]
fn udp_to_an_ipv6_frontend_is_translated_with_its_mandatory_checksum() {
    let backend = at("fd00:244::21", 5353);
    let service = Service6::new(at(VIP, 53), PROTO_UDP, &[backend]);
    let mut h = harness(&[service]);
    let (client, vip) = (at(CLIENT, 41000), at(VIP, 53));
    let (verdict, seen) = run(&mut h, &Spec6::udp(client, vip));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((seen.src, seen.dst), (client, backend));
    assert!(seen.l4_checksum_ok, "{seen:?}");
    let (_, seen) = run(&mut h, &Spec6::udp(backend, client));
    assert_eq!((seen.src, seen.dst), (vip, client));
    assert!(seen.l4_checksum_ok, "{seen:?}");
}

#[test]
fn new_flows_spread_over_every_backend_and_each_flow_keeps_its_own() {
    let backends: Vec<SocketAddrV6> = (1..=3).map(|i| at(&format!("fd00:244::{i:x}"), 8080)).collect();
    let mut h = harness(&[web(&backends)]);
    let mut seen_backends = std::collections::BTreeSet::new();
    for port in 40000..40060 {
        let (_, first) = run(&mut h, &Spec6::tcp(at(CLIENT, port), at(VIP, 80), SYN));
        let (_, later) = run(&mut h, &Spec6::tcp(at(CLIENT, port), at(VIP, 80), ACK));
        assert_eq!(first.dst, later.dst, "a flow keeps its backend");
        seen_backends.insert(first.dst);
    }
    assert_eq!(seen_backends.into_iter().collect::<Vec<_>>(), backends);
}

#[test]
fn an_ipv6_service_without_endpoints_refuses_with_an_icmpv6_port_unreachable() {
    let mut h = harness(&[web(&[])]);
    let (client, vip) = (at(CLIENT, 40000), at(VIP, 80));
    let (verdict, out) = h.run(&build6(&Spec6::tcp(client, vip, SYN)));
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out the pod's interface");
    let error = read_icmp6(&out);
    assert_eq!((error.kind, error.code), (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH));
    assert_eq!((error.src, error.dst), (*vip.ip(), *client.ip()), "from the address the client tried");
    assert!(error.checksum_ok, "ICMPv6 checksum over the pseudo-header: {error:?}");
    assert_eq!(error.quoted, (client, vip), "the client's own packet, quoted");
    assert_eq!(error.macs, ([0x02, 0, 0, 0, 0, 2], [0x02, 0, 0, 0, 0, 1]), "back to the sender's MAC");
    assert_eq!(h.counter(counter::REJECT_NO_BACKEND), 1);
}

#[test]
fn an_undefined_port_of_an_ipv6_cluster_ip_is_dropped() {
    let mut h = harness(&[web(&[at("fd00:244::20", 8080)])]);
    let (verdict, _) = h.run(&build6(&Spec6::tcp(at(CLIENT, 40000), at(VIP, 81), SYN)));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter(counter::DROP_UNKNOWN_PORT), 1);
}

#[test]
fn other_ipv6_traffic_ndp_and_later_fragments_pass_untouched() {
    let mut h = harness(&[web(&[at("fd00:244::20", 8080)])]);
    let frames = [
        build6(&Spec6::tcp(at(CLIENT, 40000), at("fd00:244::99", 80), SYN)),
        neighbor_solicitation(&CLIENT.parse().unwrap(), &VIP.parse().unwrap()),
        build6(&Spec6::udp(at(CLIENT, 40000), at(VIP, 80)).fragment(100)),
    ];
    for frame in frames {
        let (verdict, out) = h.run(&frame);
        assert_eq!((verdict, &out), (TC_ACT_OK, &frame));
    }
    assert_eq!(h.counter(counter::DNAT_NEW), 0);
}

#[test]
fn extension_headers_before_the_ports_are_walked() {
    let backend = at("fd00:244::20", 8080);
    let mut h = harness(&[web(&[backend])]);
    for spec in [
        Spec6::tcp(at(CLIENT, 40000), at(VIP, 80), SYN).with_destination_options(),
        Spec6::tcp(at(CLIENT, 40002), at(VIP, 80), SYN).with_hop_by_hop(1).with_destination_options(),
    ] {
        let (verdict, seen) = run(&mut h, &spec);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(seen.dst, backend, "{spec:?}");
        assert!(seen.l4_checksum_ok, "{seen:?}");
    }
    // Ports further than the rewrite reaches (extension headers of 192
    // bytes) pass untranslated, never dropped half-way.
    let far = Spec6::tcp(at(CLIENT, 40003), at(VIP, 80), SYN).with_hop_by_hop(23);
    let frame = build6(&far);
    assert_eq!(h.run(&frame), (TC_ACT_OK, frame.clone()));
    // A first fragment carries the ports: translated too.
    let spec = Spec6::udp(at(CLIENT, 40001), at(VIP, 80)).fragment(0);
    let mut h = harness(&[Service6::new(at(VIP, 80), PROTO_UDP, &[backend])]);
    let (_, out) = h.run(&build6(&spec));
    assert_eq!(read6(&out).dst, backend);
}

#[test]
fn a_pod_reaching_itself_through_an_ipv6_service_sees_the_hairpin_address() {
    let pod = at("fd00:244::20", 8080);
    let mut h = harness(&[web(&[pod])]);
    let (client, vip) = (SocketAddrV6::new(*pod.ip(), 40000, 0, 0), at(VIP, 80));
    let hairpin = Ipv6Addr::from(ipv6_octets(HAIRPIN_ADDR6));
    let (_, seen) = run(&mut h, &Spec6::tcp(client, vip, SYN));
    assert_eq!((seen.src, seen.dst), (SocketAddrV6::new(hairpin, 40000, 0, 0), pod));
    assert!(seen.l4_checksum_ok);
    // Its reply, to the hairpin address, comes back from the service.
    let (_, seen) = run(&mut h, &Spec6::tcp(pod, SocketAddrV6::new(hairpin, 40000, 0, 0), SYN | ACK));
    assert_eq!((seen.src, seen.dst), (vip, client));
    assert!(seen.l4_checksum_ok);
}

#[test]
fn ipv6_frames_take_the_tail_call_rather_than_passing_unparsed() {
    // A frame that is not IPv4 used to count as unparsed; an IPv6 one now
    // gets an IPv6 verdict from tc_from_pod6.
    let mut h = harness(&[web(&[at("fd00:244::20", 8080)])]);
    let _ = h.run(&packet6::build6(&Spec6::tcp(at(CLIENT, 40000), at(VIP, 80), SYN)));
    assert_eq!(h.counter(counter::PASS_UNPARSED), 0);
}

#[test]
fn client_ip_affinity_keeps_an_ipv6_client_on_one_backend_across_connections() {
    let backends: Vec<SocketAddrV6> = (1..=3).map(|i| at(&format!("fd00:244::{i:x}"), 8080)).collect();
    let mut service = web(&backends);
    service.affinity_timeout_s = 60;
    let mut h = harness(&[service]);
    let (_, first) = run(&mut h, &Spec6::tcp(at(CLIENT, 40000), at(VIP, 80), SYN));
    for port in 40001..40020 {
        let (_, seen) = run(&mut h, &Spec6::tcp(at(CLIENT, port), at(VIP, 80), SYN));
        assert_eq!(seen.dst, first.dst, "the client's backend, remembered in AFFINITY6");
    }
    // Another client is free to get another backend.
    let others: std::collections::BTreeSet<_> = (1..40u16)
        .map(|i| run(&mut h, &Spec6::tcp(at(&format!("fd00:244:1::{i:x}"), 40000), at(VIP, 80), SYN)).1.dst)
        .collect();
    assert!(others.len() > 1, "{others:?}");
}

#[test]
fn a_maglev_frontend_takes_its_table_entry_for_each_new_flow() {
    let backends: Vec<SocketAddrV6> = (1..=3).map(|i| at(&format!("fd00:244::{i:x}"), 8080)).collect();
    let mut service = web(&backends);
    service.maglev = true;
    let mut h = harness(&[service]);
    // Maglev's table holds each backend about as often: 60 flows land on
    // each (a miss has odds of 3 * (2/3)^60).
    let landed: std::collections::BTreeSet<_> =
        (40000..40060).map(|port| run(&mut h, &Spec6::tcp(at(CLIENT, port), at(VIP, 80), SYN)).1.dst).collect();
    assert_eq!(landed.into_iter().collect::<Vec<_>>(), backends);
    // A table naming only the second backend (id 2): every new flow goes
    // there, which no random draw over three slots would do.
    let maps = h.datapath.maps.ipv6.as_mut().unwrap();
    for entry in 0..lb_common::DEFAULT_MAGLEV_TABLE_SIZE {
        maps.svc.maglev.set(entry, 2, 0).unwrap();
    }
    for port in 42000..42030 {
        assert_eq!(run(&mut h, &Spec6::tcp(at(CLIENT, port), at(VIP, 80), SYN)).1.dst, backends[1]);
    }
    // A flow's SYN sent again (its entry replaced) hashes to the same entry.
    let (_, once) = run(&mut h, &Spec6::tcp(at(CLIENT, 41000), at(VIP, 80), SYN));
    let (_, again) = run(&mut h, &Spec6::tcp(at(CLIENT, 41000), at(VIP, 80), SYN));
    assert_eq!(once.dst, again.dst);
}

#[test]
fn source_ranges_admit_ipv6_clients_inside_them_only() {
    let backend = at("fd00:244::20", 8080);
    let mut service = web(&[backend]);
    service.source_ranges = vec![("fd00:244::".parse().unwrap(), 64)];
    let mut h = harness(&[service]);
    let (verdict, seen) = run(&mut h, &Spec6::tcp(at(CLIENT, 40000), at(VIP, 80), SYN));
    assert_eq!((verdict, seen.dst), (TC_ACT_OK, backend));
    let (verdict, _) = h.run(&build6(&Spec6::tcp(at("fd00:999::5", 40000), at(VIP, 80), SYN)));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter(counter::DROP_SOURCE_RANGE), 1);
}

#[test]
fn a_fin_closes_both_directions_of_an_ipv6_flow() {
    let backend = at("fd00:244::20", 8080);
    let mut h = harness(&[web(&[backend])]);
    let (client, vip) = (at(CLIENT, 40000), at(VIP, 80));
    let _ = run(&mut h, &Spec6::tcp(client, vip, SYN));
    let _ = run(&mut h, &Spec6::tcp(client, vip, ACK));
    let state = |h: &Harness, key: CtKey6| h.ct6(&key).state;
    assert_eq!(state(&h, ct_key6(client, vip, PROTO_TCP)), lb_common::CT_STATE_ESTABLISHED);
    let _ = run(&mut h, &Spec6::tcp(client, vip, ACK | 0x01));
    assert_eq!(state(&h, ct_key6(client, vip, PROTO_TCP)), lb_common::CT_STATE_CLOSING);
    assert_eq!(state(&h, ct_key6(backend, client, PROTO_TCP)), lb_common::CT_STATE_CLOSING);
}

#[test]
fn a_backends_icmpv6_errors_about_a_flow_reach_the_client_as_from_the_service() {
    let backend = at("fd00:244::21", 5353);
    let mut h = harness(&[Service6::new(at(VIP, 53), PROTO_UDP, &[backend])]);
    let (client, vip) = (at(CLIENT, 41000), at(VIP, 53));
    let _ = run(&mut h, &Spec6::udp(client, vip));
    // The backend refuses the datagram it got (client → backend).
    let got = build6(&Spec6::udp(client, backend));
    for (kind, code, mtu) in [(ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0), (ICMPV6_PACKET_TOO_BIG, 0, 1280)] {
        let error = icmp6_error(backend.ip(), client.ip(), kind, code, mtu, &got[14..]);
        let (verdict, out) = h.run(&error);
        assert_eq!(verdict, TC_ACT_OK, "the stack routes it on");
        let seen = read_icmp6(&out);
        assert_eq!((seen.src, seen.dst), (*vip.ip(), *client.ip()), "from the service, to the client");
        assert_eq!(seen.quoted, (client, vip), "quoting the packet the client sent");
        assert_eq!((seen.kind, seen.code, seen.rest), (kind, code, mtu));
        assert!(seen.checksum_ok, "ICMPv6 checksum, pseudo-header included: {seen:?}");
    }
    assert_eq!(h.counter(counter::ICMP_ERROR_TRANSLATED), 2);
    // An error about no tracked flow passes as it came.
    let stray = icmp6_error(
        backend.ip(),
        client.ip(),
        ICMPV6_DEST_UNREACH,
        4,
        0,
        &build6(&Spec6::udp(client, at("fd00:244::77", 9)))[14..],
    );
    assert_eq!(h.run(&stray), (TC_ACT_OK, stray.clone()));
}
