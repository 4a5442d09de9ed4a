//! Soak tests, bounded in time: the agent killed and restarted over and
//! over, the API server away for a minute, Services created and deleted in
//! bursts, every kind of malformed manifest at once; all under traffic
//! that must never fail. The real agent with its default flags, in the
//! routed netns topology. Needs root. About two minutes.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, TempDir},
    apiserver::{ApiServer, Kind},
    manifests::{Endpoint, Port, endpoint_slice, service, write_yaml},
    netns::{Cluster, Topology},
    pods::{PodServer, TCP_PORT, tcp_ask},
    traffic::Traffic,
};
use serde_json::{Value, json};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 50), 80);
const HTTP: [Port; 1] = [("http", 80, "TCP")];
const HTTP_TARGET: [Port; 1] = [("http", TCP_PORT, "TCP")];

fn stable() -> Value {
    service("soak", "stable", *VIP.ip(), &HTTP, json!({}))
}

fn stable_slice(cluster: &Cluster, backends: usize) -> Value {
    let endpoints: Vec<Endpoint> = cluster.pods[..backends].iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
    endpoint_slice("soak", "stable", &HTTP_TARGET, &endpoints)
}

/// Three backend pods serving and a client pod.
fn cluster() -> (Cluster, Vec<PodServer>) {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let servers = cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    (cluster, servers)
}

/// A test API server holding `objects` and an agent watching it.
fn kube_agent(cluster: &Cluster, objects: &[(Kind, Value)]) -> (ApiServer, TempDir, Agent) {
    let api = ApiServer::start(&cluster.node).unwrap();
    for (kind, object) in objects {
        api.apply(*kind, object.clone());
    }
    let config = TempDir::new("lb-soak-kubeconfig").unwrap();
    let kubeconfig = api.write_kubeconfig(&config.0).unwrap();
    let agent = Agent::start(&cluster.node, &["--kubeconfig", kubeconfig.to_str().unwrap()]).unwrap();
    (api, config, agent)
}

/// Waits up to `limit` for the maps to hold `what`.
fn converge(agent: &mut Agent, what: &str, limit: Duration, ready: impl Fn(&lb_userspace::plan::MapContents) -> bool) {
    let started = Instant::now();
    while agent.wait_for_maps(what, &ready).is_err() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
    }
}

fn backends_of_stable(c: &lb_userspace::plan::MapContents) -> usize {
    c.frontends().find(|(k, _)| k.vip == VIP.ip().octets()).map_or(0, |(_, b)| b.len())
}

#[test]
fn twenty_sigkills_of_the_agent_fail_no_request() {
    let (cluster, _servers) = cluster();
    let objects = [(Kind::Service, stable()), (Kind::EndpointSlice, stable_slice(&cluster, 3))];
    let (_api, _config, mut agent) = kube_agent(&cluster, &objects);
    converge(&mut agent, "the stable Service", Duration::from_secs(20), |c| backends_of_stable(c) == 3);
    agent.wait_for_attachments(4).unwrap();
    let traffic = Traffic::start(&cluster.pod("client").netns, VIP).unwrap();
    for round in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        agent.kill().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        agent.restart().unwrap();
        // Adopted as they were: the restarted agent writes nothing.
        agent
            .wait_for_log_count("synced frontends=1 writes=0", round + 1)
            .unwrap_or_else(|e| panic!("restart {round}: {e}"));
    }
    std::thread::sleep(Duration::from_millis(200));
    traffic.stop().assert_none_failed(200);
}

#[test]
fn the_api_server_away_for_a_minute_fails_no_request_and_the_agent_converges_after() {
    let (cluster, _servers) = cluster();
    let objects = [(Kind::Service, stable()), (Kind::EndpointSlice, stable_slice(&cluster, 2))];
    let (mut api, _config, mut agent) = kube_agent(&cluster, &objects);
    converge(&mut agent, "the stable Service", Duration::from_secs(20), |c| backends_of_stable(c) == 2);
    agent.wait_for_attachments(4).unwrap();
    let traffic = Traffic::start(&cluster.pod("client").netns, VIP).unwrap();

    api.stop();
    // Meanwhile the cluster changes: a third backend, and a new Service.
    api.apply(Kind::EndpointSlice, stable_slice(&cluster, 3));
    let other = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 51), 80);
    api.apply(Kind::Service, service("soak", "other", *other.ip(), &HTTP, json!({})));
    let endpoints = [Endpoint::ready(&cluster.pods[2].name, cluster.pods[2].ip)];
    api.apply(Kind::EndpointSlice, endpoint_slice("soak", "other", &HTTP_TARGET, &endpoints));
    std::thread::sleep(Duration::from_secs(60));
    assert_eq!(agent.maps().unwrap().frontends().count(), 1, "nothing changes while the API server is away");
    api.restart().unwrap();
    // The watch retries with a backoff of up to 30 s.
    // The Service and its EndpointSlice come back on separate watches: the
    // new frontend may be served for a moment with no endpoints (refused,
    // as kube-proxy refuses it) before its slice arrives, so wait for both.
    converge(&mut agent, "the changes made during the outage", Duration::from_secs(45), |c| {
        let other_backends = c.frontends().find(|(k, _)| k.vip == other.ip().octets()).map_or(0, |(_, b)| b.len());
        backends_of_stable(c) == 3 && c.frontends().count() == 2 && other_backends == 1
    });
    assert_eq!(cluster.pod("client").netns.enter(|| tcp_ask(other)).unwrap(), "backend-2");
    traffic.stop().assert_none_failed(1000);
}

