//! External traffic over IPv6, on two nodes: the agent on each, backend
//! pods on both, a client outside the cluster on the nodes' LAN; an
//! IPv6-only Service. The external hook hands IPv6 frames to its IPv6
//! half (`tc_from_wire6`, `xdp_from_wire6`), which source-NATs flows to a
//! backend on the other node.
//!
//! Every test runs twice, as external.rs's do: with the agent's default
//! flags on a plain bridge (kind's topology, tc), and with
//! `--external-datapath xdp` forced on a LAN that carries what XDP sends.
//! Needs root.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use lb_tests::{
    external::{Family, Mode, TwoNodes, eth0_programs},
    in_both_modes,
    manifests::{Endpoint, Port, endpoint_slice6, service_with_cluster_ips, write_yaml},
    netns::{EXTERNAL_CLIENT_IP6, Lan, MultiNode},
    pods::{Session, TCP_PORT, UDP_PORT, tcp_ask, tcp_whoami, udp_ask},
};
use serde_json::{Value, json};

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x10);
/// Inside `--external-ip-cidrs`, routed to node-1 by the client.
const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x251, 0, 0, 0, 0, 0, 0x10);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const PORTS: [Port; 2] = [("http", 80, "TCP"), ("dns", 53, "UDP")];
const SLICE_PORTS: [Port; 2] = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];

fn web6(spec: Value, status: Value) -> Value {
    let mut object = service_with_cluster_ips("demo", "web6", &[VIP6.into()], &PORTS, spec);
    object["spec"]["ports"][0]["nodePort"] = json!(NODE_PORT);
    object["spec"]["ports"][1]["nodePort"] = json!(UDP_NODE_PORT);
    object["status"] = status;
    object
}

/// The two nodes serving `service` (`demo/web6`) with default flags but
/// for `mode`'s, on its LAN.
fn setup(mode: Mode, service: Value, extra_pods: &[(usize, &str)]) -> TwoNodes {
    setup_on(mode, mode.lan(), service, extra_pods)
}

fn setup_on(mode: Mode, lan: Lan, service: Value, extra_pods: &[(usize, &str)]) -> TwoNodes {
    TwoNodes::start(Family::V6, mode, lan, ("web6", service), &SLICE_PORTS, extra_pods)
}

fn node_port(n: usize, port: u16) -> SocketAddr {
    SocketAddr::new(MultiNode::node_ip6(n).into(), port)
}

fn ipv6_node_ports_and_load_balancer_ips_reach_backends_on_both_nodes_from_outside(mode: Mode) {
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP6.to_string()}]}});
    let spec = json!({"type": "LoadBalancer", "externalIPs": [EXTERNAL_IP6.to_string(), "fd00:252::10"]});
    let mut setup = setup(mode, web6(spec, status), &[]);
    setup.wait_for_backends(NODE_PORT, [2, 2]);
    for n in 1..=2 {
        let answers: Vec<(String, String)> =
            setup.in_client(|| (0..30).map(|_| tcp_whoami(node_port(n, NODE_PORT)).unwrap()).collect());
        let reached: BTreeSet<&str> = answers.iter().map(|(pod, _)| pod.as_str()).collect();
        assert_eq!(reached, BTreeSet::from(["pod-1", "pod-2"]), "via node-{n}");
        for (pod, peer) in &answers {
            // The local backend sees the client; the remote one sees the
            // node that forwarded (source NAT), so its reply comes back
            // that way.
            let expected: IpAddr =
                if *pod == format!("pod-{n}") { EXTERNAL_CLIENT_IP6.into() } else { MultiNode::node_ip6(n).into() };
            assert_eq!(peer, &expected.to_string(), "{pod} via node-{n}");
        }
        let udp = node_port(n, UDP_NODE_PORT);
        let reached: BTreeSet<String> = setup.in_client(|| (0..20).map(|_| udp_ask(udp).unwrap()).collect());
        assert_eq!(reached, BTreeSet::from(["pod-1".to_owned(), "pod-2".to_owned()]), "UDP via node-{n}");
    }
    // The load-balancer IP, routed to node-1 by the client.
    let lb = SocketAddr::new(LB_IP6.into(), 80);
    let reached: BTreeSet<String> = setup.in_client(|| (0..16).map(|_| tcp_ask(lb).unwrap()).collect());
    assert_eq!(reached.len(), 2, "the load-balancer IP reaches both backends: {reached:?}");
    // The allowed ExternalIP too; the other is refused by name.
    let external = SocketAddr::new(EXTERNAL_IP6.into(), 80);
    let reached: BTreeSet<String> = setup.in_client(|| (0..16).map(|_| tcp_ask(external).unwrap()).collect());
    assert_eq!(reached.len(), 2, "the allowed ExternalIP reaches both backends: {reached:?}");
    let log = setup.agents[0].log();
    assert!(log.contains("spec.externalIPs[1]: fd00:252::10 is outside --external-ip-cidrs"), "{log}");
    // No IPv4 node port for an IPv6-only Service.
    let four = SocketAddr::new(MultiNode::node_ip(1).into(), NODE_PORT);
    assert!(setup.in_client(|| tcp_ask(four)).is_err());

    // Without endpoints the node port refuses, from the node.
    setup.write_endpoints(&[]);
    setup.wait_for_backends(NODE_PORT, [0, 0]);
    let started = Instant::now();
    let refused = setup.in_client(|| tcp_ask(node_port(2, NODE_PORT))).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    // An IPv6 TCP connect is refused by the SYN's retransmit (ARCHITECTURE,
    // "Two families": the kernel keeps the first ICMPv6 error as a soft one).
    assert!(started.elapsed().as_millis() < 1_500, "refused after {:?}", started.elapsed());
}

