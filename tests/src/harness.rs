//! The datapath's programs loaded (unpinned, unattached) with maps seeded
//! from Service ports, run on crafted packets through BPF_PROG_TEST_RUN.
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use lb_common::{CtKey, CtValue};
use lb_userspace::{
    datapath::{Datapath, MapSizes},
    model::{Algorithm, Frontend, FrontendKind, Protocol, ServicePort},
    reconcile::Reconciler,
};

use crate::{
    netns::Netns,
    packet::{self, Seen, Spec},
    packet6::{self, Spec6},
};

/// Services for timing repeated runs of one TCP frame. BPF_PROG_TEST_RUN
/// runs the frame again as the last run left it, so `timed`'s backends,
/// `others`, are frontends (cluster IPs) whose one backend is `timed`
/// itself. A SYN to `timed` is then a new flow with a real rewrite on every
/// run (to one of `others`, and from there back), and an ACK after such
/// SYNs an established-flow hit with a real rewrite on every run. Every
/// backend counts as local, so a hook passes rather than forwards. Either
/// family: `T` is `SocketAddrV4` or `SocketAddrV6`.
pub fn round_trip_services<T: Into<SocketAddr> + Copy>(
    timed: T,
    kind: FrontendKind,
    others: &[T],
    algorithm: Algorithm,
) -> Vec<ServicePort> {
    let frontend = |a: &T| {
        let a: SocketAddr = (*a).into();
        Frontend { addr: a.ip(), port: a.port(), protocol: Protocol::Tcp }
    };
    let mut ports = vec![ServicePort {
        name: "timed".into(),
        frontend: frontend(&timed),
        kind,
        backends: others.iter().map(|a| (*a).into()).collect(),
        local_backends: others.iter().map(|a| (*a).into()).collect(),
        algorithm,
        ..Default::default()
    }];
    ports.extend(others.iter().enumerate().map(|(i, other)| ServicePort {
        name: format!("timed-back-{i}"),
        frontend: frontend(other),
        backends: [timed.into()].into(),
        local_backends: [timed.into()].into(),
        ..Default::default()
    }));
    ports
}

