//! Network-namespace sandboxes: a node namespace with pod namespaces wired
//! to it the way real CNIs do it. Everything made here is removed on drop,
//! on failure too, and names are unique per process and sandbox.
use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, bail};
use aya::programs::XdpMode;
use lb_userspace::datapath::Baseline;

/// Runs a command and returns its stdout; fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A short tag unique to this process and call, fixed at 9 hex digits so
/// that names built from it fit an interface's 15 bytes. Tests running in
/// parallel name their namespaces, manifest directories and pin paths with
/// it, so a repeat would make them share state: the count must not wrap
/// within one test process.
pub fn unique_tag() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 0x1000, "more than 4096 tags in one process");
    format!("{}{n:03x}", process_tag())
}

/// What every `unique_tag` of this process starts with: its pid, which
/// fits in 22 bits (PID_MAX_LIMIT).
pub fn process_tag() -> String {
    format!("{:06x}", std::process::id())
}

/// Moves the calling thread into the network namespace at `path`.
pub fn setns(path: &Path) -> std::io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: a valid fd; only this thread's network namespace changes.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command to run inside the namespace (network namespace only, so
    /// bpffs and /sys stay the host's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display())).arg(program);
        cmd
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.enter(|| std::fs::write(format!("/proc/sys/{}", key.replace('.', "/")), value))
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Starts `f` on a thread of its own inside the namespace.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            setns(&path).expect("entering the test namespace");
            f()
        })
    }

    /// Runs `f` on a thread inside the namespace; sockets it opens stay there.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&path).expect("entering the test namespace");
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// How pod interfaces reach the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Calico-style: each pod a /32 (and an IPv6 /128) on a point-to-point
    /// veth, default routes via 169.254.1.1 (and a link-local gateway), the
    /// node routing to each pod by its veth.
    Routed,
    /// Flannel/bridge-style: pod veths are ports of a Linux bridge holding
    /// the pods' gateway addresses; pods share a /24 (and an IPv6 /64).
    Bridged,
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Every pod is dual-stack, as pods of a dual-stack cluster are; tests
    /// of IPv4 alone simply never use it.
    pub ip6: Ipv6Addr,
    /// The node side of the pod's veth, where the tc program attaches.
    pub host_veth: String,
    pub netns: Netns,
}

/// A node namespace and its pods. Dropping it removes every namespace.
pub struct Cluster {
    pub topology: Topology,
    tag: String,
    pub pods: Vec<Pod>,
    pub node: Netns,
}

/// The node's own address (kube-proxy's node IP), on its loopback.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);
/// The node's own IPv6 address, on its loopback next to `NODE_IP`.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 1);
const ROUTED_GATEWAY: &str = "169.254.1.1";
/// The routed pods' IPv6 gateway: Calico's, a link-local address no
/// interface holds, reached through a permanent neighbour entry as
/// `ROUTED_GATEWAY` is.
const ROUTED_GATEWAY6: &str = "fe80::ecee:eeff:feee:eeee";
const BRIDGE_GATEWAY: &str = "10.244.1.1";
const BRIDGE_GATEWAY6: &str = "fd00:10:244:1::1";

impl Cluster {
    pub fn new(topology: Topology, pod_names: &[&str]) -> anyhow::Result<Self> {
        let tag = unique_tag();
        let node = Netns::new(format!("lbt{tag}-node"))?;
        enable_ipv6(&node)?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        node.ip(&["addr", "add", &format!("{NODE_IP6}/128"), "dev", "lo"])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let bridge = format!("b{tag}");
        if topology == Topology::Bridged {
            node.ip(&["link", "add", &bridge, "type", "bridge"])?;
            node.ip(&["addr", "add", &format!("{BRIDGE_GATEWAY}/24"), "dev", &bridge])?;
            node.ip(&["addr", "add", &format!("{BRIDGE_GATEWAY6}/64"), "dev", &bridge, "nodad"])?;
            node.ip(&["link", "set", &bridge, "up"])?;
        }
        let mut cluster = Self { topology, tag, pods: Vec::new(), node };
        for name in pod_names {
            cluster.add_pod(name)?;
        }
        Ok(cluster)
    }

