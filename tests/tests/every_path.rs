//! One Service semantics on every path a client can take (see
//! `lb_tests::clients`): a pod through tc (the default), a pod through the
//! socket hooks (`--socket-lb all`), and a host-network process through the
//! socket hooks on AF_INET and on AF_INET6 v4-mapped sockets (the
//! default); and in both families: the same paths to an IPv6 Service (a
//! pod through `tc_from_pod6`, pods' and the host's native AF_INET6
//! sockets through the socket hooks). Each behaviour is one function, run
//! once per path and family. Needs root.
//!
//! Where the paths differ by necessity (ARCHITECTURE.md, "Socket-level
//! balancing"), the test says so at the assertion.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::ServiceValue;
use lb_tests::{
    agent::{Agent, TempDir},
    clients::{Answer, Client, ClientPath, TestCgroup},
    manifests::{Endpoint, Port, endpoint_slice, endpoint_slice6, service_with_cluster_ips, write_yaml},
    netns::{Cluster, Topology},
    pods::{PodServer, TCP_PORT, UDP_PORT},
};
use lb_userspace::plan::MapContents;
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x60);
const PORTS: [Port; 2] = [("http", 80, "TCP"), ("dns", 53, "UDP")];
const TARGETS: [Port; 2] = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];

/// The family of the Service a test reaches: an IPv4 Service, or an
/// IPv6-only one (its slice `addressType: IPv6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn vip(self) -> IpAddr {
        match self {
            Family::V4 => VIP.into(),
            Family::V6 => VIP6.into(),
        }
    }
}

/// A cluster of serving backend pods and a client pod, an agent set up for
/// `path`, the Service's manifests, and a client on `path`.
struct Setup {
    path: ClientPath,
    family: Family,
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
    fn new(path: ClientPath, family: Family, backends: &[&str], client: &str, spec: Value) -> Self {
        Self::with_annotations(path, family, backends, client, spec, json!({}))
    }

    fn with_annotations(
        path: ClientPath,
        family: Family,
        backends: &[&str],
        client: &str,
        spec: Value,
        annotations: Value,
    ) -> Self {
        let mut names = backends.to_vec();
        if !names.contains(&client) {
            names.push(client);
        }
        let cluster = Cluster::new(Topology::Routed, &names).unwrap();
        let servers = backends.iter().map(|n| PodServer::start(&cluster.pod(n).netns, n).unwrap()).collect();
        let manifests = TempDir::new("lb-paths").unwrap();
        let mut object = service_object(family, spec);
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
        let mut setup = Self { path, family, cluster, _servers: servers, manifests, agent, client, _cgroup: cgroup };
        setup.publish(backends);
        setup.agent.wait_for_log("sockets balanced at connect").unwrap();
        if !path.at_socket() {
            setup.agent.wait_for_attachments(names.len()).unwrap();
        }
        setup
    }

    /// Makes `backends` the slice's ready endpoints (of the test's family)
    /// and waits for the maps.
    fn publish(&mut self, backends: &[&str]) {
        let slice = match self.family {
            Family::V4 => {
                let endpoints: Vec<Endpoint> =
                    backends.iter().map(|n| Endpoint::ready(n, self.cluster.pod(n).ip)).collect();
                endpoint_slice("default", "web", &TARGETS, &endpoints)
            }
            Family::V6 => {
                let endpoints: Vec<Endpoint> =
                    backends.iter().map(|n| Endpoint::ready(n, self.cluster.pod(n).ip6)).collect();
                endpoint_slice6("default", "web", &TARGETS, &endpoints)
            }
        };
        write_yaml(&self.manifests.0, "slice.yaml", &slice);
        let count = backends.len();
        self.wait_for_frontends(&format!("{count} backends"), |f| {
            f.len() >= 2 && f.iter().all(|(_, backends)| *backends == count)
        });
    }

    /// Waits until the frontends in the maps of the test's family (their
    /// SERVICES value and backend count) are `ready`.
    fn wait_for_frontends(&mut self, what: &str, ready: impl Fn(&[(ServiceValue, usize)]) -> bool) {
        fn frontends<A: lb_common::Address>(c: &MapContents<A>) -> Vec<(ServiceValue, usize)> {
            c.frontend_entries().map(|(k, v)| (*v, c.slots_of(k).len())).collect()
        }
        match self.family {
            Family::V4 => self.agent.wait_for_maps(what, |c| ready(&frontends(c))),
            Family::V6 => self.agent.wait_for_maps6(what, |c| ready(&frontends(c))),
        }
        .unwrap();
    }

