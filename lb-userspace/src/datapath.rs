//! Loading the eBPF object, pinning it, attaching it, and reading and writing
//! its maps. The only module that talks to the kernel's BPF side.
//!
//! Pin layout under the pin path (default /sys/fs/bpf/lb):
//!   SERVICES, BACKENDS, SERVICE_ADDRS,
//!   CONNTRACK, AFFINITY, MAGLEV, COUNTERS     the maps
//!   SOCK_REVNAT, FLOW_SEED, NODE_PORTS        the maps
//!   SOURCE_RANGES                             the maps
//!   SERVICES6 ... SOCK_REVNAT6                the IPv6 maps, one per IPv4 one
//!   TAIL_CALLS, WIRE_TAIL_CALLS,
//!   XDP_TAIL_CALLS                            the IPv6 halves of the packet programs
//!   tc_from_pod, tc_from_wire, xdp_from_wire  the programs
//!   links/if_<ifindex>                        one TCX link per pod interface
//!   links/wire_<ifindex>, links/xdp_<ifindex> one TCX or XDP link per external interface
//!   links/cgroup_<program>                    the socket programs' cgroup links
//! Pinned maps are adopted by the next agent, and pinned links keep the
//! program attached while no agent runs, so restarts do not drop traffic.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::{
    Address, AffinityKey, AffinityKey6, AffinityValue, Backend, Backend6, CtKey, CtKey6, CtValue, CtValue6,
    FILTER_LINE_BITS, FilterLine, GLOBAL_ENDPOINT_FILTER_BITS_LOG2, GLOBAL_HOST_NETNS, GLOBAL_MAGLEV_TABLE_SIZE,
    GLOBAL_SOCKET_LB_NETNS, IPV6_DORMANT_ENTRIES, Ipv4, Ipv6, MAP_AFFINITY, MAP_AFFINITY6, MAP_BACKENDS, MAP_BACKENDS6,
    MAP_CONNTRACK, MAP_CONNTRACK6, MAP_COUNTERS, MAP_ENDPOINT_FILTER, MAP_FLOW_SEED, MAP_MAGLEV, MAP_MAGLEV6,
    MAP_NODE_PORTS, MAP_SERVICE_ADDRS, MAP_SERVICE_ADDRS6, MAP_SERVICES, MAP_SERVICES6, MAP_SOCK_REVNAT,
    MAP_SOCK_REVNAT6, MAP_SOURCE_RANGES, MAP_SOURCE_RANGES6, MAP_TAIL_CALLS, MAP_WIRE_TAIL_CALLS, MAP_XDP_TAIL_CALLS,
    PROG_FROM_POD, PROG_FROM_POD6, PROG_FROM_WIRE6, PROG_TC_BASELINE, PROG_TC_FROM_WIRE, PROG_XDP_BASELINE,
    PROG_XDP_FROM_WIRE, PROG_XDP_FROM_WIRE6, PROGS_SOCK, PROGS_SOCK_BIND, ServiceAddr, ServiceKey, ServiceKey6,
    ServiceValue, SockRevNatKey, SockRevNatKey6, SockRevNatValue, SockRevNatValue6, SourceRangeKey, TAIL_CALL_POD6,
    TAIL_CALL_WIRE6, TrafficCounter, counter,
};

use crate::sizing::Entries;
pub use crate::sizing::MapSizes;
use crate::{
    family::Family,
    filter::{self, FilterCopy},
    interfaces::Interface,
    plan::{MaglevConfig, MapContents, MapOp, stale_affinity},
    reconcile::MapWriter,
};

/// The eBPF object, built by build.rs. Empty when it was built without
/// bpf-linker (`cargo check`, `cargo clippy`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this lb binary was built without its eBPF object (bpf-linker was missing); install bpf-linker and rebuild"
    )]
    NotBuilt,
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
    #[error("creating pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program: {0}")]
    Program(#[from] ProgramError),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("attaching to {interface}: {source}")]
    Attach { interface: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("drawing the flow seed from /dev/urandom: {0}")]
    Seed(io::Error),
    #[error("replacing the pin {path} with the grown map: {source}")]
    Rename { path: PathBuf, source: io::Error },
    #[error("the maps cannot grow without a pin path (their links and traffic maps are found through pins)")]
    GrowWithoutPins,
    #[error(
        "the IPv6 maps are small (dormant) but hold entries, so they are not made anew at full size; \
         remove the pins of CONNTRACK6, AFFINITY6, SOCK_REVNAT6, MAGLEV6 and SERVICES6 to have them remade"
    )]
    WakeOverState,
    #[error("attaching the socket programs to cgroup {path}: {source}")]
    AttachCgroup { path: PathBuf, source: Box<dyn std::error::Error + Send + Sync> },
}

/// One family's Service maps, which the agent writes (`MapOp<A>`) and
/// the programs read: SERVICES, BACKENDS, SERVICE_ADDRS, SOURCE_RANGES
/// and MAGLEV, or their `*6` namesakes.
pub struct ServiceMaps<A: Address> {
    pub services: HashMap<MapData, ServiceKey<A>, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend<A>>,
    pub service_addrs: HashMap<MapData, A, ServiceAddr>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey<A>, u8>,
    pub maglev: Array<MapData, u32>,
    /// The maps' names, for errors: SERVICES or SERVICES6, and so on.
    names: ServiceMapNames,
}

/// The names of one family's Service maps.
#[derive(Clone, Copy)]
struct ServiceMapNames {
    services: &'static str,
    backends: &'static str,
    service_addrs: &'static str,
    source_ranges: &'static str,
    maglev: &'static str,
}

const IPV4_MAPS: ServiceMapNames = ServiceMapNames {
    services: MAP_SERVICES,
    backends: MAP_BACKENDS,
    service_addrs: MAP_SERVICE_ADDRS,
    source_ranges: MAP_SOURCE_RANGES,
    maglev: MAP_MAGLEV,
};

const IPV6_MAPS: ServiceMapNames = ServiceMapNames {
    services: MAP_SERVICES6,
    backends: MAP_BACKENDS6,
    service_addrs: MAP_SERVICE_ADDRS6,
    source_ranges: MAP_SOURCE_RANGES6,
    maglev: MAP_MAGLEV6,
};

/// Handles on the maps.
pub struct Maps {
    /// The IPv4 Service maps.
    pub svc: ServiceMaps<Ipv4>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// Sockets the socket hooks sent to a backend (read to find the
    /// connected UDP sockets of a backend that left).
    pub sock_revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    /// Entries per Maglev table, as loaded. None when opened from pins: the
    /// size is a load-time global of the programs, recorded in no map
    /// (MAGLEV's max_entries is tables × size, with neither known), so such
    /// Maps refuse to write Maglev tables rather than misplace them.
    maglev_table_size: Option<u32>,
    pub counters: PerCpuArray<MapData, TrafficCounter>,
    /// The seed of random selection (`lb_common::MAP_FLOW_SEED`).
    flow_seed: Array<MapData, u32>,
    /// Ports NodePorts serve, for the bind hooks (`lb_common::MAP_NODE_PORTS`);
    /// None in pins of an agent that had none.
    node_ports: Option<Array<MapData, u8>>,
    /// ENDPOINT_FILTER (`lb_common::MAP_ENDPOINT_FILTER`), and the agent's
    /// copy of it once read; None in pins of an agent that had none.
    endpoint_filter: Option<(FilterMap, Option<FilterCopy>)>,
    /// The IPv6 maps; None when opened from the pins of an agent that
    /// had none.
    pub ipv6: Option<Maps6>,
}

/// The IPv6 maps (`lb_common::MAP_*6`), which `tc_from_pod6` reads and
/// writes, sized, pinned and grown with their IPv4 namesakes.
pub struct Maps6 {
    pub svc: ServiceMaps<Ipv6>,
    pub conntrack: HashMap<MapData, CtKey6, CtValue6>,
    pub affinity: HashMap<MapData, AffinityKey6, AffinityValue>,
    /// Native IPv6 sockets the socket hooks sent to a backend.
    pub sock_revnat: HashMap<MapData, SockRevNatKey6, SockRevNatValue6>,
}

type FilterMap = Array<MapData, FilterLine>;

/// Every line of ENDPOINT_FILTER `map`.
fn read_filter_lines(map: &FilterMap) -> Result<Vec<FilterLine>, aya::maps::MapError> {
    (0..map.len()).map(|i| map.get(&i, 0)).collect()
}

/// log2 of the bits of ENDPOINT_FILTER `map` (lines of 512 bits, a power of two).
fn filter_bits_log2(map: &FilterMap) -> u32 {
    map.len().saturating_mul(FILTER_LINE_BITS).trailing_zeros()
}