    /// Adds a pod (as a CNI would when one is scheduled).
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<&Pod> {
        let (tag, i) = (&self.tag, self.pods.len());
        let netns = Netns::new(format!("lbt{tag}-{name}"))?;
        enable_ipv6(&netns)?;
        let host_veth = format!("h{tag}{i}");
        let (ip, ip6) = match self.topology {
            Topology::Routed => {
                (Ipv4Addr::new(10, 244, 0, 10 + i as u8), Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 10 + i as u16))
            }
            Topology::Bridged => {
                (Ipv4Addr::new(10, 244, 1, 10 + i as u8), Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 10 + i as u16))
            }
        };
        let pod = Pod { name: name.to_string(), ip, ip6, host_veth, netns };
        self.wire(&pod)?;
        self.pods.push(pod);
        Ok(self.pods.last().expect("just pushed"))
    }

    fn bridge(&self) -> String {
        format!("b{}", self.tag)
    }

    fn wire(&self, pod: &Pod) -> anyhow::Result<()> {
        let (node, veth) = (&self.node, pod.host_veth.as_str());
        node.ip(&["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns.name])?;
        pod.netns.ip(&["link", "set", "eth0", "up"])?;
        match self.topology {
            Topology::Routed => wire_routed(node, pod)?,
            Topology::Bridged => {
                node.ip(&["link", "set", veth, "master", &self.bridge(), "up"])?;
                pod.netns.ip(&["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
                pod.netns.ip(&["route", "add", "default", "via", BRIDGE_GATEWAY, "dev", "eth0"])?;
                pod.netns.ip(&["addr", "add", &format!("{}/64", pod.ip6), "dev", "eth0", "nodad"])?;
                pod.netns.ip(&["-6", "route", "add", "default", "via", BRIDGE_GATEWAY6, "dev", "eth0"])?;
            }
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }
}

/// The MAC address of `interface` in `netns`.
pub fn mac_of(netns: &Netns, interface: &str) -> anyhow::Result<String> {
    let out = netns.ip(&["-o", "link", "show", interface])?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "link/ether");
    words.next().map(str::to_owned).context("no MAC address")
}

/// Calico-style wiring of a pod whose veth pair exists: the pod a /32 with
/// a default route via 169.254.1.1 (the host veth's MAC), the node a /32
/// route to the pod; for IPv6 likewise a /128 and a link-local gateway.
fn wire_routed(node: &Netns, pod: &Pod) -> anyhow::Result<()> {
    let veth = pod.host_veth.as_str();
    node.ip(&["link", "set", veth, "up"])?;
    node.ip(&["route", "add", &format!("{}/32", pod.ip), "dev", veth])?;
    pod.netns.ip(&["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"])?;
    pod.netns.ip(&["route", "add", ROUTED_GATEWAY, "dev", "eth0", "scope", "link"])?;
    pod.netns.ip(&["route", "add", "default", "via", ROUTED_GATEWAY, "dev", "eth0"])?;
    let mac = mac_of(node, veth)?;
    pod.netns.ip(&["neigh", "add", ROUTED_GATEWAY, "lladdr", &mac, "dev", "eth0", "nud", "permanent"])?;
    node.ip(&["-6", "route", "add", &format!("{}/128", pod.ip6), "dev", veth])?;
    pod.netns.ip(&["addr", "add", &format!("{}/128", pod.ip6), "dev", "eth0", "nodad"])?;
    // A link-local gateway needs no on-link route: the kernel takes it on
    // the named device as it is.
    pod.netns.ip(&["-6", "route", "add", "default", "via", ROUTED_GATEWAY6, "dev", "eth0"])?;
    pod.netns.ip(&["-6", "neigh", "add", ROUTED_GATEWAY6, "lladdr", &mac, "dev", "eth0", "nud", "permanent"])?;
    Ok(())
}

/// Makes sure `netns` has IPv6 on (whatever the host's defaults are), and
/// no duplicate address detection on the interfaces made from now on: to
/// be called before any are made. Without the latter, a veth's link-local
/// address stays tentative for about two seconds after it comes up, and
/// the kernel sends no neighbour solicitation from a tentative address: a
/// node forwarding to a routed pod over IPv6 (which it resolves from its
/// host veth's link-local address) stalled the first exchange for 2 s.
/// The addresses the harness adds also carry `nodad`, so that they are
/// usable at once whatever the namespace's defaults.
fn enable_ipv6(netns: &Netns) -> anyhow::Result<()> {
    for scope in ["all", "default"] {
        netns.sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "0")?;
    }
    netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
    Ok(())
}

/// The LAN all nodes and the external client share: 10.200.0.0/24.
pub const LAN_PREFIX: [u8; 3] = [10, 200, 0];
/// The external client's address on the LAN.
pub const EXTERNAL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
/// The LAN's IPv6 prefix, fd00:10:200::/64: node N is fd00:10:200::N.
const LAN_PREFIX6: [u16; 3] = [0xfd00, 0x10, 0x200];
/// The external client's IPv6 address on the LAN.
pub const EXTERNAL_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 0, 0x100);

/// What the nodes' LAN is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lan {
    /// A plain bridge with nothing on its ports, the nodes' eth0 veths
    /// with their default offloads: exactly kind's Docker bridge, and what
    /// containerlab and many VMs have.
    PlainBridge,
    /// A bridge whose ports behave as NICs do for XDP: they run the minimal
    /// XDP program, so that a veth hands on what its peer's XDP program
    /// sends (XDP_TX) at once (`veth_xdp_flush`), and the nodes send full
    /// checksums, as frames off a physical wire have. For tests of
    /// `--external-datapath xdp`, which a veth LAN cannot otherwise carry.
    XdpCapable,
}