fn ipv6_policy_local_keeps_the_client_address_and_health_checks_answer_on_both_families(mode: Mode) {
    const HEALTH_PORT: u16 = 32000;
    let spec = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": HEALTH_PORT});
    let mut setup = setup(mode, web6(spec, json!({})), &[(1, "client")]);
    setup.write_endpoints(&["pod-2"]);
    setup.wait_for_backends(NODE_PORT, [0, 1]);
    // Through the node with the endpoint: the pod sees the client itself.
    let answers: Vec<(String, String)> =
        setup.in_client(|| (0..6).map(|_| tcp_whoami(node_port(2, NODE_PORT)).unwrap()).collect());
    let client = EXTERNAL_CLIENT_IP6.to_string();
    assert!(answers.iter().all(|(pod, peer)| pod == "pod-2" && *peer == client), "{answers:?}");
    // Through the other node: dropped (no local endpoint), not forwarded.
    assert!(setup.in_client(|| tcp_ask(node_port(1, NODE_PORT))).is_err());
    // A pod on that node reaching the same address gets the whole Service,
    // as kube-proxy short-circuits traffic from inside the cluster.
    let pod = setup.topology.pod("client");
    let answers: Vec<(String, String)> =
        pod.netns.enter(|| (0..3).map(|_| tcp_whoami(node_port(1, NODE_PORT)).unwrap()).collect());
    assert!(answers.iter().all(|(name, peer)| name == "pod-2" && *peer == pod.ip6.to_string()), "{answers:?}");
    // The health check answers on the node's IPv6 address, and on its IPv4
    // one, for a load balancer of either family.
    let status =
        |addr: SocketAddr| setup.in_client(|| lb_tests::pods::http_get(addr, "/healthz").map(|(code, _)| code));
    for (n, code) in [(1, 503), (2, 200)] {
        assert_eq!(status(SocketAddr::new(MultiNode::node_ip6(n).into(), HEALTH_PORT)).unwrap(), code, "node-{n} IPv6");
        assert_eq!(status(SocketAddr::new(MultiNode::node_ip(n).into(), HEALTH_PORT)).unwrap(), code, "node-{n} IPv4");
    }
}

fn ipv6_source_ranges_admit_only_clients_inside_them(mode: Mode) {
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP6.to_string()}]}});
    let spec = |range: &str| json!({"type": "LoadBalancer", "loadBalancerSourceRanges": [range]});
    let client = format!("{EXTERNAL_CLIENT_IP6}/128");
    let mut setup = setup(mode, web6(spec(&client), status.clone()), &[]);
    setup.wait_for_backends(80, [2, 2]);
    let lb = SocketAddr::new(LB_IP6.into(), 80);
    assert!(setup.in_client(|| tcp_ask(lb)).is_ok(), "a client inside the range");
    // The client leaves the range: its new connections are dropped, and
    // the node port (no ranges) still serves it.
    write_yaml(&setup.manifests.0, "web6.yaml", &web6(spec("2001:db8::/32"), status));
    // The new range in and the old one gone (between the two writes both
    // admit).
    let new_range = lb_common::ipv6("2001:db8::".parse::<Ipv6Addr>().unwrap().octets());
    setup.agents[0]
        .wait_for_maps6("the new range alone", |c| {
            !c.source_ranges.is_empty() && c.source_ranges.iter().all(|(_, r)| r.client == new_range)
        })
        .unwrap();
    assert!(setup.in_client(|| tcp_ask(lb)).is_err(), "a client outside the range");
    assert!(setup.in_client(|| tcp_ask(node_port(1, NODE_PORT))).is_ok(), "ranges apply to the load-balancer IP only");
}

fn ipv6_cluster_ip_traffic_to_a_backend_on_another_node_keeps_the_pod_address(mode: Mode) {
    let mut setup = setup(mode, web6(json!({}), json!({})), &[(1, "client")]);
    setup.write_endpoints(&["pod-2"]);
    setup.wait_for_backends(80, [1, 1]);
    let client = setup.topology.pod("client");
    let vip = SocketAddr::new(VIP6.into(), 80);
    let answers: Vec<(String, String)> = client.netns.enter(|| (0..5).map(|_| tcp_whoami(vip).unwrap()).collect());
    assert!(answers.iter().all(|(pod, peer)| pod == "pod-2" && *peer == client.ip6.to_string()), "{answers:?}");
}