#[test]
fn services_created_and_deleted_in_bursts_never_disturb_a_stable_one() {
    let (cluster, _servers) = cluster();
    let objects = [(Kind::Service, stable()), (Kind::EndpointSlice, stable_slice(&cluster, 3))];
    let (api, _config, mut agent) = kube_agent(&cluster, &objects);
    converge(&mut agent, "the stable Service", Duration::from_secs(20), |c| backends_of_stable(c) == 3);
    agent.wait_for_attachments(4).unwrap();
    let traffic = Traffic::start(&cluster.pod("client").netns, VIP).unwrap();
    let started = Instant::now();
    let mut bursts = 0;
    while started.elapsed() < Duration::from_secs(10) {
        for i in 0..200u32 {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 1)) + i);
            api.apply(Kind::Service, service("churn", &format!("svc-{i}"), ip, &HTTP, json!({})));
            let endpoints = [Endpoint::ready(&cluster.pods[(i % 3) as usize].name, cluster.pods[(i % 3) as usize].ip)];
            api.apply(Kind::EndpointSlice, endpoint_slice("churn", &format!("svc-{i}"), &HTTP_TARGET, &endpoints));
        }
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..200u32 {
            api.delete(Kind::Service, "churn", &format!("svc-{i}"));
            api.delete(Kind::EndpointSlice, "churn", &format!("svc-{i}-abcde"));
        }
        std::thread::sleep(Duration::from_millis(300));
        bursts += 1;
    }
    converge(&mut agent, "only the stable Service", Duration::from_secs(20), |c| c.frontends().count() == 1);
    assert!(bursts >= 5, "{bursts} bursts");
    traffic.stop().assert_none_failed(500);
}

#[test]
fn every_kind_of_malformed_manifest_at_once_costs_only_itself() {
    let (cluster, _servers) = cluster();
    let manifests = TempDir::new("lb-soak-malformed").unwrap();
    write_yaml(&manifests.0, "good.yaml", &stable());
    write_yaml(&manifests.0, "good-slice.yaml", &stable_slice(&cluster, 3));
    let dir = &manifests.0;
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("garbage.yaml"), bytes).unwrap();
    std::fs::write(dir.join("tabs.yaml"), "apiVersion: v1\nkind: Service\nmetadata:\n\tname: tabs\n").unwrap();
    std::fs::write(dir.join("deep.yaml"), format!("{}{}", "[".repeat(20_000), "]".repeat(20_000))).unwrap();
    let mut bomb = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (name, previous) in
        ["b", "c", "d", "e", "f", "g", "h", "i"].iter().zip(["a", "b", "c", "d", "e", "f", "g", "h"])
    {
        bomb += &format!(
            "{name}: &{name} [*{previous},*{previous},*{previous},*{previous},*{previous},*{previous},*{previous},*{previous},*{previous}]\n"
        );
    }
    std::fs::write(dir.join("bomb.yaml"), bomb).unwrap();
    let bad = |name: &str, spec: Value| json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "soak"}, "spec": spec});
    write_yaml(
        dir,
        "wrong-type.yaml",
        &bad("wrong-type", json!({"clusterIP": "10.96.0.60", "ports": [{"port": "eighty"}]})),
    );
    write_yaml(
        dir,
        "port-range.yaml",
        &bad("port-range", json!({"clusterIP": "10.96.0.61", "ports": [{"port": 70000}]})),
    );
    write_yaml(
        dir,
        "bad-address.yaml",
        &bad("bad-address", json!({"clusterIP": "10.96.0.999", "ports": [{"port": 80}]})),
    );
    write_yaml(
        dir,
        "unknown-kind.yaml",
        &json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
    );

    let started = Instant::now();
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    converge(&mut agent, "the good Service", Duration::from_secs(20), |c| backends_of_stable(c) == 3);
    assert!(started.elapsed() < Duration::from_secs(20), "the bad files took {:?}", started.elapsed());
    agent.wait_for_attachments(4).unwrap();
    assert_eq!(agent.maps().unwrap().frontends().count(), 1, "only the good Service is served");
    let traffic = Traffic::start(&cluster.pod("client").netns, VIP).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    traffic.stop().assert_none_failed(50);
    // Each bad object is reported by file, and by object and field where
    // it has them; the agent is still running.
    for expected in [
        "garbage.yaml: document",
        "tabs.yaml: document 1: invalid YAML",
        "deep.yaml: document 1: invalid YAML",
        "bomb.yaml: document 1",
        "wrong-type.yaml: Service soak/wrong-type: spec.ports[0].port",
        "port-range.yaml: Service soak/port-range: spec.ports[0].port",
        "bad-address.yaml: Service soak/bad-address: spec.clusterIP",
        "unknown-kind.yaml: example.com/v1 Widget",
    ] {
        agent.wait_for_log(expected).unwrap_or_else(|e| panic!("{expected}: {e}\n{}", agent.log()));
    }
    assert!(agent.is_running(), "the agent stopped:\n{}", agent.log());
}