/// The frames the per-packet timings run, with their names: a SYN to
/// `timed` (a new flow on every run, with `round_trip_services`), an ACK to
/// it (an established flow, after the SYNs), and an ACK to `elsewhere`,
/// which is not a service.
pub fn timing_frames(
    client: SocketAddrV4,
    timed: SocketAddrV4,
    elsewhere: SocketAddrV4,
) -> [(&'static str, Vec<u8>); 3] {
    [
        ("new flow", packet::build(&Spec::tcp(client, timed, packet::SYN))),
        ("established flow", packet::build(&Spec::tcp(client, timed, packet::ACK))),
        ("not a service", packet::build(&Spec::tcp(client, elsewhere, packet::ACK))),
    ]
}

/// `timing_frames` over IPv6.
pub fn timing_frames6(
    client: SocketAddrV6,
    timed: SocketAddrV6,
    elsewhere: SocketAddrV6,
) -> [(&'static str, Vec<u8>); 3] {
    [
        ("new flow", packet6::build6(&Spec6::tcp(client, timed, packet::SYN))),
        ("established flow", packet6::build6(&Spec6::tcp(client, timed, packet::ACK))),
        ("not a service", packet6::build6(&Spec6::tcp(client, elsewhere, packet::ACK))),
    ]
}

pub struct Harness {
    pub datapath: Datapath,
}

/// An IPv6 frontend and its backends (all local), for `Harness::seed_ipv6`.
pub struct Service6 {
    pub frontend: SocketAddrV6,
    pub protocol: u8,
    pub backends: Vec<SocketAddrV6>,
    /// ClientIP session affinity, in seconds (0: none).
    pub affinity_timeout_s: u32,
    /// Select by a Maglev table rather than at random.
    pub maglev: bool,
    /// loadBalancerSourceRanges: client prefixes allowed new flows.
    pub source_ranges: Vec<(std::net::Ipv6Addr, u8)>,
}

impl Service6 {
    /// As the model would give it: a cluster IP whose backends are all on
    /// this node.
    fn port(&self) -> ServicePort {
        let backends: std::collections::BTreeSet<std::net::SocketAddr> =
            self.backends.iter().map(|b| (*b).into()).collect();
        ServicePort {
            name: format!("test6-{}", self.frontend),
            frontend: Frontend {
                addr: (*self.frontend.ip()).into(),
                port: self.frontend.port(),
                protocol: Protocol::from_number(self.protocol).expect("TCP or UDP"),
            },
            local_backends: backends.clone(),
            backends,
            affinity_timeout_s: self.affinity_timeout_s,
            algorithm: if self.maglev { Algorithm::Maglev } else { Algorithm::Random },
            source_ranges: self
                .source_ranges
                .iter()
                .map(|(addr, len)| format!("{addr}/{len}").parse().unwrap())
                .collect(),
            ..Default::default()
        }
    }

    pub fn new(frontend: SocketAddrV6, protocol: u8, backends: &[SocketAddrV6]) -> Self {
        Self {
            frontend,
            protocol,
            backends: backends.to_vec(),
            affinity_timeout_s: 0,
            maglev: false,
            source_ranges: Vec::new(),
        }
    }
}

impl Harness {
    pub fn new(services: &[ServicePort]) -> Self {
        Self::with_sizes(services, MapSizes::default())
    }

    pub fn with_sizes(services: &[ServicePort], sizes: MapSizes) -> Self {
        let mut datapath = Datapath::load(None, sizes, 0).expect("load datapath (needs root)");
        Reconciler::<lb_common::Ipv4>::new(Default::default(), sizes.maglev)
            .sync(services, &mut datapath.maps)
            .expect("seed maps");
        Reconciler::<lb_common::Ipv6>::new(Default::default(), sizes.maglev)
            .sync(services, &mut datapath.maps)
            .expect("seed the IPv6 maps");
        Self { datapath }
    }

    /// Writes `services` into the IPv6 maps as the agent does: as
    /// `ServicePort`s, through the IPv6 reconciler (ids, slots, Maglev
    /// tables, addresses, source ranges and the endpoint filter's bits).
    pub fn seed_ipv6(&mut self, services: &[Service6]) {
        let ports: Vec<ServicePort> = services.iter().map(Service6::port).collect();
        let current = self.datapath.maps.read_contents6().expect("reading the IPv6 maps");
        let maglev = self.datapath.maps.maglev_capacity().expect("the harness's maps know their Maglev size");
        Reconciler::<lb_common::Ipv6>::new(current, maglev).sync(&ports, &mut self.datapath.maps).expect("seed IPv6");
    }

    /// Runs one packet through the tc program; returns the verdict and the
    /// packet as it left.
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.run_tc(frame, 1);
        (verdict, out)
    }

    /// Runs one frame through the tc program `repeat` times; returns the
    /// verdict, the packet as it left and the ns per run.
    pub fn run_tc(&mut self, frame: &[u8], repeat: u32) -> (u32, Vec<u8>, u64) {
        test_run(self.datapath.program().unwrap(), frame, None, repeat)
    }

    pub fn run_spec(&mut self, spec: &Spec) -> (u32, Seen) {
        let (verdict, out) = self.run(&packet::build(spec));
        (verdict, packet::read(&out))
    }

    /// Runs one frame through the XDP program as if it arrived on interface
    /// `ifindex` of `netns` (where its FIB lookups happen), `repeat` times;
    /// returns the verdict, the frame as it left and the ns per run.
    pub fn run_xdp(&mut self, netns: &Netns, ifindex: u32, frame: &[u8], repeat: u32) -> (u32, Vec<u8>, u64) {
        let program = self.datapath.xdp_program().unwrap();
        let ctx = xdp_ctx(frame, ifindex);
        netns.enter(|| test_run(program, frame, Some(&ctx), repeat))
    }

    /// Runs one frame through the external interfaces' tc program as if it
    /// arrived on interface `ifindex` of `netns`, `repeat` times; returns
    /// the verdict, the frame as it left and the ns per run.
    pub fn run_tc_wire(&mut self, netns: &Netns, ifindex: u32, frame: &[u8], repeat: u32) -> (u32, Vec<u8>, u64) {
        let program = self.datapath.tc_wire_program().unwrap();
        let ctx = skb_ctx(ifindex);
        netns.enter(|| test_run(program, frame, Some(&ctx), repeat))
    }

    pub fn counter(&self, index: u32) -> u64 {
        self.datapath.maps.counters().unwrap()[index as usize].packets
    }

    pub fn ct(&self, key: &CtKey) -> CtValue {
        self.datapath.maps.conntrack.get(key, 0).expect("conntrack entry")
    }

    /// CONNTRACK6's entry at `key`.
    pub fn ct6(&self, key: &lb_common::CtKey6) -> lb_common::CtValue6 {
        self.datapath.maps.ipv6.as_ref().expect("IPv6 maps").conntrack.get(key, 0).expect("IPv6 conntrack entry")
    }

    pub fn ct_state(&self, key: &CtKey) -> u8 {
        self.ct(key).state
    }

    /// Makes an entry look idle for `idle_ns`.
    pub fn age(&mut self, key: &CtKey, idle_ns: u64) {
        let mut value = self.ct(key);
        value.last_seen_ns = stamp_idle_for(monotonic_ns(), idle_ns);
        self.datapath.maps.conntrack.insert(key, value, 0).unwrap();
    }
}

pub fn ct_key(s: SocketAddrV4, d: SocketAddrV4, protocol: u8) -> CtKey {
    CtKey {
        saddr: s.ip().octets(),
        daddr: d.ip().octets(),
        sport: s.port().to_be_bytes(),
        dport: d.port().to_be_bytes(),
        protocol,
        _pad: [0; 3],
    }
}

/// `ct_key` for IPv6: CONNTRACK6's key of the flow `s` → `d`.
pub fn ct_key6(s: SocketAddrV6, d: SocketAddrV6, protocol: u8) -> lb_common::CtKey6 {
    lb_common::CtKey6 {
        saddr: lb_common::ipv6(s.ip().octets()),
        daddr: lb_common::ipv6(d.ip().octets()),
        sport: s.port().to_be_bytes(),
        dport: d.port().to_be_bytes(),
        protocol,
        _pad: [0; 3],
    }
}

/// The `struct xdp_md` of `frame` arriving on `ifindex`: data, data_end,
/// data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
pub fn xdp_ctx(frame: &[u8], ifindex: u32) -> Vec<u8> {
    [0, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// The `struct __sk_buff` of a frame arriving on `ifindex`, up to the
/// fields BPF_PROG_TEST_RUN lets a test set: ingress_ifindex and ifindex
/// (the device the skb is on, in the caller's network namespace); the rest
/// zero, as it requires.
pub fn skb_ctx(ifindex: u32) -> Vec<u8> {
    const INGRESS_IFINDEX: usize = 36;
    let mut ctx = vec![0u8; INGRESS_IFINDEX + 8];
    ctx[INGRESS_IFINDEX..INGRESS_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[INGRESS_IFINDEX + 4..].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// The stamp of an entry last seen `idle_ns` before `now`, in the
/// datapath's clock arithmetic. A machine booted less than `idle_ns` ago has
/// `now < idle_ns`: the subtraction wraps, as the datapath's own does
/// (`now.wrapping_sub(last_seen) < timeout`), so the entry still reads as
/// idle for exactly `idle_ns` where a saturating stamp (0) would make it
/// look only `now` old, and a plain `-` would panic.
pub fn stamp_idle_for(now: u64, idle_ns: u64) -> u64 {
    now.wrapping_sub(idle_ns)
}

/// CLOCK_MONOTONIC_COARSE, the clock of bpf_ktime_get_coarse_ns, which
/// stamps conntrack and affinity entries.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `program` on `frame` `repeat` times; returns the verdict, the
/// frame as it left and the ns per run.
pub fn test_run<P>(program: &mut P, frame: &[u8], ctx: Option<&[u8]>, repeat: u32) -> (u32, Vec<u8>, u64)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 128];
    let options =
        TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: ctx, repeat, ..Default::default() };
    let result = program.test_run(options).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out, result.duration.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::stamp_idle_for;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn an_entry_aged_past_the_boot_time_still_reads_as_idle_that_long() {
        // Booted 5 s ago; an entry made to look idle for an hour.
        let now = 5 * SECOND;
        let stamp = stamp_idle_for(now, 3600 * SECOND);
        assert_eq!(now.wrapping_sub(stamp), 3600 * SECOND, "the datapath's arithmetic sees the idle time");
        assert_eq!(stamp_idle_for(10 * SECOND, 4 * SECOND), 6 * SECOND, "no wrap when the clock is ahead");
    }
}