/// What a sweep of ENDPOINT_FILTER did.
#[derive(Debug, Default)]
pub struct FilterSweep {
    /// Conntrack entries read (0: no bit was unneeded, none were read).
    pub flows_scanned: usize,
    /// Lines written: bits cleared, or wanted bits set again.
    pub lines_written: usize,
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl Maps {
    fn take(ebpf: &mut Ebpf, maglev_table_size: u32) -> Result<Self, DatapathError> {
        let (svc, svc6) = (ServiceMaps::take(ebpf, IPV4_MAPS)?, ServiceMaps::take(ebpf, IPV6_MAPS)?);
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.to_owned() } })
        };
        Ok(Self {
            svc,
            conntrack: HashMap::try_from(take(MAP_CONNTRACK)?).map_err(map_err(MAP_CONNTRACK))?,
            affinity: HashMap::try_from(take(MAP_AFFINITY)?).map_err(map_err(MAP_AFFINITY))?,
            sock_revnat: HashMap::try_from(take(MAP_SOCK_REVNAT)?).map_err(map_err(MAP_SOCK_REVNAT))?,
            maglev_table_size: Some(maglev_table_size),
            counters: PerCpuArray::try_from(take(MAP_COUNTERS)?).map_err(map_err(MAP_COUNTERS))?,
            flow_seed: Array::try_from(take(MAP_FLOW_SEED)?).map_err(map_err(MAP_FLOW_SEED))?,
            node_ports: Some(Array::try_from(take(MAP_NODE_PORTS)?).map_err(map_err(MAP_NODE_PORTS))?),
            endpoint_filter: Some((
                Array::try_from(take(MAP_ENDPOINT_FILTER)?).map_err(map_err(MAP_ENDPOINT_FILTER))?,
                None,
            )),
            ipv6: Some(Maps6 {
                conntrack: HashMap::try_from(take(MAP_CONNTRACK6)?).map_err(map_err(MAP_CONNTRACK6))?,
                affinity: HashMap::try_from(take(MAP_AFFINITY6)?).map_err(map_err(MAP_AFFINITY6))?,
                sock_revnat: HashMap::try_from(take(MAP_SOCK_REVNAT6)?).map_err(map_err(MAP_SOCK_REVNAT6))?,
                svc: svc6,
            }),
        })
    }

    /// The Maglev frontends these maps have room for: one per table of
    /// MAGLEV but the spare (`MaglevConfig::map_tables`). Maps adopted from
    /// pins keep the size they were made with, whatever the flags say now.
    pub fn maglev_capacity(&self) -> Option<MaglevConfig> {
        let table_size = self.maglev_table_size.filter(|size| *size > 0)?;
        Some(MaglevConfig { table_size, tables: (self.svc.maglev_len() / table_size).saturating_sub(1) })
    }

    /// Opens the maps an agent pinned under `pin_path`, for inspection.
    /// They cannot write Maglev tables (see `maglev_table_size`).
    pub fn open_pinned(pin_path: &Path) -> Result<Self, DatapathError> {
        let open = |name: &'static str| MapData::from_pin(pin_path.join(name)).map_err(map_err(name));
        let open6 = || -> Result<Maps6, DatapathError> {
            Ok(Maps6 {
                svc: ServiceMaps::open_pinned(pin_path, IPV6_MAPS)?,
                conntrack: HashMap::try_from(Map::LruHashMap(open(MAP_CONNTRACK6)?))
                    .map_err(map_err(MAP_CONNTRACK6))?,
                affinity: HashMap::try_from(Map::LruHashMap(open(MAP_AFFINITY6)?)).map_err(map_err(MAP_AFFINITY6))?,
                sock_revnat: HashMap::try_from(Map::LruHashMap(open(MAP_SOCK_REVNAT6)?))
                    .map_err(map_err(MAP_SOCK_REVNAT6))?,
            })
        };
        Ok(Self {
            svc: ServiceMaps::open_pinned(pin_path, IPV4_MAPS)?,
            conntrack: HashMap::try_from(Map::LruHashMap(open(MAP_CONNTRACK)?)).map_err(map_err(MAP_CONNTRACK))?,
            affinity: HashMap::try_from(Map::LruHashMap(open(MAP_AFFINITY)?)).map_err(map_err(MAP_AFFINITY))?,
            sock_revnat: HashMap::try_from(Map::LruHashMap(open(MAP_SOCK_REVNAT)?))
                .map_err(map_err(MAP_SOCK_REVNAT))?,
            maglev_table_size: None,
            counters: PerCpuArray::try_from(Map::PerCpuArray(open(MAP_COUNTERS)?)).map_err(map_err(MAP_COUNTERS))?,
            flow_seed: Array::try_from(Map::Array(open(MAP_FLOW_SEED)?)).map_err(map_err(MAP_FLOW_SEED))?,
            node_ports: open(MAP_NODE_PORTS).ok().and_then(|map| Array::try_from(Map::Array(map)).ok()),
            endpoint_filter: open(MAP_ENDPOINT_FILTER)
                .ok()
                .and_then(|map| Array::try_from(Map::Array(map)).ok())
                .map(|map| (map, None)),
            ipv6: open6().ok(),
        })
    }

    /// The `NODE_PORT_*` bits of every port that has some.
    pub fn node_ports(&self) -> Result<BTreeMap<u16, u8>, DatapathError> {
        self.node_ports_at(0..=u16::MAX)
    }

    /// What NODE_PORTS holds at `ports` (ports without bits left out).
    pub fn node_ports_at(&self, ports: impl Iterator<Item = u16>) -> Result<BTreeMap<u16, u8>, DatapathError> {
        let Some(map) = &self.node_ports else { return Ok(BTreeMap::new()) };
        let mut held = BTreeMap::new();
        for port in ports {
            let bits = map.get(&u32::from(port), 0).map_err(map_err(MAP_NODE_PORTS))?;
            if bits != 0 {
                held.insert(port, bits);
            }
        }
        Ok(held)
    }

    /// Brings NODE_PORTS from `before` (what it holds) to `after`.
    pub fn write_node_ports(
        &mut self,
        before: &BTreeMap<u16, u8>,
        after: &BTreeMap<u16, u8>,
    ) -> Result<(), DatapathError> {
        let Some(map) = &mut self.node_ports else { return Ok(()) };
        let ports = before.keys().chain(after.keys()).collect::<std::collections::BTreeSet<_>>();
        for port in ports {
            let bits = after.get(port).copied().unwrap_or(0);
            if before.get(port).copied().unwrap_or(0) != bits {
                map.set(u32::from(*port), bits, 0).map_err(map_err(MAP_NODE_PORTS))?;
            }
        }
        Ok(())
    }

    /// The agent's copy of ENDPOINT_FILTER, read from the map the first
    /// time it is needed; None without the map.
    fn filter_copy(&mut self) -> Result<Option<(&mut FilterMap, &mut FilterCopy)>, aya::maps::MapError> {
        let Some((map, copy)) = &mut self.endpoint_filter else { return Ok(None) };
        if copy.is_none() {
            *copy = Some(FilterCopy::new(read_filter_lines(map)?, filter_bits_log2(map)));
        }
        Ok(copy.as_mut().map(|copy| (map, copy)))
    }

    /// Sets the ENDPOINT_FILTER bits of these endpoints (side, address,
    /// port: `lb_common::filter_bit`'s arguments), of either family: for
    /// writers of maps other than the agent's own (the datapath tests'
    /// IPv6 entries).
    pub fn set_endpoint_filter<A: lb_common::Address>(
        &mut self,
        endpoints: impl IntoIterator<Item = (u8, A, [u8; 2])>,
    ) -> Result<(), DatapathError> {
        let Some((map, _)) = &self.endpoint_filter else { return Ok(()) };
        let bits_log2 = filter_bits_log2(map);
        let bits: Vec<u32> = endpoints
            .into_iter()
            .map(|(side, addr, port)| lb_common::filter_bit(side, addr, port, bits_log2))
            .collect();
        self.set_filter_bits(bits).map_err(map_err(MAP_ENDPOINT_FILTER))
    }

    /// Sets `bits` in ENDPOINT_FILTER (those not set already).
    fn set_filter_bits(&mut self, bits: impl IntoIterator<Item = u32>) -> Result<(), aya::maps::MapError> {
        let Some((_, copy)) = self.filter_copy()? else { return Ok(()) };
        let lines = copy.set_all(bits);
        self.write_filter_lines(&lines)
    }

    /// Writes `lines` the copy now holds to ENDPOINT_FILTER. After a
    /// failed write the copy is dropped, to be read afresh from the map:
    /// otherwise it would hold bits the map lacks, and never write them.
    fn write_filter_lines(&mut self, lines: &[(u32, FilterLine)]) -> Result<(), aya::maps::MapError> {
        let Some((map, copy)) = &mut self.endpoint_filter else { return Ok(()) };
        for (line, value) in lines {
            if let Err(e) = map.set(*line, *value, 0) {
                *copy = None;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Fills ENDPOINT_FILTER for `contents` (the maps' entries, of both
    /// families) and every live conntrack entry, at start: the map may be
    /// new (an upgrade from an agent without it), and traffic must not skip
    /// flows it lacks.
    pub fn fill_endpoint_filter(
        &mut self,
        contents: &MapContents,
        contents6: &MapContents<Ipv6>,
    ) -> Result<(), DatapathError> {
        let Some(bits) = self.endpoint_filter.as_ref().map(|(map, _)| filter_bits_log2(map)) else { return Ok(()) };
        let (live, _) = self.live_flow_bits(bits)?;
        let wanted = filter::wanted(contents, bits).into_iter().chain(filter::wanted(contents6, bits));
        self.set_filter_bits(wanted.chain(live)).map_err(map_err(MAP_ENDPOINT_FILTER))
    }

    /// Clears the ENDPOINT_FILTER bits that neither `contents` (the maps'
    /// entries, of both families) nor any live conntrack entry has needed
    /// for two sweeps (`FilterCopy::sweep`). Conntrack is read only when
    /// some set bit is not one the contents need.
    pub fn sweep_endpoint_filter(
        &mut self,
        contents: &MapContents,
        contents6: &MapContents<Ipv6>,
    ) -> Result<FilterSweep, DatapathError> {
        let (wanted, unneeded, bits) = match self.filter_copy().map_err(map_err(MAP_ENDPOINT_FILTER))? {
            None => return Ok(FilterSweep::default()),
            Some((_, copy)) => {
                let mut wanted = filter::wanted(contents, copy.bits_log2());
                wanted.extend(filter::wanted(contents6, copy.bits_log2()));
                let unneeded = copy.has_unneeded(&wanted);
                (wanted, unneeded, copy.bits_log2())
            }
        };
        let (live, flows_scanned) = if unneeded { self.live_flow_bits(bits)? } else { Default::default() };
        let Some((_, copy)) = self.filter_copy().map_err(map_err(MAP_ENDPOINT_FILTER))? else {
            return Ok(FilterSweep::default());
        };
        let lines = copy.sweep(&wanted, &live);
        self.write_filter_lines(&lines).map_err(map_err(MAP_ENDPOINT_FILTER))?;
        Ok(FilterSweep { flows_scanned, lines_written: lines.len() })
    }

    /// ENDPOINT_FILTER's bits set and bits in all, from the agent's copy.
    pub fn endpoint_filter_fill(&mut self) -> Option<(u64, u64)> {
        self.filter_copy().ok().flatten().map(|(_, copy)| copy.fill())
    }

    /// Writes line `line` of ENDPOINT_FILTER as given, behind the agent's
    /// back: for tests of what the programs do with a bit missing. The
    /// copy is read afresh when next needed.
    pub fn overwrite_filter_line(&mut self, line: u32, value: FilterLine) -> Result<(), DatapathError> {
        let Some((map, copy)) = &mut self.endpoint_filter else { return Ok(()) };
        *copy = None;
        map.set(line, value, 0).map_err(map_err(MAP_ENDPOINT_FILTER))
    }

    /// The ENDPOINT_FILTER bits the live conntrack entries (CONNTRACK and
    /// CONNTRACK6) need, and how many entries were read. An error if a
    /// whole table could not be read: a partial answer would clear bits
    /// live flows need.
    fn live_flow_bits(&self, bits_log2: u32) -> Result<(std::collections::HashSet<u32>, usize), DatapathError> {
        let entries = self.conntrack.iter().collect::<Result<Vec<_>, _>>().map_err(map_err(MAP_CONNTRACK))?;
        let entries6 = match &self.ipv6 {
            Some(ipv6) => ipv6.conntrack.iter().collect::<Result<Vec<_>, _>>().map_err(map_err(MAP_CONNTRACK6))?,
            None => Vec::new(),
        };
        // The clock is read after the scan, so that an entry refreshed
        // while it ran is stamped before `now` (the programs' coarse clock
        // never runs ahead of this one): read before, its age would wrap
        // to 2^64 and a busy flow would look dead. Ages wrap as in the
        // programs (`conntrack::now`).
        let now = crate::explain::MapLookups::<Ipv4>::now_ns(self);
        let live = |last_seen_ns: u64, timeout_ns: u64| now.wrapping_sub(last_seen_ns) < timeout_ns;
        let bits4 = entries
            .iter()
            .filter(|(key, value)| live(value.last_seen_ns, value.timeout_ns(key.protocol)))
            .filter_map(|(key, value)| filter::flow_bit(key, value, bits_log2));
        let bits6 = entries6
            .iter()
            .filter(|(key, value)| live(value.last_seen_ns, value.timeout_ns(key.protocol)))
            .filter_map(|(key, value)| filter::flow_bit(key, value, bits_log2));
        Ok((bits4.chain(bits6).collect(), entries.len() + entries6.len()))
    }

    /// What the IPv4 Service maps hold now.
    pub fn read_contents(&self) -> Result<MapContents, DatapathError> {
        self.svc.read_contents()
    }

    /// What the IPv6 Service maps hold now (nothing without them).
    pub fn read_contents6(&self) -> Result<MapContents<Ipv6>, DatapathError> {
        self.ipv6.as_ref().map_or(Ok(MapContents::default()), |ipv6| ipv6.svc.read_contents())
    }

    /// Packets and bytes per verdict, summed over CPUs, indexed as `counter`.
    pub fn counters(&self) -> Result<[TrafficCounter; counter::COUNT as usize], DatapathError> {
        let mut totals = [TrafficCounter::default(); counter::COUNT as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            let per_cpu = self.counters.get(&(index as u32), 0).map_err(map_err(MAP_COUNTERS))?;
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
        }
        Ok(totals)
    }

    /// Deletes affinity entries (AFFINITY and AFFINITY6) that no longer
    /// fit the contents of their family (see `plan::stale_affinity`);
    /// returns how many.
    pub fn prune_affinity(&mut self, contents: &MapContents, contents6: &MapContents<Ipv6>) -> usize {
        let mut pruned = prune_stale_affinity(&mut self.affinity, contents);
        if let Some(ipv6) = &mut self.ipv6 {
            pruned += prune_stale_affinity(&mut ipv6.affinity, contents6);
        }
        pruned
    }

    /// Deletes the conntrack entries (both directions) of UDP flows to
    /// `lost` (frontend, backend) pairs, so their next packet picks a live
    /// backend; returns how many flows.
    pub fn forget_udp_flows(&mut self, lost: &std::collections::BTreeSet<(ServiceKey, Backend)>) -> usize {
        forget_udp_flows_in(&mut self.conntrack, lost)
    }

    /// `forget_udp_flows` for IPv6 flows (CONNTRACK6).
    pub fn forget_udp_flows6(&mut self, lost: &std::collections::BTreeSet<(ServiceKey6, Backend6)>) -> usize {
        self.ipv6.as_mut().map_or(0, |ipv6| forget_udp_flows_in(&mut ipv6.conntrack, lost))
    }

    /// The seed of random selection the programs use.
    pub fn flow_seed(&self) -> Result<u32, DatapathError> {
        self.flow_seed.get(&0, 0).map_err(map_err(MAP_FLOW_SEED))
    }

    /// Draws the seed of random selection unless one is there already
    /// (adopted from a pin: a flow keeps its backend across agents).
    fn seed_flows(&mut self) -> Result<(), DatapathError> {
        if self.flow_seed()? != 0 {
            return Ok(());
        }
        let mut bytes = [0u8; 4];
        let drawn = fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes));
        drawn.map_err(DatapathError::Seed)?;
        // 0 means "not drawn yet".
        let seed = u32::from_ne_bytes(bytes).max(1);
        self.flow_seed.set(0, seed, 0).map_err(map_err(MAP_FLOW_SEED))
    }

    /// Copies every entry of `old`'s Service maps (both families; MAGLEV
    /// is shared) into these, unchanged.
    fn copy_agent_maps_from(&mut self, old: &Maps) -> Result<(), DatapathError> {
        self.svc.copy_from(&old.svc)?;
        if let (Some(new), Some(old)) = (&mut self.ipv6, &old.ipv6) {
            new.svc.copy_from(&old.svc)?;
        }
        Ok(())
    }

    /// Room in the Service maps, as the kernel made them (a pinned map
    /// keeps the size it was created with, whatever was asked since): the
    /// IPv4 maps', and the least of both families' once the IPv6 maps are
    /// awake (dormant, they are not sized for the cluster).
    pub fn capacity(&self) -> Result<Entries, DatapathError> {
        let capacity = self.svc.capacity()?;
        Ok(match &self.ipv6 {
            Some(ipv6) if self.ipv6_awake() => capacity.least(&ipv6.svc.capacity()?),
            _ => capacity,
        })
    }

    /// Whether the IPv6 maps are awake (`sizing::Ipv6Maps`). The mark is
    /// CONNTRACK6: a wake makes it as big as CONNTRACK. It is awake when
    /// bigger than a dormant one, or (a dormant one of 1024 entries beside
    /// a CONNTRACK no bigger) when it holds what CONNTRACK holds; so a
    /// CONNTRACK made bigger later (its pin removed) does not put awake
    /// maps back to sleep.
    pub fn ipv6_awake(&self) -> bool {
        let Some(ipv6) = &self.ipv6 else { return false };
        match (max_entries(&ipv6.conntrack, MAP_CONNTRACK6), max_entries(&self.conntrack, MAP_CONNTRACK)) {
            (Ok(six), Ok(four)) => six > IPV6_DORMANT_ENTRIES || six >= four,
            _ => false,
        }
    }

    /// Whether the IPv6 maps hold nothing a flow or the agent put there:
    /// what waking them (making CONNTRACK6, AFFINITY6, SOCK_REVNAT6 and
    /// MAGLEV6 anew) needs.
    fn ipv6_empty(&self) -> bool {
        self.ipv6.as_ref().is_none_or(|ipv6| {
            ipv6.conntrack.keys().next().is_none()
                && ipv6.svc.services.keys().next().is_none()
                && ipv6.affinity.keys().next().is_none()
                && ipv6.sock_revnat.keys().next().is_none()
        })
    }

    /// Every map's name and size as the kernel has it.
    pub fn capacities(&self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        let mut capacities = self.svc.capacities()?.to_vec();
        capacities.extend([
            (MAP_CONNTRACK, max_entries(&self.conntrack, MAP_CONNTRACK)?),
            (MAP_AFFINITY, max_entries(&self.affinity, MAP_AFFINITY)?),
            (MAP_SOCK_REVNAT, max_entries(&self.sock_revnat, MAP_SOCK_REVNAT)?),
        ]);
        if let Some(ipv6) = &self.ipv6 {
            capacities.extend(ipv6.svc.capacities()?);
            capacities.extend([
                (MAP_CONNTRACK6, max_entries(&ipv6.conntrack, MAP_CONNTRACK6)?),
                (MAP_AFFINITY6, max_entries(&ipv6.affinity, MAP_AFFINITY6)?),
                (MAP_SOCK_REVNAT6, max_entries(&ipv6.sock_revnat, MAP_SOCK_REVNAT6)?),
            ]);
        }
        Ok(capacities)
    }

    /// Entries and capacity of every map but MAGLEV (an array, always
    /// full), counted by walking each: for `lb stats`, not a hot path.
    pub fn fill(&self) -> Result<Vec<crate::inspect::MapFill>, DatapathError> {
        let mut entries = self.svc.entries().to_vec();
        entries.extend(self.traffic_entries());
        if let Some(ipv6) = &self.ipv6 {
            entries.extend(ipv6.svc.entries());
        }
        let capacities = self.capacities()?;
        let mut fill: Vec<_> = entries
            .into_iter()
            .map(|(map, entries)| {
                let capacity = capacities.iter().find(|(name, _)| *name == map).map_or(0, |(_, c)| *c);
                crate::inspect::MapFill { map, entries, capacity }
            })
            .collect();
        // The filter's entries are its bits set, out of all its bits.
        if let Some((map, _)) = &self.endpoint_filter {
            let lines = read_filter_lines(map).map_err(map_err(MAP_ENDPOINT_FILTER))?;
            let (set, bits) = FilterCopy::new(lines, filter_bits_log2(map)).fill();
            let capacity = u32::try_from(bits).unwrap_or(u32::MAX);
            fill.push(crate::inspect::MapFill { map: MAP_ENDPOINT_FILTER, entries: set as usize, capacity });
        }
        Ok(fill)
    }

    /// Entries of the maps the datapath writes (CONNTRACK, AFFINITY,
    /// SOCK_REVNAT, and their IPv6 namesakes), counted by walking each.
    pub fn traffic_entries(&self) -> Vec<(&'static str, usize)> {
        let mut entries = vec![
            (MAP_CONNTRACK, self.conntrack.keys().filter(Result::is_ok).count()),
            (MAP_AFFINITY, self.affinity.keys().filter(Result::is_ok).count()),
            (MAP_SOCK_REVNAT, self.sock_revnat.keys().filter(Result::is_ok).count()),
        ];
        if let Some(ipv6) = &self.ipv6 {
            entries.push((MAP_CONNTRACK6, ipv6.conntrack.keys().filter(Result::is_ok).count()));
            entries.push((MAP_AFFINITY6, ipv6.affinity.keys().filter(Result::is_ok).count()));
            entries.push((MAP_SOCK_REVNAT6, ipv6.sock_revnat.keys().filter(Result::is_ok).count()));
        }
        entries
    }

    /// Both families' conntrack entries (two per flow).
    pub fn conntrack_entries(&self) -> usize {
        let ipv6 = self.ipv6.as_ref().map_or(0, |ipv6| ipv6.conntrack.keys().filter(Result::is_ok).count());
        self.conntrack.keys().filter(Result::is_ok).count() + ipv6
    }
}

/// Deletes the entries of `affinity` that no longer fit `contents` (see
/// `plan::stale_affinity`); returns how many.
fn prune_stale_affinity<A: Family + aya::Pod>(
    affinity: &mut HashMap<MapData, AffinityKey<A>, AffinityValue>,
    contents: &MapContents<A>,
) -> usize
where
    AffinityKey<A>: aya::Pod,
{
    let entries: Vec<_> = affinity.iter().filter_map(Result::ok).collect();
    let stale = stale_affinity(entries, contents);
    for key in &stale {
        // Gone already (LRU eviction) is as good as deleted.
        let _ = affinity.remove(key);
    }
    stale.len()
}

/// Deletes the entries (both directions) of UDP flows to `lost`
/// (frontend, backend) pairs from `conntrack`; returns how many flows.
fn forget_udp_flows_in<A: Family + aya::Pod, P: Copy + 'static>(
    conntrack: &mut HashMap<MapData, CtKey<A>, CtValue<A, P>>,
    lost: &std::collections::BTreeSet<(ServiceKey<A>, Backend<A>)>,
) -> usize
where
    CtKey<A>: aya::Pod,
    CtValue<A, P>: aya::Pod,
{
    let flows: Vec<(CtKey<A>, CtValue<A, P>)> = conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, value)| {
            key.protocol == lb_common::PROTO_UDP
                && value.is_forward()
                && lost.contains(&(
                    ServiceKey::new(key.daddr, key.dport, key.protocol, 0),
                    Backend::new(value.nat_addr, value.nat_port),
                ))
        })
        .collect();
    for (key, value) in &flows {
        // Already gone (LRU eviction) is as good as deleted.
        let _ = conntrack.remove(key);
        let _ = conntrack.remove(&value.peer_key(key));
    }
    flows.len()
}