fn ipv6_node_ports_are_not_served_on_loopback(mode: Mode) {
    let mut setup = setup(mode, web6(json!({"type": "NodePort"}), json!({})), &[]);
    setup.wait_for_backends(NODE_PORT, [2, 2]);
    let loopback = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), NODE_PORT);
    let answered = setup.topology.nodes[0].enter(|| tcp_ask(loopback));
    assert!(answered.is_err(), "{loopback} answered: {answered:?}");
    let services = setup.agents[0].cli("services", &["-o", "json"]).unwrap();
    assert!(!services.contains("\"::1\""), "a loopback frontend: {services}");
    assert!(services.contains(&format!("\"{}\"", MultiNode::node_ip6(1))), "the node address is served: {services}");
}

/// A backend with nothing on the port answers ICMPv6 port unreachable;
/// the client must get it as if from the node it used, quoting its own
/// packet, whether the backend is on that node or behind the other (SNAT).
fn ipv6_a_backend_port_unreachable_reaches_the_external_client(mode: Mode) {
    let mut setup = setup(mode, web6(json!({"type": "NodePort"}), json!({})), &[]);
    let closed_port: u16 = 30054;
    let closed_vip = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
    let mut closed = service_with_cluster_ips(
        "demo",
        "closed",
        &[closed_vip.into()],
        &[("dns", 54, "UDP")],
        json!({"type": "NodePort"}),
    );
    closed["spec"]["ports"][0]["nodePort"] = json!(closed_port);
    write_yaml(&setup.manifests.0, "closed.yaml", &closed);
    // Only on node-2, and nothing listens on port 9 there.
    let pod = setup.topology.pod("pod-2");
    let endpoint = Endpoint::ready(&pod.name, pod.ip6).on("node-2");
    let slice = endpoint_slice6("demo", "closed", &[("dns", 9, "UDP")], &[endpoint]);
    write_yaml(&setup.manifests.0, "closed-slice.yaml", &slice);
    for agent in &mut setup.agents {
        agent
            .wait_for_maps6("the closed service", |c| {
                c.frontends().any(|(k, b)| k.port == closed_port.to_be_bytes() && b.len() == 1)
            })
            .unwrap();
    }
    for n in [1, 2] {
        let target = node_port(n, closed_port);
        let outcome = setup.in_client(|| {
            let socket = std::net::UdpSocket::bind("[::]:0")?;
            socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            socket.connect(target)?;
            socket.send(b"ping")?;
            socket.recv(&mut [0u8; 64])
        });
        let error = outcome.expect_err("nothing listens");
        assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "via node-{n}: {error}");
    }
}

/// Switching eth0 from tc to XDP (`--external-datapath xdp`, a restart)
/// keeps open IPv6 connections through both nodes' pods, as for IPv4
/// (external.rs): the conntrack maps are shared. Started with the
/// default (tc); the LAN carries XDP_TX so that both work.
#[test]
fn switching_the_external_program_keeps_open_ipv6_connections() {
    let mut setup = setup_on(Mode::Default, Lan::XdpCapable, web6(json!({"type": "NodePort"}), json!({})), &[]);
    setup.wait_for_backends(NODE_PORT, [2, 2]);
    assert_eq!(eth0_programs(&setup.agents[0]), ["tc_from_wire"]);
    let mut sessions: Vec<(Session, String)> = Vec::new();
    for i in 0..40 {
        let mut session = setup.in_client(|| Session::connect(node_port(1, NODE_PORT))).unwrap();
        let backend = session.ask(&format!("hello {i}")).unwrap();
        sessions.push((session, backend));
        let reached: BTreeSet<&str> = sessions.iter().map(|(_, b)| b.as_str()).collect();
        if sessions.len() >= 6 && reached.len() == 2 {
            break;
        }
    }
    let backends: BTreeSet<&str> = sessions.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(backends.len(), 2, "open connections to both nodes' pods: {backends:?}");

    // Not the default: XDP is for NICs that run it natively.
    setup.agents[0].restart_with(&["--external-datapath", "xdp"]).unwrap();
    setup.agents[0].wait_for_log("program=\"xdp_from_wire\"").unwrap();
    setup.agents[0].wait_for_log("replaced: detached").unwrap();
    assert_eq!(eth0_programs(&setup.agents[0]), ["xdp_from_wire"]);
    for (i, (session, backend)) in sessions.iter_mut().enumerate() {
        assert_eq!(&session.ask(&format!("after {i}")).unwrap(), backend, "connection {i} kept its backend");
    }
    let reached: BTreeSet<String> =
        setup.in_client(|| (0..16).map(|_| tcp_ask(node_port(1, NODE_PORT)).unwrap()).collect());
    assert_eq!(reached.len(), 2, "new connections reach both nodes' pods: {reached:?}");
}

in_both_modes!(
    ipv6_node_ports_and_load_balancer_ips_reach_backends_on_both_nodes_from_outside,
    ipv6_policy_local_keeps_the_client_address_and_health_checks_answer_on_both_families,
    ipv6_source_ranges_admit_only_clients_inside_them,
    ipv6_cluster_ip_traffic_to_a_backend_on_another_node_keeps_the_pod_address,
    ipv6_node_ports_are_not_served_on_loopback,
    ipv6_a_backend_port_unreachable_reaches_the_external_client,
);
