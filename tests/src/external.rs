//! What the two-node external tests (external.rs, external6.rs) share:
//! the two nodes, and the two ways each test runs the agents.
use std::net::IpAddr;

use serde_json::Value;

use crate::{
    agent::{Agent, TempDir},
    manifests::{Endpoint, Port, endpoint_slice, endpoint_slice6, write_yaml},
    netns::{Lan, MultiNode},
    pods::PodServer,
};

/// Which external program the agents run, and on what LAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Default flags, on a plain bridge (kind's topology): tc.
    Default,
    /// `--external-datapath xdp`, on a LAN that carries XDP_TX frames.
    ForcedXdp,
}

impl Mode {
    /// The program the agents attach to eth0.
    pub fn program(self) -> &'static str {
        match self {
            Mode::Default => "tc_from_wire",
            Mode::ForcedXdp => "xdp_from_wire",
        }
    }

    pub fn lan(self) -> Lan {
        match self {
            Mode::Default => Lan::PlainBridge,
            Mode::ForcedXdp => Lan::XdpCapable,
        }
    }

    /// The agent's flags beyond the defaults in this mode.
    pub fn agent_flags(self) -> &'static [&'static str] {
        match self {
            Mode::Default => &[],
            // Not the default: XDP is for NICs that run it natively.
            Mode::ForcedXdp => &["--external-datapath", "xdp"],
        }
    }
}

/// The programs an agent's `lb stats` lists for eth0.
pub fn eth0_programs(agent: &Agent) -> Vec<String> {
    let stats: serde_json::Value = serde_json::from_str(&agent.cli("stats", &["-o", "json"]).unwrap()).unwrap();
    let attachments = stats["attachments"].as_array().unwrap().iter();
    attachments.filter(|a| a["interface"] == "eth0").map(|a| a["program"].as_str().unwrap().to_owned()).collect()
}

/// Each named test function (taking a `Mode`), as one test per mode:
/// `default_flags_on_a_plain_bridge::NAME` and `forced_xdp::NAME`.
#[macro_export]
macro_rules! in_both_modes {
    ($($test:ident),* $(,)?) => {
        mod default_flags_on_a_plain_bridge {
            $(#[test]
            fn $test() {
                super::$test($crate::external::Mode::Default)
            })*
        }
        mod forced_xdp {
            $(#[test]
            fn $test() {
                super::$test($crate::external::Mode::ForcedXdp)
            })*
        }
    };
}

/// The family a two-node test serves: its Service's addresses, the
/// prefixes the client routes to node-1, the ExternalIPs allowed, and the
/// pods' addresses its EndpointSlice names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Load-balancer IPs, then ExternalIPs (the range the agents allow).
    fn prefixes(self) -> [&'static str; 2] {
        match self {
            Family::V4 => ["10.250.0.0/24", "10.251.0.0/24"],
            Family::V6 => ["fd00:250::/64", "fd00:251::/64"],
        }
    }
}

/// Two nodes with a backend pod each (`pod-1` on node-1, `pod-2` on
/// node-2) serving, and pods that are no endpoint; an agent on each node
/// (default flags but for its name, the source, the ExternalIPs allowed,
/// none by default, and the mode's); a client outside the cluster on the
/// nodes' LAN; and the manifests directory, with the Service `demo/NAME`
/// in `NAME.yaml` and its slice of `family` in `NAME-slice.yaml`.
pub struct TwoNodes {
    pub topology: MultiNode,
    pub agents: Vec<Agent>,
    pub manifests: TempDir,
    _servers: Vec<PodServer>,
    family: Family,
    name: &'static str,
    slice_ports: Vec<Port<'static>>,
}

impl TwoNodes {
    /// `service` (`demo/name`, targeting `slice_ports`) served by both
    /// backend pods, on the mode's LAN or on `lan`; `extra_pods` are
    /// (node, name).
    pub fn start(
        family: Family,
        mode: Mode,
        lan: Lan,
        (name, service): (&'static str, Value),
        slice_ports: &[Port<'static>],
        extra_pods: &[(usize, &str)],
    ) -> Self {
        let [lb_ips, external_ips] = family.prefixes();
        let mut topology = MultiNode::new(2, &[lb_ips, external_ips], lan).unwrap();
        for (n, pod) in [(1, "pod-1"), (2, "pod-2")].iter().chain(extra_pods) {
            topology.add_pod(*n, pod).unwrap();
        }
        let servers = ["pod-1", "pod-2"].iter().map(|p| PodServer::start(&topology.pod(p).netns, p).unwrap()).collect();
        let manifests = TempDir::new("lb-manifests").unwrap();
        write_yaml(&manifests.0, &format!("{name}.yaml"), &service);
        let slice_ports = slice_ports.to_vec();
        let mut setup = Self { topology, agents: Vec::new(), manifests, _servers: servers, family, name, slice_ports };
        setup.write_endpoints(&["pod-1", "pod-2"]);
        for n in 1..=2 {
            let (node_name, dir) = (format!("node-{n}"), format!("dir:{}", setup.manifests.0.display()));
            let mut args = vec!["--source", &dir, "--node-name", &node_name, "--external-ip-cidrs", external_ips];
            args.extend(mode.agent_flags());
            let mut agent = Agent::start(&setup.topology.nodes[n - 1], &args).unwrap();
            // The pod veths and eth0.
            agent.wait_for_attachments(setup.topology.pods.iter().filter(|(m, _)| *m == n).count() + 1).unwrap();
            agent.wait_for_log(&format!("program=\"{}\"", mode.program())).unwrap();
            setup.agents.push(agent);
        }
        setup
    }

    /// Makes the named pods the ready endpoints, each on its node.
    pub fn write_endpoints(&self, pods: &[&str]) {
        let endpoints: Vec<Endpoint> = self
            .topology
            .pods
            .iter()
            .filter(|(_, p)| pods.contains(&p.name.as_str()))
            .map(|(n, p)| {
                let ip: IpAddr = if self.family == Family::V6 { p.ip6.into() } else { p.ip.into() };
                Endpoint::ready(&p.name, ip).on(["node-1", "node-2"][n - 1])
            })
            .collect();
        let slice = match self.family {
            Family::V4 => endpoint_slice("demo", self.name, &self.slice_ports, &endpoints),
            Family::V6 => endpoint_slice6("demo", self.name, &self.slice_ports, &endpoints),
        };
        write_yaml(&self.manifests.0, &format!("{}-slice.yaml", self.name), &slice);
    }

    /// Waits until each agent's maps of the test's family hold a TCP
    /// frontend on `port` (a NodePort is on each node's own address) with
    /// its count of backends.
    pub fn wait_for_backends(&mut self, port: u16, counts: [usize; 2]) {
        for (agent, count) in self.agents.iter_mut().zip(counts) {
            let what = format!("port {port} with {count} backends");
            match self.family {
                Family::V4 => agent.wait_for_maps(&what, |c| {
                    c.frontends().any(|(k, b)| k.port == port.to_be_bytes() && k.protocol == 6 && b.len() == count)
                }),
                Family::V6 => agent.wait_for_maps6(&what, |c| {
                    c.frontends().any(|(k, b)| k.port == port.to_be_bytes() && k.protocol == 6 && b.len() == count)
                }),
            }
            .unwrap();
        }
    }

    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.topology.client.enter(f)
    }
}