/// The kernel's max_entries of a map.
fn max_entries<K: aya::Pod, V: aya::Pod>(
    map: &impl IterableMap<K, V>,
    name: &'static str,
) -> Result<u32, DatapathError> {
    Ok(map.map().info().map_err(map_err(name))?.max_entries())
}

/// A write the kernel refused because the map is full, said as what it is:
/// which map, what fills it, and which flag sizes it. Other errors keep
/// their errno in the message (aya's syscall error shows only the call).
fn explain_write_error<A: Address>(
    op: &MapOp<A>,
    names: ServiceMapNames,
    error: aya::maps::MapError,
) -> aya::maps::MapError {
    let aya::maps::MapError::SyscallError(syscall) = &error else { return error };
    let errno = syscall.io_error.raw_os_error();
    let sizing = match op {
        MapOp::PutService(..) => {
            Some((names.services, "a frontend plus one entry per backend of each", "services", "services"))
        }
        MapOp::PutAddr(..) => Some((names.service_addrs, "one entry per service address", "services", "services")),
        MapOp::PutBackend(..) => Some((names.backends, "one entry per distinct backend", "backends", "backends")),
        MapOp::PutSourceRange(..) => {
            Some((names.source_ranges, "one entry per source range", "source-ranges", "sourceRanges"))
        }
        _ => None,
    };
    let message = match sizing {
        // A full hash map refuses a new key with E2BIG; an LPM trie with ENOSPC.
        Some((map, holds, flag, value)) if matches!(errno, Some(libc::E2BIG | libc::ENOSPC)) => format!(
            "{map} is full (it holds {holds}): raise --{flag}-max-entries (chart: mapSizes.{value}); \
             a map pinned by an earlier agent keeps its size until its pin is removed"
        ),
        _ => format!("`{}`: {}", syscall.call, syscall.io_error),
    };
    aya::maps::MapError::IoError(io::Error::new(syscall.io_error.kind(), message))
}

