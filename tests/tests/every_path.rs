//! One Service semantics on every path a client can take (see
//! `lb_tests::clients`): a pod through tc (the default), a pod through the
//! socket hooks (`--socket-lb all`), and a host-network process through the
//! socket hooks on AF_INET and on AF_INET6 v4-mapped sockets (the
//! default). Each behaviour is one function, run once per path. Needs root.
//!
//! Where the paths differ by necessity (ARCHITECTURE.md, "Socket-level
//! balancing"), the test says so at the assertion.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, TempDir},
    clients::{Answer, Client, ClientPath, TestCgroup},
    manifests::{Endpoint, Port, endpoint_slice, service, write_yaml},
    netns::{Cluster, Topology},
    pods::{PodServer, TCP_PORT, UDP_PORT},
};
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const HTTP: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(VIP, 53);
const PORTS: [Port; 2] = [("http", 80, "TCP"), ("dns", 53, "UDP")];
const TARGETS: [Port; 2] = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];

/// A cluster of serving backend pods and a client pod, an agent set up for
/// `path`, the Service's manifests, and a client on `path`.
struct Setup {
    path: ClientPath,
    cluster: Cluster,
    _servers: Vec<PodServer>,
    manifests: TempDir,
    agent: Agent,
    // Dropped after the client (fields drop in order): a cgroup with a
    // process in it cannot be removed.
    client: Client,
    _cgroup: Option<TestCgroup>,
}

impl Setup {
    /// `backends` serve (and are the slice's endpoints); `client` is the
    /// client pod's name (it may be one of the backends: hairpin).
    fn new(path: ClientPath, backends: &[&str], client: &str, spec: Value) -> Self {
        Self::with_annotations(path, backends, client, spec, json!({}))
    }

    fn with_annotations(path: ClientPath, backends: &[&str], client: &str, spec: Value, annotations: Value) -> Self {
        let mut names = backends.to_vec();
        if !names.contains(&client) {
            names.push(client);
        }
        let cluster = Cluster::new(Topology::Routed, &names).unwrap();
        let servers = backends.iter().map(|n| PodServer::start(&cluster.pod(n).netns, n).unwrap()).collect();
        let manifests = TempDir::new("lb-paths").unwrap();
        let mut object = service("default", "web", VIP, &PORTS, spec);
        object["metadata"]["annotations"] = annotations;
        write_yaml(&manifests.0, "service.yaml", &object);
        let mut args = vec!["--source".to_owned(), format!("dir:{}", manifests.0.display())];
        let cgroup = (path == ClientPath::PodSocket).then(TestCgroup::new);
        if let Some(cgroup) = &cgroup {
            // `all` translates every namespace's sockets; attached to a
            // cgroup of this test's own, it sees only this test's client
            // (other tests run in parallel on this machine). The default
            // root is tested by the host paths.
            args.extend(["--socket-lb".into(), "all".into(), "--cgroup-path".into(), cgroup.0.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start(&cluster.node, &args).unwrap();
        let netns = if path.is_pod() { &cluster.pod(client).netns } else { &cluster.node };
        let client = Client::start(path, netns, cgroup.as_ref().map(|c| c.0.as_path()));
        let mut setup = Self { path, cluster, _servers: servers, manifests, agent, client, _cgroup: cgroup };
        setup.publish(backends);
        setup.agent.wait_for_log("sockets balanced at connect").unwrap();
        if !path.at_socket() {
            setup.agent.wait_for_attachments(names.len()).unwrap();
        }
        setup
    }

    /// Makes `backends` the slice's ready endpoints and waits for the maps.
    fn publish(&mut self, backends: &[&str]) {
        let endpoints: Vec<Endpoint> = backends.iter().map(|n| Endpoint::ready(n, self.cluster.pod(n).ip)).collect();
        write_yaml(&self.manifests.0, "slice.yaml", &endpoint_slice("default", "web", &TARGETS, &endpoints));
        let count = backends.len();
        self.agent
            .wait_for_maps(&format!("{count} backends"), |c| {
                c.frontends().count() >= 2 && c.frontends().all(|(_, b)| b.len() == count)
            })
            .unwrap();
    }

    fn distinct_pods(&mut self, count: usize) -> BTreeSet<String> {
        self.client.tcp_pods(HTTP, count).into_iter().collect()
    }
}

const BACKENDS: [&str; 3] = ["backend-0", "backend-1", "backend-2"];

/// One test per path for each behaviour.
macro_rules! on_every_path {
    ($behaviour:ident) => {
        mod $behaviour {
            use super::*;
            #[test]
            fn pod_through_tc() {
                super::$behaviour(ClientPath::PodTc)
            }
            #[test]
            fn pod_through_the_socket_hooks() {
                super::$behaviour(ClientPath::PodSocket)
            }
            #[test]
            fn host_process() {
                super::$behaviour(ClientPath::Host)
            }
            #[test]
            fn host_process_on_an_inet6_socket() {
                super::$behaviour(ClientPath::Host6)
            }
        }
    };
}

fn session_affinity_keeps_a_client_on_one_backend(path: ClientPath) {
    let affinity =
        json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}});
    let mut setup = Setup::new(path, &BACKENDS, "client", affinity);
    let sticky = setup.distinct_pods(12);
    assert_eq!(sticky.len(), 1, "{path:?}: 12 connections with ClientIP affinity reached {sticky:?}");
    // Without affinity they spread: (1/3)^29 odds of a false failure.
    let object = service("default", "web", VIP, &PORTS, json!({}));
    write_yaml(&setup.manifests.0, "service.yaml", &object);
    setup.agent.wait_for_maps("affinity off", |c| c.services.values().all(|v| v.affinity_timeout_s == 0)).unwrap();
    assert!(setup.distinct_pods(30).len() > 1, "{path:?}: no spread without affinity");
}
on_every_path!(session_affinity_keeps_a_client_on_one_backend);