    fn http(&self) -> SocketAddr {
        SocketAddr::new(self.family.vip(), 80)
    }

    fn dns(&self) -> SocketAddr {
        SocketAddr::new(self.family.vip(), 53)
    }

    fn distinct_pods(&mut self, count: usize) -> BTreeSet<String> {
        let http = self.http();
        self.client.tcp_pods(http, count).into_iter().collect()
    }
}

/// The Service (TCP 80, UDP 53) in `family`, with `spec` merged in.
fn service_object(family: Family, spec: Value) -> Value {
    service_with_cluster_ips("default", "web", &[family.vip()], &PORTS, spec)
}

const BACKENDS: [&str; 3] = ["backend-0", "backend-1", "backend-2"];

/// One test per path and family for each behaviour. `Host6` (a v4-mapped
/// address) is the IPv4 Service's; an AF_INET6 socket to an IPv6 Service
/// is `Host` in `Family::V6`.
macro_rules! on_every_path {
    ($behaviour:ident) => {
        mod $behaviour {
            use super::*;
            #[test]
            fn pod_through_tc() {
                super::$behaviour(ClientPath::PodTc, Family::V4)
            }
            #[test]
            fn pod_through_the_socket_hooks() {
                super::$behaviour(ClientPath::PodSocket, Family::V4)
            }
            #[test]
            fn host_process() {
                super::$behaviour(ClientPath::Host, Family::V4)
            }
            #[test]
            fn host_process_on_an_inet6_socket() {
                super::$behaviour(ClientPath::Host6, Family::V4)
            }
            #[test]
            fn pod_through_tc_to_ipv6() {
                super::$behaviour(ClientPath::PodTc, Family::V6)
            }
            #[test]
            fn pod_through_the_socket_hooks_to_ipv6() {
                super::$behaviour(ClientPath::PodSocket, Family::V6)
            }
            #[test]
            fn host_process_to_ipv6() {
                super::$behaviour(ClientPath::Host, Family::V6)
            }
        }
    };
}

fn session_affinity_keeps_a_client_on_one_backend(path: ClientPath, family: Family) {
    let affinity =
        json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}});
    let mut setup = Setup::new(path, family, &BACKENDS, "client", affinity);
    let sticky = setup.distinct_pods(12);
    assert_eq!(sticky.len(), 1, "{path:?} {family:?}: 12 connections with ClientIP affinity reached {sticky:?}");
    // The remembered backend leaves the Service: the client gets another
    // and sticks to that one.
    let remembered = sticky.into_iter().next().unwrap();
    let rest: Vec<&str> = BACKENDS.iter().copied().filter(|b| *b != remembered).collect();
    setup.publish(&rest);
    let after = setup.distinct_pods(10);
    assert_eq!(after.len(), 1, "{path:?} {family:?}: after {remembered} left: {after:?}");
    assert!(!after.contains(&remembered), "{path:?} {family:?}: {after:?}");
    // Without affinity they spread: (1/2)^29 odds of a false failure.
    write_yaml(&setup.manifests.0, "service.yaml", &service_object(family, json!({})));
    setup.wait_for_frontends("affinity off", |f| f.iter().all(|(v, _)| v.affinity_timeout_s == 0));
    assert!(setup.distinct_pods(30).len() > 1, "{path:?} {family:?}: no spread without affinity");
}
on_every_path!(session_affinity_keeps_a_client_on_one_backend);

fn maglev_spreads_new_connections_and_can_be_switched_at_run_time(path: ClientPath, family: Family) {
    let maglev = json!({"service.lb.io/lb-algorithm": "maglev"});
    let mut setup = Setup::with_annotations(path, family, &BACKENDS, "client", json!({}), maglev.clone());
    setup.wait_for_frontends("a Maglev table", |f| f.iter().any(|(v, _)| v.maglev_table != 0));
    // Each connection is a new flow (tc: a new source port; the socket
    // hooks: a new socket): Maglev spreads them as random does.
    assert!(setup.distinct_pods(30).len() > 1, "{path:?} {family:?}: Maglev sent 30 connections to one backend");
    // Switched at run time: back to random, then to Maglev again (a table
    // given back, then taken anew), serving all along.
    write_yaml(&setup.manifests.0, "service.yaml", &service_object(family, json!({})));
    setup.wait_for_frontends("random again", |f| f.iter().all(|(v, _)| v.maglev_table == 0));
    assert!(setup.distinct_pods(30).len() > 1, "{path:?} {family:?}: random after Maglev");
    let mut object = service_object(family, json!({}));
    object["metadata"]["annotations"] = maglev;
    write_yaml(&setup.manifests.0, "service.yaml", &object);
    setup.wait_for_frontends("Maglev again", |f| f.iter().any(|(v, _)| v.maglev_table != 0));
    assert!(setup.distinct_pods(30).len() > 1, "{path:?} {family:?}: Maglev after random");
}
on_every_path!(maglev_spreads_new_connections_and_can_be_switched_at_run_time);