impl MapWriter for Maps {
    type Error = aya::maps::MapError;

    fn write(&mut self, op: &MapOp) -> Result<(), aya::maps::MapError> {
        self.set_op_bit(op)?;
        self.svc.write(op, self.maglev_table_size).map_err(|e| explain_write_error(op, IPV4_MAPS, e))
    }
}

impl MapWriter<Ipv6> for Maps {
    type Error = aya::maps::MapError;

    fn write(&mut self, op: &MapOp<Ipv6>) -> Result<(), aya::maps::MapError> {
        self.set_op_bit(op)?;
        let table_size = self.maglev_table_size;
        let Some(ipv6) = &mut self.ipv6 else {
            let message = "the IPv6 maps are not open (pins of an agent that had none)";
            return Err(aya::maps::MapError::IoError(io::Error::new(io::ErrorKind::NotFound, message)));
        };
        ipv6.svc.write(op, table_size).map_err(|e| explain_write_error(op, IPV6_MAPS, e))
    }
}

impl Maps {
    /// Sets the ENDPOINT_FILTER bit `op` needs (of either family) before
    /// it is written: from the entry's first packet on, its flows' packets
    /// must not skip the full path.
    fn set_op_bit<A: Address>(&mut self, op: &MapOp<A>) -> Result<(), aya::maps::MapError> {
        let bits = self.endpoint_filter.as_ref().map(|(map, _)| filter_bits_log2(map));
        match bits.and_then(|bits| filter::bit_of_op(op, bits)) {
            Some(bit) => self.set_filter_bits([bit]),
            None => Ok(()),
        }
    }
}