fn maglev_spreads_new_connections(path: ClientPath) {
    let maglev = json!({"service.lb.io/lb-algorithm": "maglev"});
    let mut setup = Setup::with_annotations(path, &BACKENDS, "client", json!({}), maglev);
    setup.agent.wait_for_maps("a Maglev table", |c| c.services.values().any(|v| v.maglev_table != 0)).unwrap();
    // Each connection is a new flow (tc: a new source port; the socket
    // hooks: a new socket): Maglev spreads them as random does.
    assert!(setup.distinct_pods(30).len() > 1, "{path:?}: Maglev sent 30 connections to one backend");
}
on_every_path!(maglev_spreads_new_connections);

fn a_service_without_endpoints_refuses_at_once(path: ClientPath) {
    let mut setup = Setup::new(path, &[], "client", json!({}));
    for mode in ["tcp", "udp-connected"] {
        for _ in 0..3 {
            let answer = setup.client.ask(mode, if mode == "tcp" { HTTP } else { DNS });
            // tc answers ICMP port unreachable, which fails the connect
            // (or the connected UDP socket's next recv); the socket hooks
            // fail the connect itself with ECONNREFUSED.
            let Answer::Error { kind, ms } = &answer else { panic!("{path:?} {mode}: {answer:?}") };
            assert_eq!(kind, "ConnectionRefused", "{path:?} {mode}");
            assert!(*ms < 100, "{path:?} {mode}: refused after {ms} ms");
        }
    }
}
on_every_path!(a_service_without_endpoints_refuses_at_once);

fn a_port_the_service_does_not_define_is_not_served(path: ClientPath) {
    let mut setup = Setup::new(path, &BACKENDS[..1], "client", json!({}));
    let answer = setup.client.ask("tcp", SocketAddrV4::new(VIP, 8080));
    let Answer::Error { kind, .. } = &answer else { panic!("{path:?}: {answer:?}") };
    // tc drops (no answer: the connect times out); a socket hook cannot
    // drop a connect, and refuses it rather than let it leave the node.
    let expected = if path.at_socket() { "ConnectionRefused" } else { "TimedOut" };
    assert_eq!(kind, expected, "{path:?}");
}
on_every_path!(a_port_the_service_does_not_define_is_not_served);

