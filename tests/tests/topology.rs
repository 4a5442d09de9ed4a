//! Topology-aware routing end to end (kube-proxy's `pkg/proxy/topology.go`):
//! the real agent, with both sources, in the routed netns topology. The
//! node is node-1 in zone-a; backend-0 runs on node-1, backend-1 on node-2
//! (zone-a), backend-2 on node-3 (zone-b). Needs root.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_tests::{
    agent::{Agent, TempDir},
    apiserver::{ApiServer, Kind},
    manifests::{Endpoint, Port, endpoint_slice, service, write_yaml},
    netns::{Cluster, Netns, Topology},
    pods::{PodServer, TCP_PORT, tcp_ask},
};
use serde_json::{Value, json};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 40), 80);
const HTTP: [Port; 1] = [("http", 80, "TCP")];
const HTTP_TARGET: [Port; 1] = [("http", TCP_PORT, "TCP")];
/// The agent's node name. In a cluster the chart sets it from the pod's
/// spec.nodeName; the default (the host name) would differ per machine.
const NODE_ARGS: [&str; 2] = ["--node-name", "node-1"];
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const ZONES: [&str; 3] = ["zone-a", "zone-a", "zone-b"];

fn near() -> Value {
    service("default", "near", *VIP.ip(), &HTTP, json!({"trafficDistribution": "PreferSameNode"}))
}

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
}

/// The slice of `near`: backend-i on node-(i+1), with node hints, zone
/// hints, both, or neither, as the EndpointSlice controller writes them;
/// `unhinted`: an endpoint left without hints.
fn slice(cluster: &Cluster, node_hints: bool, zone_hints: bool, unhinted: Option<usize>) -> Value {
    let endpoints: Vec<Endpoint> =
        (0..3).map(|i| Endpoint::ready(&cluster.pods[i].name, cluster.pods[i].ip).on(NODES[i])).collect();
    let mut slice = endpoint_slice("default", "near", &HTTP_TARGET, &endpoints);
    for (i, endpoint) in slice["endpoints"].as_array_mut().unwrap().iter_mut().enumerate() {
        if unhinted == Some(i) {
            continue;
        }
        if node_hints {
            endpoint["hints"]["forNodes"] = json!([{"name": NODES[i]}]);
        }
        if zone_hints {
            endpoint["hints"]["forZones"] = json!([{"name": ZONES[i]}]);
        }
    }
    slice
}

fn three_backends_and_a_client() -> (Cluster, Vec<PodServer>) {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let servers = cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    (cluster, servers)
}

fn wait_for_backend_count(agent: &mut Agent, count: usize) {
    agent.wait_for_maps(&format!("{count} backends"), |c| c.frontends().any(|(_, b)| b.len() == count)).unwrap();
}

fn reached(client: &Netns, connections: usize) -> BTreeSet<String> {
    client.enter(|| (0..connections).map(|_| tcp_ask(VIP)).collect::<Result<_, _>>()).unwrap()
}

fn narrowed_by(agent: &Agent) -> Value {
    let rows: Value = serde_json::from_str(&agent.cli("services", &["-o", "json"]).unwrap()).unwrap();
    rows[0]["narrowed_by"].clone()
}

/// What each source must show: node hints keep requests on this node's
/// endpoint, zone hints in this zone, and one endpoint without hints
/// spreads them over all. `write` publishes the slice.
fn follows_hints(cluster: &Cluster, agent: &mut Agent, write: &dyn Fn(Value)) {
    let client = &cluster.pod("client").netns;
    wait_for_backend_count(agent, 1);
    agent.wait_for_attachments(4).unwrap();
    assert_eq!(reached(client, 20), BTreeSet::from(["backend-0".to_owned()]), "PreferSameNode");
    assert_eq!(narrowed_by(agent), json!("node hints"));

    // PreferClose: zone hints only. The Node's zone label says zone-a.
    write(slice(cluster, false, true, None));
    wait_for_backend_count(agent, 2);
    assert_eq!(reached(client, 30), BTreeSet::from(["backend-0".to_owned(), "backend-1".to_owned()]), "PreferClose");
    assert_eq!(narrowed_by(agent), json!("zone hints"));

    // One endpoint lacks hints: kube-proxy ignores them all.
    write(slice(cluster, true, true, Some(2)));
    wait_for_backend_count(agent, 3);
    assert_eq!(reached(client, 40).len(), 3, "one endpoint without hints");
    assert_eq!(narrowed_by(agent), Value::Null);
}

#[test]
fn requests_follow_topology_hints_with_the_directory_source() {
    let (cluster, _servers) = three_backends_and_a_client();
    let manifests = TempDir::new("lb-topology").unwrap();
    write_yaml(&manifests.0, "near.yaml", &near());
    write_yaml(&manifests.0, "node.yaml", &node());
    write_yaml(&manifests.0, "slice.yaml", &slice(&cluster, true, true, None));
    let source = format!("dir:{}", manifests.0.display());
    let mut agent = Agent::start(&cluster.node, &["--source", &source, NODE_ARGS[0], NODE_ARGS[1]]).unwrap();
    follows_hints(&cluster, &mut agent, &|slice| write_yaml(&manifests.0, "slice.yaml", &slice));

    // The Node without its zone label: zone hints name no zone of ours.
    write_yaml(&manifests.0, "slice.yaml", &slice(&cluster, false, true, None));
    wait_for_backend_count(&mut agent, 2);
    write_yaml(&manifests.0, "node.yaml", &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}));
    wait_for_backend_count(&mut agent, 3);
}

#[test]
fn requests_follow_topology_hints_with_the_kubernetes_source() {
    let (cluster, _servers) = three_backends_and_a_client();
    let api = ApiServer::start(&cluster.node).unwrap();
    api.apply(Kind::Service, near());
    api.apply(Kind::Node, node());
    api.apply(Kind::EndpointSlice, slice(&cluster, true, true, None));
    let config = TempDir::new("lb-kubeconfig").unwrap();
    let kubeconfig = api.write_kubeconfig(&config.0).unwrap();
    let mut agent =
        Agent::start(&cluster.node, &["--kubeconfig", kubeconfig.to_str().unwrap(), NODE_ARGS[0], NODE_ARGS[1]])
            .unwrap();
    follows_hints(&cluster, &mut agent, &|slice| api.apply(Kind::EndpointSlice, slice));
}