impl<A: Family + aya::Pod> ServiceMaps<A>
where
    ServiceKey<A>: aya::Pod,
    Backend<A>: aya::Pod,
    SourceRangeKey<A>: aya::Pod,
{
    /// MAGLEV's entries as the kernel has them: a pinned map adopted keeps
    /// the size it was made with, while aya's `Array::len` says the size
    /// this object asked for.
    fn maglev_len(&self) -> u32 {
        max_entries(&self.maglev, self.names.maglev).unwrap_or_else(|_| self.maglev.len())
    }

    /// The maps named `names`, taken from a loaded object.
    fn take(ebpf: &mut Ebpf, names: ServiceMapNames) -> Result<Self, DatapathError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.to_owned() } })
        };
        Ok(Self {
            services: HashMap::try_from(take(names.services)?).map_err(map_err(names.services))?,
            backends: HashMap::try_from(take(names.backends)?).map_err(map_err(names.backends))?,
            service_addrs: HashMap::try_from(take(names.service_addrs)?).map_err(map_err(names.service_addrs))?,
            source_ranges: LpmTrie::try_from(take(names.source_ranges)?).map_err(map_err(names.source_ranges))?,
            maglev: Array::try_from(take(names.maglev)?).map_err(map_err(names.maglev))?,
            names,
        })
    }

    /// The maps named `names`, opened from their pins under `pin_path`.
    fn open_pinned(pin_path: &Path, names: ServiceMapNames) -> Result<Self, DatapathError> {
        let open = |name: &'static str| MapData::from_pin(pin_path.join(name)).map_err(map_err(name));
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(open(names.services)?)).map_err(map_err(names.services))?,
            backends: HashMap::try_from(Map::HashMap(open(names.backends)?)).map_err(map_err(names.backends))?,
            service_addrs: HashMap::try_from(Map::HashMap(open(names.service_addrs)?))
                .map_err(map_err(names.service_addrs))?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(open(names.source_ranges)?))
                .map_err(map_err(names.source_ranges))?,
            maglev: Array::try_from(Map::Array(open(names.maglev)?)).map_err(map_err(names.maglev))?,
            names,
        })
    }

    /// What the maps hold now (MAGLEV aside: tables follow from the
    /// frontends' backends).
    pub fn read_contents(&self) -> Result<MapContents<A>, DatapathError> {
        let names = self.names;
        let mut contents = MapContents::default();
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(map_err(names.services))?;
            contents.services.insert(k, v);
        }
        for entry in self.backends.iter() {
            let (k, v) = entry.map_err(map_err(names.backends))?;
            contents.backends.insert(k, v);
        }
        for entry in self.service_addrs.iter() {
            let (k, v) = entry.map_err(map_err(names.service_addrs))?;
            contents.addrs.insert(k, v);
        }
        for entry in self.source_ranges.iter() {
            let (k, _) = entry.map_err(map_err(names.source_ranges))?;
            contents.source_ranges.insert((k.prefix_len(), k.data()));
        }
        Ok(contents)
    }

    /// Copies every entry of `old` (but MAGLEV, which is shared) into
    /// these, unchanged.
    fn copy_from(&mut self, old: &Self) -> Result<(), DatapathError> {
        let names = self.names;
        for entry in old.services.iter() {
            let (k, v) = entry.map_err(map_err(names.services))?;
            self.services.insert(k, v, 0).map_err(map_err(names.services))?;
        }
        for entry in old.backends.iter() {
            let (k, v) = entry.map_err(map_err(names.backends))?;
            self.backends.insert(k, v, 0).map_err(map_err(names.backends))?;
        }
        for entry in old.service_addrs.iter() {
            let (k, v) = entry.map_err(map_err(names.service_addrs))?;
            self.service_addrs.insert(k, v, 0).map_err(map_err(names.service_addrs))?;
        }
        for entry in old.source_ranges.iter() {
            let (k, v) = entry.map_err(map_err(names.source_ranges))?;
            self.source_ranges.insert(&k, v, 0).map_err(map_err(names.source_ranges))?;
        }
        Ok(())
    }

    /// Room in the maps, as the kernel made them (a pinned map keeps the
    /// size it was created with, whatever was asked since).
    pub fn capacity(&self) -> Result<Entries, DatapathError> {
        let names = self.names;
        Ok(Entries {
            services: max_entries(&self.services, names.services)? as usize,
            service_addrs: max_entries(&self.service_addrs, names.service_addrs)? as usize,
            backends: max_entries(&self.backends, names.backends)? as usize,
            source_ranges: max_entries(&self.source_ranges, names.source_ranges)? as usize,
        })
    }

    /// Entries of each map but MAGLEV, counted by walking each.
    fn entries(&self) -> [(&'static str, usize); 4] {
        let names = self.names;
        [
            (names.services, self.services.keys().filter(Result::is_ok).count()),
            (names.service_addrs, self.service_addrs.keys().filter(Result::is_ok).count()),
            (names.backends, self.backends.keys().filter(Result::is_ok).count()),
            (names.source_ranges, self.source_ranges.keys().filter(Result::is_ok).count()),
        ]
    }

    /// Each map's name and size as the kernel has it.
    fn capacities(&self) -> Result<[(&'static str, u32); 5], DatapathError> {
        let names = self.names;
        Ok([
            (names.services, max_entries(&self.services, names.services)?),
            (names.service_addrs, max_entries(&self.service_addrs, names.service_addrs)?),
            (names.backends, max_entries(&self.backends, names.backends)?),
            (names.source_ranges, max_entries(&self.source_ranges, names.source_ranges)?),
            (names.maglev, max_entries(&self.maglev, names.maglev)?),
        ])
    }

    /// Writes `op`. Maglev tables need their size (`Maps::maglev_table_size`).
    fn write(&mut self, op: &MapOp<A>, maglev_table_size: Option<u32>) -> Result<(), aya::maps::MapError> {
        let maglev_name = self.names.maglev;
        let maglev_len = match op {
            MapOp::PutMaglevTable(..) | MapOp::PutMaglevEntries(..) => self.maglev_len(),
            _ => 0,
        };
        match op {
            MapOp::PutBackend(id, backend) => self.backends.insert(id, backend, 0),
            MapOp::PutService(key, value) => self.services.insert(key, value, 0),
            MapOp::DeleteService(key) => self.services.remove(key),
            MapOp::DeleteBackend(id) => self.backends.remove(id),
            MapOp::PutAddr(addr, frontends) => self.service_addrs.insert(addr, frontends, 0),
            MapOp::DeleteAddr(addr) => self.service_addrs.remove(addr),
            MapOp::PutSourceRange((prefix_len, data)) => self.source_ranges.insert(&Key::new(*prefix_len, *data), 1, 0),
            MapOp::DeleteSourceRange((prefix_len, data)) => self.source_ranges.remove(&Key::new(*prefix_len, *data)),
            MapOp::PutMaglevTable(table, entries) => {
                let refuse = |kind, message: String| Err(aya::maps::MapError::IoError(io::Error::new(kind, message)));
                let Some(size) = maglev_table_size else {
                    return refuse(
                        io::ErrorKind::Unsupported,
                        format!(
                            "{maglev_name}: maps opened from pins do not know the table size (a load-time global); \
                             table {table} not written"
                        ),
                    );
                };
                if entries.len() != size as usize {
                    return refuse(
                        io::ErrorKind::InvalidInput,
                        format!("{maglev_name}: table {table} has {} entries, not {size}", entries.len()),
                    );
                }
                // Tables are 1-based, and a table is written whole or not at all.
                let base = table.checked_sub(1).and_then(|t| t.checked_mul(size));
                let Some(base) = base.filter(|b| b.checked_add(size).is_some_and(|end| end <= maglev_len)) else {
                    return refuse(io::ErrorKind::InvalidInput, format!("{maglev_name}: no table {table}"));
                };
                for (backend_id, i) in entries.iter().zip(base..) {
                    self.maglev.set(i, backend_id, 0)?;
                }
                Ok(())
            }
            MapOp::PutMaglevEntries(table, entries) => {
                let refuse = |message: String| {
                    Err(aya::maps::MapError::IoError(io::Error::new(io::ErrorKind::InvalidInput, message)))
                };
                let Some(size) = maglev_table_size else {
                    return refuse(format!("{maglev_name}: maps opened from pins do not know the table size"));
                };
                let base = table.checked_sub(1).and_then(|t| t.checked_mul(size));
                let Some(base) = base.filter(|b| b.checked_add(size).is_some_and(|end| end <= maglev_len)) else {
                    return refuse(format!("{maglev_name}: no table {table}"));
                };
                for (i, backend_id) in entries {
                    if *i >= size {
                        return refuse(format!("{maglev_name}: table {table} has no entry {i}"));
                    }
                    self.maglev.set(base + i, backend_id, 0)?;
                }
                Ok(())
            }
        }
    }
}

/// The entries `lb explain` looks up one at a time in the IPv6 maps
/// (none where an older agent made no IPv6 maps); the rest as IPv4's.
impl crate::explain::MapLookups<Ipv6> for Maps {
    fn conntrack(&self, key: &CtKey6) -> Option<CtValue6> {
        self.ipv6.as_ref()?.conntrack.get(key, 0).ok()
    }

    fn affinity(&self, key: &AffinityKey6) -> Option<AffinityValue> {
        self.ipv6.as_ref()?.affinity.get(key, 0).ok()
    }

    fn maglev(&self, index: u32) -> Option<u32> {
        self.ipv6.as_ref()?.svc.maglev.get(&index, 0).ok()
    }

    fn flow_seed(&self) -> u32 {
        crate::explain::MapLookups::<Ipv4>::flow_seed(self)
    }

    fn endpoint_filter(&self, line: u32) -> Option<FilterLine> {
        crate::explain::MapLookups::<Ipv4>::endpoint_filter(self, line)
    }

    fn endpoint_filter_bits_log2(&self) -> u32 {
        crate::explain::MapLookups::<Ipv4>::endpoint_filter_bits_log2(self)
    }

    fn now_ns(&self) -> u64 {
        crate::explain::MapLookups::<Ipv4>::now_ns(self)
    }
}

/// The entries `lb explain` looks up one at a time, read from the maps.
impl crate::explain::MapLookups for Maps {
    fn conntrack(&self, key: &CtKey) -> Option<CtValue> {
        self.conntrack.get(key, 0).ok()
    }

    fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
        self.affinity.get(key, 0).ok()
    }

    fn maglev(&self, index: u32) -> Option<u32> {
        self.svc.maglev.get(&index, 0).ok()
    }

    fn flow_seed(&self) -> u32 {
        Maps::flow_seed(self).unwrap_or(0)
    }

    /// The programs' clock: CLOCK_MONOTONIC (bpf_ktime_get_coarse_ns).
    fn endpoint_filter(&self, line: u32) -> Option<FilterLine> {
        self.endpoint_filter.as_ref().and_then(|(map, _)| map.get(&line, 0).ok())
    }

    fn endpoint_filter_bits_log2(&self) -> u32 {
        self.endpoint_filter
            .as_ref()
            .map_or(lb_common::DEFAULT_ENDPOINT_FILTER_BITS_LOG2, |(map, _)| filter_bits_log2(map))
    }

    fn now_ns(&self) -> u64 {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `now` outlives the call, which only writes it.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        u64::try_from(now.tv_sec)
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0))
    }
}

/// Where on an interface a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// tc ingress (TCX) of a pod interface (`tc_from_pod`).
    Pod,
    /// tc ingress (TCX) of an external interface (`tc_from_wire`).
    WireTc,
    /// XDP of an external interface (`xdp_from_wire`).
    WireXdp,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::Pod, Hook::WireTc, Hook::WireXdp];

    /// Prefix of the link pins of this hook under links/.
    fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Pod => "if_",
            Hook::WireTc => "wire_",
            Hook::WireXdp => "xdp_",
        }
    }

    /// The program this hook runs.
    pub fn program(self) -> &'static str {
        match self {
            Hook::Pod => PROG_FROM_POD,
            Hook::WireTc => PROG_TC_FROM_WIRE,
            Hook::WireXdp => PROG_XDP_FROM_WIRE,
        }
    }

    pub fn is_external(self) -> bool {
        self != Hook::Pod
    }
}