/// Asks on the kept socket until `done` holds for an answer, for up to 3 s.
fn kept_until(setup: &mut Setup, what: &str, done: impl Fn(&Answer) -> bool) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let answer = setup.client.kept();
        if done(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "{:?}: {what}; last answer {answer:?}", setup.path);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn a_udp_socket_leaves_a_removed_backend(path: ClientPath) {
    let mut setup = Setup::new(path, &BACKENDS[..2], "client", json!({}));
    for mode in ["udp", "udp-connected"] {
        setup.publish(&BACKENDS[..2]);
        assert!(matches!(setup.client.keep(mode, DNS), Answer::From { .. } | Answer::Error { .. }));
        let first = setup.client.kept();
        let Some(first) = first.pod().map(str::to_owned) else { panic!("{path:?} {mode}: {first:?}") };
        for _ in 0..3 {
            assert_eq!(
                setup.client.kept().pod(),
                Some(first.as_str()),
                "{path:?} {mode}: the socket keeps its backend"
            );
        }
        let rest: Vec<&str> = BACKENDS[..2].iter().copied().filter(|n| *n != first).collect();
        setup.publish(&rest);
        let what = format!("{mode}: the socket still reaches the removed backend");
        // A datagram in flight while the agent forgets the flow is lost (its
        // reply no longer has an entry to be translated by), as under
        // kube-proxy's conntrack cleanup: a timeout is no answer yet.
        let after = kept_until(&mut setup, &what, |a| match a {
            Answer::Error { kind, .. } if kind == "WouldBlock" || kind == "TimedOut" => false,
            a => a.pod().is_none_or(|pod| pod != first),
        });
        match after {
            // Its flow moved to the live backend (tc: the agent forgot the
            // conntrack entry; socket hooks: the socket's entry).
            Answer::From { pod, .. } => assert_eq!(pod, rest[0], "{path:?} {mode}"),
            // A connected socket translated at connect is connected to the
            // backend itself: it is destroyed, as under Cilium. A blocked
            // recv fails with ECONNABORTED; the socket is disconnected, so
            // a send fails with EDESTADDRREQ (io's "Uncategorized"). A new
            // socket gets a live backend.
            Answer::Error { kind, .. } => {
                assert!(path.at_socket() && mode == "udp-connected", "{path:?} {mode}: {kind}");
                assert!(["ConnectionAborted", "Uncategorized"].contains(&kind.as_str()), "{path:?} {mode}: {kind}");
                assert_eq!(setup.client.ask(mode, DNS).pod(), Some(rest[0]), "{path:?} {mode}");
            }
        }
    }
}
on_every_path!(a_udp_socket_leaves_a_removed_backend);

fn a_pod_reaches_itself_through_its_service(path: ClientPath) {
    if !path.is_pod() {
        return;
    }
    let mut setup = Setup::new(path, &["self"], "self", json!({}));
    assert_eq!(setup.distinct_pods(10), BTreeSet::from(["self".to_owned()]), "{path:?}");
    assert_eq!(setup.client.ask("udp", DNS).pod(), Some("self"), "{path:?}");
}
on_every_path!(a_pod_reaches_itself_through_its_service);

fn an_open_connection_keeps_its_backend_through_removal_and_restarts(path: ClientPath) {
    let mut setup = Setup::new(path, &BACKENDS, "client", json!({}));
    assert!(matches!(setup.client.keep("tcp", HTTP), Answer::From { .. } | Answer::Error { .. }));
    let Answer::From { pod: pinned, peer } = setup.client.kept() else { panic!("{path:?}: no answer") };
    // The application sees the service address, whichever path translated.
    let service_address = if path == ClientPath::Host6 { format!("[::ffff:{VIP}]:80") } else { HTTP.to_string() };
    assert_eq!(peer, service_address, "{path:?}");
    let still = |setup: &mut Setup, when: &str| {
        let answer = setup.client.kept();
        assert_eq!(answer, Answer::From { pod: pinned.clone(), peer: service_address.clone() }, "{path:?} {when}");
    };

    // Its backend leaves the Service: the open connection is not dropped,
    // and no new one reaches that backend.
    let rest: Vec<&str> = BACKENDS.iter().copied().filter(|n| *n != pinned).collect();
    setup.publish(&rest);
    still(&mut setup, "after its backend left");
    let reached = setup.distinct_pods(20);
    assert!(!reached.contains(&pinned), "{path:?}: a new connection reached removed {pinned}");

    // A clean stop, then a restart that adopts the pinned datapath, then a
    // SIGKILL and another restart: the connection never notices.
    setup.agent.restart().unwrap();
    setup.agent.wait_for_log("sockets balanced at connect").unwrap();
    still(&mut setup, "after a restart");
    setup.agent.kill().unwrap();
    still(&mut setup, "with no agent running");
    setup.agent.restart().unwrap();
    setup.agent.wait_for_log("sockets balanced at connect").unwrap();
    still(&mut setup, "after a SIGKILL and a restart");
    assert!(!setup.distinct_pods(10).contains(&pinned), "{path:?}: after the restarts");
}
on_every_path!(an_open_connection_keeps_its_backend_through_removal_and_restarts);