/// Several nodes and an external client on one LAN (a bridge in a
/// namespace of its own), each node with routed pods in 10.1.N.0/24 and a
/// route to every other node's pod range, as a CNI without overlay sets up.
/// Node N (from 1) is 10.200.0.N and named node-N. The client routes the
/// given extra prefixes (load-balancer and external IPs) to node 1, as an
/// upstream router announcing them would. Everything is dual-stack: the
/// LAN is also fd00:10:200::/64 (node N fd00:10:200::N), pods are also in
/// fd00:10:1:N::/64, and extra prefixes may be IPv6.
pub struct MultiNode {
    tag: String,
    lan: Netns,
    kind: Lan,
    /// The XDP program on the LAN's ports, on an `XdpCapable` LAN.
    switch: Option<Baseline>,
    pub nodes: Vec<Netns>,
    pub client: Netns,
    /// (node index, pod)
    pub pods: Vec<(usize, Pod)>,
}

impl MultiNode {
    pub fn new(node_count: usize, routed_to_first_node: &[&str], kind: Lan) -> anyhow::Result<Self> {
        let tag = unique_tag();
        let lan = Netns::new(format!("lbt{tag}-lan"))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::new(format!("lbt{tag}-ext"))?;
        enable_ipv6(&client)?;
        let mut nodes = Vec::new();
        for n in 1..=node_count {
            let node = Netns::new(format!("lbt{tag}-n{n}"))?;
            enable_ipv6(&node)?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            nodes.push(node);
        }
        let switch = if kind == Lan::XdpCapable { Some(Baseline::load()?) } else { None };
        let mut topology = Self { tag, lan, kind, switch, nodes, client, pods: Vec::new() };
        for (n, node) in topology.nodes.iter().enumerate() {
            topology.plug(node, n, Self::node_ip(n + 1), Self::node_ip6(n + 1))?;
            for (m, _) in topology.nodes.iter().enumerate().filter(|(m, _)| *m != n) {
                let via = format!("10.200.0.{}", m + 1);
                node.ip(&["route", "add", &format!("10.1.{}.0/24", m + 1), "via", &via])?;
                let pods6 = format!("{}/64", Self::pod_ip6(m + 1, 0));
                node.ip(&["-6", "route", "add", &pods6, "via", &Self::node_ip6(m + 1).to_string()])?;
            }
        }
        topology.plug(&topology.client, 99, EXTERNAL_CLIENT_IP, EXTERNAL_CLIENT_IP6)?;
        topology.run_xdp_on_ports()?;
        for prefix in routed_to_first_node {
            let via = if prefix.contains(':') { Self::node_ip6(1).to_string() } else { Self::node_ip(1).to_string() };
            topology.client.ip(&["route", "add", prefix, "via", &via])?;
        }
        Ok(topology)
    }