/// A program attached to an interface, as its pinned link says.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    /// The interface's name, or `#<ifindex>` when it has none here.
    pub interface: String,
    pub program: &'static str,
}

/// The interface links pinned under `pin_path`/links, by hook and ifindex.
fn pinned_links(pin_path: &Path) -> Vec<(Hook, u32)> {
    fs::read_dir(pin_path.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Hook::ALL
                .into_iter()
                .find_map(|hook| Some((hook, name.strip_prefix(hook.pin_prefix())?.parse::<u32>().ok()?)))
        })
        .collect()
}

/// The programs attached through the links pinned under `pin_path`: what
/// an agent attached, whether or not one runs now.
pub fn pinned_attachments(pin_path: &Path) -> Vec<Attachment> {
    let mut out: Vec<(u32, Attachment)> = pinned_links(pin_path)
        .into_iter()
        .map(|(hook, index)| {
            let interface = crate::interfaces::name_of(index).unwrap_or_else(|| format!("#{index}"));
            (index, Attachment { interface, program: hook.program() })
        })
        .collect();
    out.sort_by_key(|(index, a)| (*index, a.program));
    out.into_iter().map(|(_, a)| a).collect()
}

/// The loaded datapath: programs and maps.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    pin_path: Option<PathBuf>,
    /// Interfaces a program is attached to, by hook and ifindex.
    attached: BTreeMap<(Hook, u32), String>,
    /// What the object was loaded with, for loading it again (`grow`).
    sizes: MapSizes,
    socket_netns: u64,
    /// The agent's network namespace (cookie): the bind hooks check its binds.
    host_netns: u64,
    /// Where the socket programs are attached, if they are.
    cgroup: Option<PathBuf>,
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE),
/// which the socket programs compare with `bpf_get_netns_cookie`.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call, which writes at most `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len) };
    let result = if rc == 0 { Ok(cookie) } else { Err(io::Error::last_os_error()) };
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    result
}

/// Runs a program load again when the verifier gave up with EAGAIN: it
/// does when a signal arrives for the loading thread mid-verification
/// (libbpf retries the same way, up to 5 times).
fn retry_interrupted(mut load: impl FnMut() -> Result<(), DatapathError>) -> Result<(), DatapathError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(DatapathError::Program(ProgramError::LoadError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < 5 =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The maps the agent writes and sizes for the cluster: `Datapath::grow`
/// replaces them with bigger ones. The others (traffic state written by
/// the programs, counters, and MAGLEV, whose size is a flag) are shared by
/// every program generation.
/// ENDPOINT_FILTER is sized with them, and filled afresh rather than copied.
/// Each family's maps are here: they are sized and grown together.
const GROWABLE_MAPS: [&str; 9] = [
    MAP_SERVICES,
    MAP_SERVICE_ADDRS,
    MAP_BACKENDS,
    MAP_SOURCE_RANGES,
    MAP_SERVICES6,
    MAP_SERVICE_ADDRS6,
    MAP_BACKENDS6,
    MAP_SOURCE_RANGES6,
    MAP_ENDPOINT_FILTER,
];
/// The tail-call arrays among them: an unpinned program array is emptied
/// when its last holder in userspace goes, which would stop IPv6 at the
/// packet hooks while the agent restarts; each generation points them at
/// its own IPv6 halves as it loads.
const SHARED_MAPS: [&str; 14] = [
    MAP_CONNTRACK,
    MAP_AFFINITY,
    MAP_MAGLEV,
    MAP_CONNTRACK6,
    MAP_AFFINITY6,
    MAP_MAGLEV6,
    MAP_SOCK_REVNAT6,
    MAP_SOCK_REVNAT,
    MAP_COUNTERS,
    MAP_FLOW_SEED,
    MAP_NODE_PORTS,
    MAP_TAIL_CALLS,
    MAP_WIRE_TAIL_CALLS,
    MAP_XDP_TAIL_CALLS,
];

/// The IPv6 traffic maps (shared otherwise) made anew when dormant IPv6
/// maps wake (`Datapath::grow`).
const WOKEN_MAPS: [&str; 4] = [MAP_CONNTRACK6, MAP_AFFINITY6, MAP_MAGLEV6, MAP_SOCK_REVNAT6];

/// The pin of a grown map until it replaces the live one (bpffs refuses
/// names with a dot).
fn next_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}_next"))
}

impl Datapath {
    /// Loads the eBPF object. With a pin path, maps already pinned there are
    /// adopted (contents kept), and the program is pinned anew. The socket
    /// programs translate sockets of the network namespace `socket_netns`
    /// (a cookie, see `netns_cookie`), or of every namespace when it is 0.
    pub fn load(pin_path: Option<&Path>, sizes: MapSizes, socket_netns: u64) -> Result<Self, DatapathError> {
        if let Some(dir) = pin_path {
            crate::mounts::ensure_bpffs(dir)?;
            for sub in [dir.to_owned(), dir.join("links")] {
                fs::create_dir_all(&sub).map_err(|source| DatapathError::PinDir { path: sub.clone(), source })?;
            }
            // Left by an agent stopped in the middle of `grow`: the live
            // pins are whole, these may not be.
            for name in GROWABLE_MAPS.into_iter().chain(WOKEN_MAPS) {
                let _ = fs::remove_file(next_pin(dir, name));
            }
        }
        let pins = pin_path.map(|dir| -> Vec<(&str, PathBuf)> {
            GROWABLE_MAPS.into_iter().chain(SHARED_MAPS).map(|name| (name, dir.join(name))).collect()
        });
        // Without it (no SO_NETNS_COOKIE) binds go unchecked.
        let host_netns = netns_cookie().unwrap_or(0);
        let mut ebpf = Self::load_object(sizes, socket_netns, host_netns, pins.unwrap_or_default())?;
        Self::point_tail_calls(&mut ebpf)?;
        if let Some(dir) = pin_path {
            Self::pin_programs(&mut ebpf, dir)?;
        }
        let mut maps = Maps::take(&mut ebpf, sizes.maglev.table_size)?;
        maps.seed_flows()?;
        Ok(Self {
            ebpf,
            maps,
            pin_path: pin_path.map(Path::to_owned),
            attached: BTreeMap::new(),
            sizes,
            socket_netns,
            host_netns,
            cgroup: None,
        })
    }