fn a_service_without_endpoints_refuses_at_once(path: ClientPath, family: Family) {
    let mut setup = Setup::new(path, family, &[], "client", json!({}));
    for mode in ["tcp", "udp-connected"] {
        for _ in 0..3 {
            let to = if mode == "tcp" { setup.http() } else { setup.dns() };
            let answer = setup.client.ask(mode, to);
            // tc answers ICMP port unreachable, which fails the connect
            // (or the connected UDP socket's next recv); the socket hooks
            // fail the connect itself with ECONNREFUSED.
            let Answer::Error { kind, ms } = &answer else { panic!("{path:?} {family:?} {mode}: {answer:?}") };
            assert_eq!(kind, "ConnectionRefused", "{path:?} {family:?} {mode}");
            // A pod's IPv6 TCP connect is refused by the SYN's retransmit,
            // 1 s on: the kernel processes the ICMPv6 error to the first
            // SYN while connect() still holds the socket (the reply comes
            // back within the send), keeps it as a soft error
            // (TcpExtLockDroppedIcmps) and waits for the next one. IPv4's
            // error to the same SYN fails the connect at once.
            let bound = if (path, family, mode) == (ClientPath::PodTc, Family::V6, "tcp") { 1_500 } else { 100 };
            assert!(*ms < bound, "{path:?} {family:?} {mode}: refused after {ms} ms");
        }
    }
}
on_every_path!(a_service_without_endpoints_refuses_at_once);

fn a_port_the_service_does_not_define_is_not_served(path: ClientPath, family: Family) {
    let mut setup = Setup::new(path, family, &BACKENDS[..1], "client", json!({}));
    let answer = setup.client.ask("tcp", SocketAddr::new(family.vip(), 8080));
    let Answer::Error { kind, .. } = &answer else { panic!("{path:?} {family:?}: {answer:?}") };
    // tc drops (no answer: the connect times out); a socket hook cannot
    // drop a connect, and refuses it rather than let it leave the node.
    let expected = if path.at_socket() { "ConnectionRefused" } else { "TimedOut" };
    assert_eq!(kind, expected, "{path:?} {family:?}");
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

fn a_udp_socket_leaves_a_removed_backend(path: ClientPath, family: Family) {
    let mut setup = Setup::new(path, family, &BACKENDS[..2], "client", json!({}));
    let dns = setup.dns();
    for mode in ["udp", "udp-connected"] {
        setup.publish(&BACKENDS[..2]);
        assert!(matches!(setup.client.keep(mode, dns), Answer::From { .. } | Answer::Error { .. }));
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
                assert_eq!(setup.client.ask(mode, dns).pod(), Some(rest[0]), "{path:?} {family:?} {mode}");
            }
        }
    }
}
on_every_path!(a_udp_socket_leaves_a_removed_backend);

fn a_pod_reaches_itself_through_its_service(path: ClientPath, family: Family) {
    if !path.is_pod() {
        return;
    }
    let mut setup = Setup::new(path, family, &["self"], "self", json!({}));
    assert_eq!(setup.distinct_pods(10), BTreeSet::from(["self".to_owned()]), "{path:?} {family:?}");
    let dns = setup.dns();
    assert_eq!(setup.client.ask("udp", dns).pod(), Some("self"), "{path:?} {family:?}");
}
on_every_path!(a_pod_reaches_itself_through_its_service);

fn an_open_connection_keeps_its_backend_through_removal_and_restarts(path: ClientPath, family: Family) {
    let mut setup = Setup::new(path, family, &BACKENDS, "client", json!({}));
    let http = setup.http();
    assert!(matches!(setup.client.keep("tcp", http), Answer::From { .. } | Answer::Error { .. }));
    let Answer::From { pod: pinned, peer } = setup.client.kept() else { panic!("{path:?} {family:?}: no answer") };
    // The application sees the service address, whichever path translated.
    let service_address = if path == ClientPath::Host6 { format!("[::ffff:{VIP}]:80") } else { http.to_string() };
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