    /// Connects `netns` to the LAN with addresses `ip` and `ip6` on its
    /// eth0. On an `XdpCapable` LAN transmit checksum offload is off, so
    /// frames carry full checksums as on a physical wire, which is what XDP
    /// expects to see; on a plain bridge they keep the veth default
    /// (partial).
    fn plug(&self, netns: &Netns, n: usize, ip: Ipv4Addr, ip6: Ipv6Addr) -> anyhow::Result<()> {
        let port = self.port(n);
        self.lan.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns.name])?;
        self.lan.ip(&["link", "set", &port, "master", "br0", "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        if self.kind == Lan::XdpCapable {
            run("nsenter", &[&format!("--net={}", netns.path().display()), "ethtool", "-K", "eth0", "tx", "off"])?;
        }
        Ok(())
    }

    fn port(&self, n: usize) -> String {
        format!("l{}{n}", self.tag)
    }

    /// On an `XdpCapable` LAN, runs the minimal XDP program on every LAN
    /// port, as a NIC's receive path would be there. A veth passes on what its peer's XDP program
    /// sends back (XDP_TX) only when it runs XDP too; without it, frames a
    /// node forwards from XDP wait in the port's ring until other traffic
    /// wakes it (veth_xdp_flush), which looks like loss.
    fn run_xdp_on_ports(&mut self) -> anyhow::Result<()> {
        let ports: Vec<String> = (0..self.nodes.len()).chain([99]).map(|n| self.port(n)).collect();
        let Some(switch) = self.switch.as_mut() else { return Ok(()) };
        let program = switch.xdp()?;
        self.lan.enter(|| ports.iter().try_for_each(|port| program.attach(port, XdpMode::Driver).map(drop)))?;
        Ok(())
    }

    /// Adds a routed pod to node `n` (from 1), at 10.1.N.(10 + its index on
    /// the node) and fd00:10:1:N::(10 + the same).
    pub fn add_pod(&mut self, n: usize, name: &str) -> anyhow::Result<&Pod> {
        let on_node = self.pods.iter().filter(|(m, _)| *m == n).count();
        let netns = Netns::new(format!("lbt{}-{name}", self.tag))?;
        enable_ipv6(&netns)?;
        let host_veth = format!("h{}{n}{on_node}", self.tag);
        let ip = Ipv4Addr::new(10, 1, n as u8, 10 + on_node as u8);
        let ip6 = Self::pod_ip6(n, 10 + on_node as u16);
        let pod = Pod { name: name.to_owned(), ip, ip6, host_veth, netns };
        let node = &self.nodes[n - 1];
        node.ip(&["link", "add", &pod.host_veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns.name])?;
        pod.netns.ip(&["link", "set", "eth0", "up"])?;
        wire_routed(node, &pod)?;
        self.pods.push((n, pod));
        Ok(&self.pods.last().expect("just pushed").1)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().map(|(_, p)| p).find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn node_ip(n: usize) -> Ipv4Addr {
        Ipv4Addr::new(LAN_PREFIX[0], LAN_PREFIX[1], LAN_PREFIX[2], n as u8)
    }

    /// Node `n`'s (from 1) IPv6 address on the LAN.
    pub fn node_ip6(n: usize) -> Ipv6Addr {
        Ipv6Addr::new(LAN_PREFIX6[0], LAN_PREFIX6[1], LAN_PREFIX6[2], 0, 0, 0, 0, n as u16)
    }

    /// Address `host` in node `n`'s IPv6 pod range, fd00:10:1:N::/64.
    fn pod_ip6(n: usize, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x1, n as u16, 0, 0, 0, host)
    }
}