    /// The object with its maps sized and pinned (adopted where a pin
    /// exists) as given, and its programs loaded, not attached.
    fn load_object(
        sizes: MapSizes,
        socket_netns: u64,
        host_netns: u64,
        pins: Vec<(&str, PathBuf)>,
    ) -> Result<Ebpf, DatapathError> {
        // The filter's size is a global of the programs: an adopted pin's,
        // else the one that suits these sizes.
        let filter_pin = pins.iter().find(|(name, _)| *name == MAP_ENDPOINT_FILTER).map(|(_, path)| path);
        let filter_bits_log2 = filter_pin
            .and_then(|path| MapData::from_pin(path).ok())
            .and_then(|map| map.info().ok())
            .map(|info| info.max_entries().saturating_mul(FILTER_LINE_BITS).trailing_zeros())
            .unwrap_or_else(|| crate::sizing::endpoint_filter_bits_log2(&sizes));
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NotBuilt);
        }
        let ipv6 = |awake: u32| if sizes.ipv6 { awake } else { IPV6_DORMANT_ENTRIES };
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_SERVICES, sizes.services)
            .map_max_entries(MAP_SERVICE_ADDRS, sizes.services)
            .map_max_entries(MAP_SOURCE_RANGES, sizes.source_ranges)
            .map_max_entries(MAP_BACKENDS, sizes.backends)
            .map_max_entries(MAP_CONNTRACK, sizes.conntrack)
            .map_max_entries(MAP_AFFINITY, sizes.affinity)
            .map_max_entries(MAP_MAGLEV, sizes.maglev.map_tables().saturating_mul(sizes.maglev.table_size))
            .map_max_entries(MAP_ENDPOINT_FILTER, lb_common::filter_lines(filter_bits_log2))
            // Awake, each IPv6 map as big as its IPv4 namesake (one set of
            // sizes, grown together); dormant, small (`sizing::Ipv6Maps`).
            // Pinned ones keep their size.
            .map_max_entries(MAP_SERVICES6, ipv6(sizes.services))
            .map_max_entries(MAP_SERVICE_ADDRS6, ipv6(sizes.services))
            .map_max_entries(MAP_SOURCE_RANGES6, ipv6(sizes.source_ranges))
            .map_max_entries(MAP_BACKENDS6, ipv6(sizes.backends))
            .map_max_entries(MAP_CONNTRACK6, ipv6(sizes.conntrack))
            .map_max_entries(MAP_AFFINITY6, ipv6(sizes.affinity))
            .map_max_entries(MAP_SOCK_REVNAT6, ipv6(lb_common::DEFAULT_SOCK_REVNAT_MAX_ENTRIES))
            .map_max_entries(
                MAP_MAGLEV6,
                match sizes.ipv6 {
                    true => sizes.maglev.map_tables().saturating_mul(sizes.maglev.table_size),
                    false => sizes.maglev.table_size.saturating_mul(2),
                },
            )
            .override_global(GLOBAL_ENDPOINT_FILTER_BITS_LOG2, &filter_bits_log2, true)
            .override_global(GLOBAL_MAGLEV_TABLE_SIZE, &sizes.maglev.table_size, true)
            .override_global(GLOBAL_SOCKET_LB_NETNS, &socket_netns, true)
            .override_global(GLOBAL_HOST_NETNS, &host_netns, true);
        for (name, path) in pins {
            // A pin adopted keeps the size it was made with; the object is
            // told that size too, or aya's own bounds checks (an Array's
            // `set`, `len`) would go by the size asked for here.
            if let Some(info) = MapData::from_pin(&path).ok().and_then(|map| map.info().ok()) {
                loader.map_max_entries(name, info.max_entries());
            }
            loader.map_pin_path(name, path);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in PROGS_SOCK {
            retry_interrupted(|| Self::sock_program(&mut ebpf, name)?.load().map_err(Into::into))?;
        }
        for name in PROGS_SOCK_BIND {
            retry_interrupted(|| Self::bind_program(&mut ebpf, name)?.load().map_err(Into::into))?;
        }
        retry_interrupted(|| Self::tc_program_of(&mut ebpf, PROG_FROM_POD)?.load().map_err(Into::into))?;
        retry_interrupted(|| Self::tc_program_of(&mut ebpf, PROG_FROM_POD6)?.load().map_err(Into::into))?;
        retry_interrupted(|| Self::tc_program_of(&mut ebpf, PROG_FROM_WIRE6)?.load().map_err(Into::into))?;
        retry_interrupted(|| Self::tc_program_of(&mut ebpf, PROG_TC_FROM_WIRE)?.load().map_err(Into::into))?;
        for name in [PROG_XDP_FROM_WIRE, PROG_XDP_FROM_WIRE6] {
            retry_interrupted(|| Self::xdp_program_of(&mut ebpf, name)?.load().map_err(Into::into))?;
        }
        Ok(ebpf)
    }

    /// Points TAIL_CALLS, WIRE_TAIL_CALLS and XDP_TAIL_CALLS (pinned,
    /// shared by every generation) at this object's IPv6 halves:
    /// `tc_from_pod`, `tc_from_wire` and `xdp_from_wire` hand IPv6 frames
    /// to them by tail call. In `grow`, done after the commit, so that a
    /// generation that fails half-way never takes IPv6 from the live one;
    /// at load, before the rest of the setup, which shares its maps with
    /// the previous agent's (a load that then fails leaves the arrays at
    /// halves that read the same maps). Each array is tried: one that
    /// cannot be pointed leaves the others pointed, and is named.
    fn point_tail_calls(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
        let mut first_error = None;
        for (map, index, program) in [
            (MAP_TAIL_CALLS, TAIL_CALL_POD6, PROG_FROM_POD6),
            (MAP_WIRE_TAIL_CALLS, TAIL_CALL_WIRE6, PROG_FROM_WIRE6),
            (MAP_XDP_TAIL_CALLS, TAIL_CALL_WIRE6, PROG_XDP_FROM_WIRE6),
        ] {
            let pointed = (|| -> Result<(), DatapathError> {
                let program = ebpf.program(program).ok_or(ProgramError::NotLoaded)?;
                let fd = program.fd()?.try_clone().map_err(ProgramError::from)?;
                let array = ebpf.map_mut(map).ok_or(DatapathError::Map {
                    name: map,
                    source: aya::maps::MapError::InvalidName { name: map.to_owned() },
                })?;
                aya::maps::ProgramArray::try_from(array)
                    .and_then(|mut array| array.set(index, &fd, 0))
                    .map_err(map_err(map))
            })();
            if let Err(e) = pointed {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Pins the interface programs under `dir`, replacing the pins of an
    /// earlier generation (whose programs stay attached through their
    /// links until those are moved to these).
    fn pin_programs(ebpf: &mut Ebpf, dir: &Path) -> Result<(), DatapathError> {
        let pin = |path: PathBuf, result: &mut dyn FnMut(&Path) -> Result<(), aya::pin::PinError>| {
            let _ = fs::remove_file(&path);
            result(&path).map_err(|source| DatapathError::Pin { path, source })
        };
        for name in [PROG_FROM_POD, PROG_TC_FROM_WIRE] {
            let program = Self::tc_program_of(ebpf, name)?;
            pin(dir.join(name), &mut |p| program.pin(p))?;
        }
        let program = Self::xdp_program_of(ebpf, PROG_XDP_FROM_WIRE)?;
        pin(dir.join(PROG_XDP_FROM_WIRE), &mut |p| program.pin(p))
    }

    /// The sizes these maps were asked for (pinned maps adopted from an
    /// earlier agent may differ: `Maps::capacity` reads the kernel's).
    pub fn sizes(&self) -> MapSizes {
        self.sizes
    }

    /// Replaces SERVICES, SERVICE_ADDRS, BACKENDS and SOURCE_RANGES with
    /// maps of `sizes`, without a packet seeing a missing entry or a
    /// connection losing its state:
    /// 1. a second generation of the object is loaded whose agent maps are
    ///    new (pinned as `NAME_next`) and whose traffic maps (CONNTRACK,
    ///    AFFINITY, SOCK_REVNAT, COUNTERS), MAGLEV and FLOW_SEED are the
    ///    pinned ones;
    /// 2. the new maps get a copy of the old ones' entries (same backend
    ///    ids, slots and tables, so AFFINITY's backend ids stay right);
    /// 3. the new pins replace the old (`rename(2)`, atomic on bpffs): an
    ///    agent that dies from here on adopts the new maps;
    /// 4. every interface link pinned under links/ is moved to the new
    ///    programs (`attach_to_link`), as a restart moves them: until its
    ///    link moves, an interface's packets use the old maps, then the
    ///    new ones, which hold the same entries; the socket programs are
    ///    attached anew and their pins swapped, as at start.
    ///
    /// Needs a pin path (links and shared maps are found through pins).
    ///
    /// Returns what could not be moved (each said as what and why): those
    /// links keep the old generation's programs and maps, a consistent but
    /// frozen view, until the agent attaches them again.
    pub fn grow(&mut self, sizes: MapSizes) -> Result<Vec<String>, DatapathError> {
        let dir = self.pin_path.clone().ok_or(DatapathError::GrowWithoutPins)?;
        // Dormant IPv6 traffic maps woken are made anew too, at their IPv4
        // namesakes' sizes as the kernel has them (pinned maps keep the
        // size they were made with): they hold no flow to keep.
        // Never over live state: dormant maps the agent never wrote hold
        // none (a sync writes no IPv6 frontend into dormant maps), but a
        // check costs four lookups; maps that do hold some are an error,
        // said as such, not a reload that wakes nothing.
        let wake = sizes.ipv6 && !self.maps.ipv6_awake();
        if wake && !self.maps.ipv6_empty() {
            return Err(DatapathError::WakeOverState);
        }
        let mut sizes = sizes;
        if wake {
            sizes.conntrack = max_entries(&self.maps.conntrack, MAP_CONNTRACK)?;
            sizes.affinity = max_entries(&self.maps.affinity, MAP_AFFINITY)?;
            sizes.maglev = self.maps.maglev_capacity().unwrap_or(sizes.maglev);
        }
        let woken: &[&str] = if wake { &WOKEN_MAPS } else { &[] };
        let renewed: Vec<&str> = GROWABLE_MAPS.into_iter().chain(woken.iter().copied()).collect();
        for name in &renewed {
            let _ = fs::remove_file(next_pin(&dir, name));
        }
        let pins = renewed
            .iter()
            .map(|name| (*name, next_pin(&dir, name)))
            .chain(SHARED_MAPS.into_iter().filter(|name| !renewed.contains(name)).map(|name| (name, dir.join(name))))
            .collect();
        let mut ebpf = Self::load_object(sizes, self.socket_netns, self.host_netns, pins)?;
        let mut maps = Maps::take(&mut ebpf, sizes.maglev.table_size)?;
        maps.copy_agent_maps_from(&self.maps)?;
        // The new filter, of the new size, gets the bits of the copied
        // entries and of every live flow before any packet meets it.
        let (copied, copied6) = (maps.read_contents()?, maps.read_contents6()?);
        maps.fill_endpoint_filter(&copied, &copied6)?;
        // Up to here nothing live has changed (a failure leaves `_next`
        // pins, removed by the next attempt or start). The renames are
        // the last step that can fail before the agent moves to the new
        // maps; on bpffs, in one directory, they do not.
        for name in renewed {
            let (from, to) = (next_pin(&dir, name), dir.join(name));
            fs::rename(&from, &to).map_err(|source| DatapathError::Rename { path: to.clone(), source })?;
        }
        // The agent writes what the pins name from now on. The old
        // generation stays loaded until every link has moved.
        let old = std::mem::replace(&mut self.ebpf, ebpf);
        self.maps = maps;
        self.sizes = sizes;
        let mut unmoved = Vec::new();
        if let Err(e) = Self::point_tail_calls(&mut self.ebpf) {
            unmoved.push(format!("pointing the IPv6 tail call: {e}"));
        }
        if let Err(e) = Self::pin_programs(&mut self.ebpf, &dir) {
            unmoved.push(format!("pinning the programs: {e}"));
        }
        // Every link pinned under links/, not only those this agent made:
        // one left on the old generation would read maps nobody writes.
        for (hook, index) in pinned_links(&dir) {
            let Some(name) = self.attached.get(&(hook, index)).cloned().or_else(|| crate::interfaces::name_of(index))
            else {
                continue; // The interface is gone; its pin goes with `forget_vanished`.
            };
            if let Err(e) = self.attach(hook, &Interface { index, name: name.clone() }) {
                // Not attached as far as the agent knows: the next
                // interface poll attaches it again.
                self.attached.remove(&(hook, index));
                unmoved.push(format!("{name} ({}): {e}", hook.program()));
            }
        }
        if let Some(cgroup) = self.cgroup.clone()
            && let Err(e) = self.attach_cgroup(&cgroup)
        {
            unmoved.push(e.to_string());
        }
        drop(old);
        Ok(unmoved)
    }

    fn tc_program_of<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, DatapathError> {
        let program = ebpf.program_mut(name).ok_or(ProgramError::NotLoaded)?;
        Ok(program.try_into()?)
    }

    fn xdp_program_of<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, DatapathError> {
        let program = ebpf.program_mut(name).ok_or(ProgramError::NotLoaded)?;
        Ok(program.try_into()?)
    }

    fn sock_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr, DatapathError> {
        let program = ebpf.program_mut(name).ok_or(ProgramError::NotLoaded)?;
        Ok(program.try_into()?)
    }

    fn bind_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSock, DatapathError> {
        let program = ebpf.program_mut(name).ok_or(ProgramError::NotLoaded)?;
        Ok(program.try_into()?)
    }

    /// Attaches the socket programs to the cgroup at `path`: host sockets of
    /// processes in it (and below) connect straight to backends. A link a
    /// previous agent pinned is dropped only once the new one is attached;
    /// both use the same maps, and a socket the first program already sent
    /// to a backend is no service address to the second.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<(), DatapathError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::AttachCgroup {
            path: path.to_owned(),
            source,
        };
        let cgroup = fs::File::open(path).map_err(|e| err(Box::new(e)))?;
        // Attaches one program; with a pin path, its link is pinned, so it
        // outlives this agent. A cgroup BPF link is always one of many: its
        // flags must be 0.
        macro_rules! attach {
            ($program:expr, $name:expr) => {{
                let program = $program;
                let id = program.attach(&cgroup, CgroupAttachMode::Single).map_err(|e| err(Box::new(e)))?;
                if let Some(pin) = self.pin_path.as_ref().map(|dir| dir.join("links").join(format!("cgroup_{}", $name)))
                {
                    let link = program.take_link(id).map_err(|e| err(Box::new(e)))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| err(Box::new(e)))?;
                    let _ = fs::remove_file(&pin);
                    fd_link.pin(&pin).map_err(|source| DatapathError::Pin { path: pin.clone(), source })?;
                }
            }};
        }
        for name in PROGS_SOCK {
            attach!(Self::sock_program(&mut self.ebpf, name)?, name);
        }
        for name in PROGS_SOCK_BIND {
            attach!(Self::bind_program(&mut self.ebpf, name)?, name);
        }
        self.cgroup = Some(path.to_owned());
        Ok(())
    }

    /// Detaches the socket programs an earlier agent attached (their links
    /// live while pinned): socket-level balancing switched off.
    pub fn detach_cgroup(&mut self) -> usize {
        let Some(dir) = &self.pin_path else { return 0 };
        let links = fs::read_dir(dir.join("links")).into_iter().flatten().flatten();
        let pins: Vec<PathBuf> = links
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("cgroup_")))
            .collect();
        pins.iter().filter(|p| fs::remove_file(p).is_ok()).count()
    }

    /// The pod interfaces' tc program, for BPF_PROG_TEST_RUN.
    pub fn program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        Self::tc_program_of(&mut self.ebpf, PROG_FROM_POD)
    }

    /// The external interfaces' tc program, for BPF_PROG_TEST_RUN.
    pub fn tc_wire_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        Self::tc_program_of(&mut self.ebpf, PROG_TC_FROM_WIRE)
    }

    /// The XDP program, for BPF_PROG_TEST_RUN.
    pub fn xdp_program(&mut self) -> Result<&mut Xdp, DatapathError> {
        Self::xdp_program_of(&mut self.ebpf, PROG_XDP_FROM_WIRE)
    }

    fn link_pin(&self, hook: Hook, ifindex: u32) -> Option<PathBuf> {
        self.pin_path.as_ref().map(|dir| dir.join("links").join(format!("{}{ifindex}", hook.pin_prefix())))
    }

    /// Attaches the hook's program to `interface`, at tc ingress (TCX) or
    /// XDP. A link that a previous agent
    /// pinned for it is moved to this program atomically, so no packet
    /// passes untranslated.
    pub fn attach(&mut self, hook: Hook, interface: &Interface) -> Result<(), DatapathError> {
        let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            interface: interface.name.clone(),
            source,
        };
        let pin = self.link_pin(hook, interface.index);
        let old = pin.as_ref().and_then(|p| PinnedLink::from_pin(p).ok()).map(FdLink::from);
        // Moving fails when the link's interface is gone (a reused index).
        let fd_link = match hook {
            Hook::Pod | Hook::WireTc => {
                let program = Self::tc_program_of(&mut self.ebpf, hook.program())?;
                let adopted = old.and_then(|old| {
                    let link = SchedClassifierLink::try_from(old).ok()?;
                    program.attach_to_link(link).ok()
                });
                match adopted {
                    Some(_) => None,
                    None => {
                        let options = TcAttachOptions::TcxOrder(LinkOrder::default());
                        let id = program
                            .attach_with_options(&interface.name, TcAttachType::Ingress, options)
                            .map_err(|e| attach_err(Box::new(e)))?;
                        let link = program.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
                        Some(FdLink::try_from(link).map_err(|e| attach_err(Box::new(e)))?)
                    }
                }
            }
            Hook::WireXdp => {
                let program = Self::xdp_program_of(&mut self.ebpf, PROG_XDP_FROM_WIRE)?;
                let adopted = old.and_then(|old| {
                    let link = XdpLink::try_from(old).ok()?;
                    program.attach_to_link(link).ok()
                });
                match adopted {
                    Some(_) => None,
                    None => {
                        let id = program
                            .attach_to_if_index(interface.index, XdpMode::Default)
                            .map_err(|e| attach_err(Box::new(e)))?;
                        let link = program.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
                        Some(FdLink::try_from(link).map_err(|e| attach_err(Box::new(e)))?)
                    }
                }
            }
        };
        if let (Some(fd_link), Some(p)) = (fd_link, pin) {
            let _ = fs::remove_file(&p);
            // The pin keeps the link (and the attachment) alive.
            fd_link.pin(&p).map_err(|source| DatapathError::Pin { path: p.clone(), source })?;
        }
        self.attached.insert((hook, interface.index), interface.name.clone());
        Ok(())
    }

    pub fn is_attached(&self, hook: Hook, interface: &Interface) -> bool {
        self.attached.get(&(hook, interface.index)) == Some(&interface.name)
    }

    /// Detaches the hook's program from an interface that should no longer
    /// have it (an external interface no longer selected, or now served by
    /// the other external hook).
    /// Also removes such a link an earlier agent pinned. Returns whether
    /// there was one.
    pub fn detach(&mut self, hook: Hook, interface: &Interface) -> bool {
        let ours = self.attached.remove(&(hook, interface.index)).is_some();
        let pinned = self.link_pin(hook, interface.index).is_some_and(|p| fs::remove_file(p).is_ok());
        ours || pinned
    }

    /// Forgets interfaces that no longer exist and removes their link pins,
    /// including pins left by a previous agent.
    pub fn forget_vanished(&mut self, present: &[Interface]) -> Vec<String> {
        let alive: BTreeMap<u32, &str> = present.iter().map(|i| (i.index, i.name.as_str())).collect();
        let mut gone = Vec::new();
        self.attached.retain(|(_, index), name| {
            let keep = alive.get(index) == Some(&name.as_str());
            if !keep {
                gone.push(name.clone());
            }
            keep
        });
        if let Some(dir) = &self.pin_path {
            for entry in fs::read_dir(dir.join("links")).into_iter().flatten().flatten() {
                let name = entry.file_name();
                let index = name
                    .to_str()
                    .and_then(|n| Hook::ALL.into_iter().find_map(|hook| n.strip_prefix(hook.pin_prefix())));
                let Some(index) = index else { continue };
                if index.parse().ok().is_none_or(|i| !alive.contains_key(&i)) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        gone
    }
}

/// The minimal programs (the datapath's parsing, then pass, no lookups),
/// loaded on their own: the floor of the per-packet benchmarks, and a
/// stand-in for a NIC's receive path in test LANs built of veths.
pub struct Baseline {
    ebpf: Ebpf,
}

impl Baseline {
    pub fn load() -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NotBuilt);
        }
        let mut baseline = Self { ebpf: EbpfLoader::new().load(EBPF_OBJECT)? };
        retry_interrupted(|| baseline.xdp()?.load().map_err(Into::into))?;
        retry_interrupted(|| baseline.tc()?.load().map_err(Into::into))?;
        Ok(baseline)
    }

    pub fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        let program = self.ebpf.program_mut(PROG_XDP_BASELINE).ok_or(ProgramError::NotLoaded)?;
        Ok(program.try_into()?)
    }

    pub fn tc(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        let program = self.ebpf.program_mut(PROG_TC_BASELINE).ok_or(ProgramError::NotLoaded)?;
        Ok(program.try_into()?)
    }
}

#[cfg(test)]
mod tests {
    use super::{Attachment, pinned_attachments};

    #[test]
    fn link_pins_name_the_program_and_interface_they_attach() {
        let dir = std::env::temp_dir().join(format!("lb-pins-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("links")).unwrap();
        // Index 1 is loopback in every network namespace; 999999 is none.
        for pin in ["if_1", "wire_1", "xdp_999999", "cgroup_connect4", "if_x"] {
            std::fs::write(dir.join("links").join(pin), b"").unwrap();
        }
        let found = pinned_attachments(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let expected = [("lo", "tc_from_pod"), ("lo", "tc_from_wire"), ("#999999", "xdp_from_wire")]
            .map(|(interface, program)| Attachment { interface: interface.to_owned(), program });
        assert_eq!(found, expected);
    }
}
