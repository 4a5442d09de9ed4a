//! The harness itself, dual-stack: pods of both CNI topologies reach each
//! other directly (no Service, no agent) over IPv6 and IPv4, and the node
//! reaches them over IPv6, with the same servers and clients the Service
//! tests use. A failure here is the harness's, not the load balancer's.
//! Needs root.
use std::net::{SocketAddr, SocketAddrV4};

use lb_tests::{
    manifests::{Endpoint, Port, endpoint_slice, endpoint_slice6, service, service_with_cluster_ips},
    netns::{Cluster, Lan, MultiNode, NODE_IP6, Topology},
    pods::{PodServer, Session, TCP_PORT, UDP_PORT, http_get, tcp_ask, tcp_whoami, udp_ask},
};
use serde_json::json;

fn pods_reach_each_other(topology: Topology) {
    let cluster = Cluster::new(topology, &["server", "client"]).unwrap();
    let server = cluster.pod("server");
    let _serving = PodServer::start(&server.netns, &server.name).unwrap();
    let client = cluster.pod("client");
    let (ip4, ip6) = (server.ip, server.ip6);

    client.netns.enter(|| {
        let tcp6 = SocketAddr::from((ip6, TCP_PORT));
        assert_eq!(tcp_ask(tcp6).unwrap(), "server", "TCP over IPv6");
        assert_eq!(udp_ask(SocketAddr::from((ip6, UDP_PORT))).unwrap(), "server", "UDP over IPv6");
        assert_eq!(http_get(tcp6, "/").unwrap(), (200, "server\n".to_owned()), "HTTP over IPv6");
        // The server sees the client as it is, in either family.
        assert_eq!(tcp_whoami(tcp6).unwrap(), ("server".to_owned(), client.ip6.to_string()));
        // IPv4 through the same dual-stack servers, as before: the caller's
        // SocketAddrV4 still fits, and the client is reported as IPv4, not
        // v4-mapped.
        let tcp4 = SocketAddrV4::new(ip4, TCP_PORT);
        assert_eq!(tcp_ask(tcp4).unwrap(), "server", "TCP over IPv4");
        assert_eq!(udp_ask(SocketAddrV4::new(ip4, UDP_PORT)).unwrap(), "server", "UDP over IPv4");
        assert_eq!(tcp_whoami(tcp4).unwrap(), ("server".to_owned(), client.ip.to_string()));
        // A fixed source port, in both families.
        assert_eq!(Session::connect_from(tcp6, 40_006).unwrap().ask("six").unwrap(), "server");
        assert_eq!(Session::connect_from(tcp4, 40_004).unwrap().ask("four").unwrap(), "server");
    });

    // The node reaches the pod over IPv6, from its own address.
    cluster.node.enter(|| {
        let (pod, peer) = tcp_whoami(SocketAddr::from((ip6, TCP_PORT))).unwrap();
        assert_eq!(pod, "server");
        let expected_source = match topology {
            Topology::Routed => NODE_IP6.to_string(),
            // The bridge's address is on the way out, so the node uses it.
            Topology::Bridged => "fd00:10:244:1::1".to_owned(),
        };
        assert_eq!(peer, expected_source);
        assert_eq!(udp_ask(SocketAddr::from((ip6, UDP_PORT))).unwrap(), "server");
    });
}

#[test]
fn routed_pods_reach_each_other_over_both_families() {
    pods_reach_each_other(Topology::Routed);
}

#[test]
fn bridged_pods_reach_each_other_over_both_families() {
    pods_reach_each_other(Topology::Bridged);
}

/// A UDP answer comes from the address the datagram went to, even when
/// the server's namespace would route the answer from another of its
/// addresses: a node serving on its own address (NODE_IP6, on lo) to a
/// bridged pod, whose way back leaves by the bridge that holds another
/// address. A connected client socket accepts only the former.
#[test]
fn udp_answers_come_from_the_address_asked() {
    let cluster = Cluster::new(Topology::Bridged, &["client"]).unwrap();
    let _serving = PodServer::start(&cluster.node, "node").unwrap();
    let asked = SocketAddr::from((NODE_IP6, UDP_PORT));
    let answered_from = cluster.pod("client").netns.enter(|| {
        let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
        socket.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
        socket.send_to(b"ping", asked).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"node");
        from
    });
    assert_eq!(answered_from, asked);
}

#[test]
fn pods_on_two_nodes_reach_each_other_over_both_families() {
    let mut topology = MultiNode::new(2, &[], Lan::PlainBridge).unwrap();
    topology.add_pod(1, "client").unwrap();
    topology.add_pod(2, "server").unwrap();
    let server = topology.pod("server");
    let _serving = PodServer::start(&server.netns, &server.name).unwrap();
    let (ip4, ip6) = (server.ip, server.ip6);
    let client = topology.pod("client");
    client.netns.enter(|| {
        assert_eq!(tcp_whoami(SocketAddr::from((ip6, TCP_PORT))).unwrap(), ("server".into(), client.ip6.to_string()));
        assert_eq!(udp_ask(SocketAddr::from((ip6, UDP_PORT))).unwrap(), "server");
        assert_eq!(tcp_whoami(SocketAddrV4::new(ip4, TCP_PORT)).unwrap(), ("server".into(), client.ip.to_string()));
    });
}

const PORTS: [Port; 1] = [("http", 80, "TCP")];

#[test]
fn dual_stack_manifests_are_as_kubernetes_makes_them() {
    let (v4, v6) = ("10.96.0.10".parse().unwrap(), "fd00:96::10".parse().unwrap());
    let dual = service_with_cluster_ips("demo", "web", &[v6, v4], &PORTS, json!({}));
    assert_eq!(dual["spec"]["clusterIP"], "fd00:96::10");
    assert_eq!(dual["spec"]["clusterIPs"], json!(["fd00:96::10", "10.96.0.10"]));
    assert_eq!(dual["spec"]["ipFamilies"], json!(["IPv6", "IPv4"]));
    assert_eq!(dual["spec"]["ipFamilyPolicy"], "RequireDualStack");
    assert_eq!(
        dual["spec"]["ports"],
        service("demo", "web", "10.96.0.10".parse().unwrap(), &PORTS, json!({}))["spec"]["ports"]
    );
    let single = service_with_cluster_ips("demo", "web", &[v6], &PORTS, json!({"ipFamilyPolicy": "PreferDualStack"}));
    assert_eq!(single["spec"]["ipFamilies"], json!(["IPv6"]));
    assert_eq!(single["spec"]["ipFamilyPolicy"], "PreferDualStack");

    let slice4 =
        endpoint_slice("demo", "web", &PORTS, &[Endpoint::ready("a", std::net::Ipv4Addr::new(10, 244, 0, 10))]);
    let slice6 = endpoint_slice6(
        "demo",
        "web",
        &PORTS,
        &[Endpoint::ready("a", "fd00:10:244::10".parse::<std::net::Ipv6Addr>().unwrap())],
    );
    assert_eq!(slice6["addressType"], "IPv6");
    assert_eq!(slice6["endpoints"][0]["addresses"], json!(["fd00:10:244::10"]));
    assert_eq!(slice4["metadata"]["labels"], slice6["metadata"]["labels"]);
    assert_ne!(slice4["metadata"]["name"], slice6["metadata"]["name"]);
}
