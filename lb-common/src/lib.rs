//! Map layouts shared by the eBPF programs (lb-ebpf) and the agent (lb-userspace).
//!
//! Every map the datapath uses is described here once: its name, key, value,
//! default size, who writes it and who reads it. Addresses and ports are kept
//! as byte arrays in network order, exactly as they sit in a packet, so the
//! byte order is visible in the type and `bpftool map dump` prints them
//! readably (`"vip": [10,96,0,10]`, `"port": [0,80]`).
//!
//! Keys and values made of byte arrays are declared 4-byte aligned (their
//! sizes are multiples of 4, so the layout is the same): the eBPF programs
//! then build and copy them a word at a time instead of a byte at a time.
#![no_std]

/// SERVICES: `ServiceKey` → `ServiceValue`. Written by the agent, read by tc.
/// Slot 0 of a frontend holds its backend count; slots 1..=count hold the
/// backend ids, so one service is a handful of entries in one hash map.
pub const MAP_SERVICES: &str = "SERVICES";
/// BACKENDS: backend id (`u32`) → `Backend`. Written by the agent, read by tc.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// CONNTRACK: `CtKey` → `CtValue`, LRU. Written and read by tc; the agent
/// only reads it (inspection) and sizes it.
pub const MAP_CONNTRACK: &str = "CONNTRACK";
/// COUNTERS: `Counter` index (`u32`) → `TrafficCounter`, per CPU. Written by
/// tc, read by the agent.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// SERVICE_ADDRS: service address (`[u8; 4]`) → `ServiceAddr`. Written by
/// the agent, read by the hooks: only packets to these addresses pay for a
/// service lookup, and a packet to a cluster IP on a port no Service
/// defines is dropped, not routed on.
pub const MAP_SERVICE_ADDRS: &str = "SERVICE_ADDRS";
/// SOURCE_RANGES: LPM trie of `SourceRangeKey` → 1. A frontend flagged
/// `FRONTEND_SOURCE_RANGES` takes new flows only from clients inside one of
/// its prefixes (loadBalancerSourceRanges). Written by the agent.
pub const MAP_SOURCE_RANGES: &str = "SOURCE_RANGES";
pub const DEFAULT_SOURCE_RANGES_MAX_ENTRIES: u32 = 16_384;
/// MAGLEV: index → backend id, an array of `(tables + 1) × table size`
/// entries (one spare table, so a changed table is written before use).
/// Table t (1-based in `ServiceValue::maglev_table`) occupies entries
/// `(t-1)*size .. t*size`. Written by the agent (tables are computed in
/// userspace), read by tc for new flows of Maglev frontends.
pub const MAP_MAGLEV: &str = "MAGLEV";
/// The Maglev table size M, a load-time global of the eBPF object.
pub const GLOBAL_MAGLEV_TABLE_SIZE: &str = "MAGLEV_TABLE_SIZE";
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;
/// How many frontends can use Maglev by default (MAGLEV holds one more table).
pub const DEFAULT_MAGLEV_TABLES: u32 = 16;
/// AFFINITY: `AffinityKey` → `AffinityValue`, LRU. Session affinity
/// (ClientIP): written and read by tc on new flows; the agent deletes
/// entries whose backend left the service.
pub const MAP_AFFINITY: &str = "AFFINITY";

/// ENDPOINT_FILTER: a bitmap (`filter_lines` lines of `FilterLine`) of the endpoints service traffic goes to (frontends, and a
/// cluster IP on any port) and comes from (backends, which reply). A packet
/// whose destination and source both miss it can be neither a new flow to
/// a Service nor a packet of a translated flow, and passes after three
/// array reads instead of two hash lookups (CONNTRACK, SERVICE_ADDRS).
/// A Bloom filter with one hash function: a false positive only costs the
/// full path. The agent sets an endpoint's bit before writing the entry
/// that makes it one, and clears a bit only when no map entry and no live
/// conntrack entry needs it any more (`lb_model::filter`). Its size goes
/// with the agent's maps: `Datapath::grow` gives a new generation a new
/// filter, filled before its programs take traffic.
pub const MAP_ENDPOINT_FILTER: &str = "ENDPOINT_FILTER";
/// One entry of ENDPOINT_FILTER: 512 bits, a cache line.
pub type FilterLine = [u64; 8];
pub const FILTER_LINE_BITS: u32 = 512;
/// log2 of ENDPOINT_FILTER's bits, a load-time global the agent sets from
/// the sizes of SERVICES and BACKENDS (`sizing::endpoint_filter_bits_log2`:
/// 32 bits per entry they hold, so about 3 % of bits are set when full).
pub const GLOBAL_ENDPOINT_FILTER_BITS_LOG2: &str = "ENDPOINT_FILTER_BITS_LOG2";
/// The object's own size: 2^22 bits (512 KiB), for SERVICES and BACKENDS
/// of their default sizes.
pub const DEFAULT_ENDPOINT_FILTER_BITS_LOG2: u32 = 22;
pub const MIN_ENDPOINT_FILTER_BITS_LOG2: u32 = 20;
/// 2^28 bits: 32 MiB.
pub const MAX_ENDPOINT_FILTER_BITS_LOG2: u32 = 28;

/// ENDPOINT_FILTER's lines for 2^`bits_log2` bits.
pub const fn filter_lines(bits_log2: u32) -> u32 {
    (1 << clamp_filter_bits(bits_log2)) / FILTER_LINE_BITS
}

const fn clamp_filter_bits(bits_log2: u32) -> u32 {
    if bits_log2 < MIN_ENDPOINT_FILTER_BITS_LOG2 {
        MIN_ENDPOINT_FILTER_BITS_LOG2
    } else if bits_log2 > MAX_ENDPOINT_FILTER_BITS_LOG2 {
        MAX_ENDPOINT_FILTER_BITS_LOG2
    } else {
        bits_log2
    }
}
/// `filter_bit`'s side: where the endpoint is the packet's destination.
pub const FILTER_TO: u8 = 1;
/// `filter_bit`'s side: where the endpoint is the packet's source.
pub const FILTER_FROM: u8 = 2;
/// The port of a cluster IP's own bit: every port of it is the datapath's
/// (packets to ports no Service defines are dropped).
pub const FILTER_ANY_PORT: [u8; 2] = [0, 0];

/// The bit of `addr`:`port` on `side` in an ENDPOINT_FILTER of
/// 2^`bits_log2` bits: the same function in the kernel and in the agent.
/// Fibonacci hashing: one multiply, and the top bits are well mixed.
/// An IPv6 address is folded to a word first (`Address::fold_ne`).
#[inline(always)]
pub fn filter_bit<A: Address>(side: u8, addr: A, port: [u8; 2], bits_log2: u32) -> u32 {
    let key = addr.fold_ne() as u64 | (u16::from_ne_bytes(port) as u64) << 32 | (side as u64) << 48;
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - clamp_filter_bits(bits_log2))) as u32
}

/// Where bit `bit` of ENDPOINT_FILTER lies: line, word of the line, and
/// the mask within the word.
#[inline(always)]
pub const fn filter_position(bit: u32) -> (u32, usize, u64) {
    (bit / FILTER_LINE_BITS, ((bit / 64) % 8) as usize, 1 << (bit % 64))
}

/// The tc program attached to the host side of every pod interface.
pub const PROG_FROM_POD: &str = "tc_from_pod";
/// Its IPv6 half, which it tail-calls (`TAIL_CALL_POD6`): loaded, never
/// attached.
pub const PROG_FROM_POD6: &str = "tc_from_pod6";
/// TAIL_CALLS: a program array, index → program, filled by the agent at
/// load and pinned (an unpinned program array is emptied by the kernel
/// when its last holder in userspace goes, which would stop IPv6 while
/// the agent restarts).
pub const MAP_TAIL_CALLS: &str = "TAIL_CALLS";
pub const TAIL_CALLS_ENTRIES: u32 = 1;
/// TAIL_CALLS' entry of `tc_from_pod6`.
pub const TAIL_CALL_POD6: u32 = 0;
/// `tc_from_wire`'s IPv6 half, which it tail-calls through
/// WIRE_TAIL_CALLS (a program array of its own: the pinned TAIL_CALLS of
/// an earlier agent has room for one program): loaded, never attached.
pub const PROG_FROM_WIRE6: &str = "tc_from_wire6";
pub const MAP_WIRE_TAIL_CALLS: &str = "WIRE_TAIL_CALLS";
/// WIRE_TAIL_CALLS' entry of `tc_from_wire6`, and XDP_TAIL_CALLS' of
/// `xdp_from_wire6`.
pub const TAIL_CALL_WIRE6: u32 = 0;
/// `xdp_from_wire`'s IPv6 half, which it tail-calls through
/// XDP_TAIL_CALLS (XDP's own: a program array holds programs of one type):
/// loaded, never attached.
pub const PROG_XDP_FROM_WIRE6: &str = "xdp_from_wire6";
pub const MAP_XDP_TAIL_CALLS: &str = "XDP_TAIL_CALLS";
/// The IPv6 maps: the layouts of their IPv4 namesakes with IPv6 addresses
/// (`ServiceKey6`, `Backend6`, `CtKey6`/`CtValue6`, `AffinityKey6`,
/// `SourceRangeKey<Ipv6>`, and `Ipv6` for SERVICE_ADDRS6), the same roles.
pub const MAP_SERVICES6: &str = "SERVICES6";
pub const MAP_BACKENDS6: &str = "BACKENDS6";
pub const MAP_SERVICE_ADDRS6: &str = "SERVICE_ADDRS6";
pub const MAP_CONNTRACK6: &str = "CONNTRACK6";
pub const MAP_AFFINITY6: &str = "AFFINITY6";
pub const MAP_MAGLEV6: &str = "MAGLEV6";
pub const MAP_SOURCE_RANGES6: &str = "SOURCE_RANGES6";
/// The IPv6 maps' size (MAGLEV6's: two tables) while they are dormant: the
/// agent makes them so and wakes them (at their IPv4 namesakes' sizes)
/// the first time a sync has IPv6 frontends, so an IPv4-only cluster pays
/// no memory for IPv6 (at full size they would double the maps' memory:
/// CONNTRACK6 alone is some 90 MiB at the defaults on a 4 GiB node).
pub const IPV6_DORMANT_ENTRIES: u32 = 1024;
/// The programs of the node's external interfaces: NodePort, LoadBalancer
/// and ExternalIP traffic, and replies coming back to the node. One of the
/// two per interface (`--external-datapath`): at tc ingress (any
/// interface), or XDP (drivers that run it natively).
pub const PROG_TC_FROM_WIRE: &str = "tc_from_wire";
pub const PROG_XDP_FROM_WIRE: &str = "xdp_from_wire";
/// The minimal XDP and tc programs: the same header parsing, then pass,
/// with no lookups. The benchmarks' floor; never attached by the agent.
pub const PROG_XDP_BASELINE: &str = "xdp_baseline";
pub const PROG_TC_BASELINE: &str = "tc_baseline";
/// The cgroup programs that balance sockets (connect and sendmsg pick a
/// backend; recvmsg and getpeername show the service), for AF_INET sockets
/// and AF_INET6 sockets using v4-mapped addresses.
pub const PROGS_SOCK: [&str; 8] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_getpeername6",
];
/// FLOW_SEED: one `u32` (index 0), the seed of the "random" backend
/// choice: the slot is a function of the flow's hash and this seed
/// (`random_slot`), so a packet whose conntrack entry was lost (evicted
/// from a full table, or a race with a restart) goes to the backend its
/// flow already has, while clients cannot tell which backend a 5-tuple
/// gets. Drawn at random by the first agent of a boot and pinned, so every
/// later agent and program generation of the boot uses the same one.
pub const MAP_FLOW_SEED: &str = "FLOW_SEED";

/// The cgroup programs that refuse a host process's bind to a port a
/// NodePort serves on this node (the bind fails with EADDRINUSE instead of
/// the process silently never getting its traffic), for AF_INET and
/// AF_INET6 sockets.
pub const PROGS_SOCK_BIND: [&str; 2] = ["sock_post_bind4", "sock_post_bind6"];

/// NODE_PORTS: an array indexed by port of `NODE_PORT_*` bits, written by
/// the agent after each sync from the NodePort frontends: which ports a
/// NodePort serves, for the bind hooks' wildcard binds.
pub const MAP_NODE_PORTS: &str = "NODE_PORTS";
pub const NODE_PORTS_ENTRIES: u32 = 65_536;
pub const NODE_PORT_TCP: u8 = 1;
pub const NODE_PORT_UDP: u8 = 2;
/// The same, for NodePorts on IPv6 node addresses: an IPv4 wildcard bind
/// (`0.0.0.0`) collides with the IPv4 bits only, an IPv6 one (`::`, which
/// takes IPv4 too) with all.
pub const NODE_PORT_TCP6: u8 = 4;
pub const NODE_PORT_UDP6: u8 = 8;

/// The host network namespace (cookie) whose binds the bind hooks check,
/// a load-time global; 0 checks none.
pub const GLOBAL_HOST_NETNS: &str = "HOST_NETNS";

/// The network namespace (cookie) whose sockets the socket programs
/// translate, a load-time global; 0 translates every namespace's
/// (`--socket-lb all`).
pub const GLOBAL_SOCKET_LB_NETNS: &str = "SOCKET_LB_NETNS";

/// SOCK_REVNAT: `SockRevNatKey` → `SockRevNatValue`, LRU. Written by the
/// connect4/sendmsg4 programs, read by recvmsg4/getpeername4.
pub const MAP_SOCK_REVNAT: &str = "SOCK_REVNAT";
/// SOCK_REVNAT6: the same for native IPv6 sockets (connect6, sendmsg6;
/// recvmsg6, getpeername6).
pub const MAP_SOCK_REVNAT6: &str = "SOCK_REVNAT6";
pub const DEFAULT_SOCK_REVNAT_MAX_ENTRIES: u32 = 65_536;

pub const DEFAULT_SERVICES_MAX_ENTRIES: u32 = 65_536;
pub const DEFAULT_BACKENDS_MAX_ENTRIES: u32 = 65_536;
/// The object's own CONNTRACK size (tests, benchmarks); the agent sizes it
/// from the node's memory (`lb_userspace::sizing::conntrack_entries`).
pub const DEFAULT_CONNTRACK_MAX_ENTRIES: u32 = 131_072;
pub const DEFAULT_AFFINITY_MAX_ENTRIES: u32 = 65_536;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IPv4 address, network order: the address type of the IPv4 maps.
pub type Ipv4 = [u8; 4];
/// An IPv6 address: its 16 bytes in network order, held as four words
/// (each `u32::from_ne_bytes` of a quarter), the address type of the `*6`
/// maps. As words, the programs move an address in four loads and keep it
/// in four stack slots, not sixteen: byte arrays of this size spilled a
/// byte per slot and overflowed the verifier's 512-byte stack.
pub type Ipv6 = [u32; 4];

/// An IPv6 address's bytes as an `Ipv6`.
pub const fn ipv6(bytes: [u8; 16]) -> Ipv6 {
    let b = bytes;
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// An `Ipv6`'s bytes, network order.
pub const fn ipv6_octets(addr: Ipv6) -> [u8; 16] {
    let w = [addr[0].to_ne_bytes(), addr[1].to_ne_bytes(), addr[2].to_ne_bytes(), addr[3].to_ne_bytes()];
    [
        w[0][0], w[0][1], w[0][2], w[0][3], w[1][0], w[1][1], w[1][2], w[1][3], w[2][0], w[2][1], w[2][2], w[2][3],
        w[3][0], w[3][1], w[3][2], w[3][3],
    ]
}

/// What differs between the families in the keys and values the maps
/// share the layout of. Every map with an address in its key or value
/// comes in two: the IPv4 one (`SERVICES`, keyed by `ServiceKey`, which
/// is `ServiceKey<Ipv4>`) and the IPv6 one (`SERVICES6`, keyed by
/// `ServiceKey6`). The IPv4 layouts are the ones they always were, so
/// IPv4 pays nothing for IPv6 (ARCHITECTURE.md, "Two families").
pub trait Address: Copy + Eq + Ord + core::hash::Hash + core::fmt::Debug + Default {
    /// What `AffinityKey::client` holds: an address of this family or a
    /// cookie.
    type Client: Copy + Eq + Ord + core::hash::Hash + core::fmt::Debug + Default;
    /// The source a pod sees on a connection it made to itself through a
    /// Service (`HAIRPIN_ADDR`, `HAIRPIN_ADDR6`).
    const HAIRPIN: Self;
    /// The address as an affinity client.
    fn client(self) -> Self::Client;
    /// A cookie (network namespace, socket) as an affinity client.
    fn cookie_client(cookie: u64) -> Self::Client;
    /// The address folded to one word (big-endian words XORed), the input
    /// of `flow_hash`: an IPv4 address is its own word.
    fn fold_be(&self) -> u32;
    /// The address folded to one word of its bytes as they lie in memory,
    /// the input of `filter_bit`.
    fn fold_ne(&self) -> u32;
    /// The sum of the address's 16-bit words as they lie in memory, not
    /// folded, and the sum of their complements: what replacing it adds
    /// to an Internet checksum is `old.sum16_complement() + new.sum16()`
    /// (RFC 1624, eqn. 3; byte order does not matter, RFC 1071).
    fn sum16(&self) -> u32;
    fn sum16_complement(&self) -> u32;
}

impl Address for Ipv4 {
    type Client = [u8; 8];
    const HAIRPIN: Self = HAIRPIN_ADDR;

    #[inline(always)]
    fn client(self) -> [u8; 8] {
        [self[0], self[1], self[2], self[3], 0, 0, 0, 0]
    }

    #[inline(always)]
    fn cookie_client(cookie: u64) -> [u8; 8] {
        cookie.to_ne_bytes()
    }

    #[inline(always)]
    fn fold_be(&self) -> u32 {
        u32::from_be_bytes(*self)
    }

    #[inline(always)]
    fn fold_ne(&self) -> u32 {
        u32::from_ne_bytes(*self)
    }

    #[inline(always)]
    fn sum16(&self) -> u32 {
        u16::from_ne_bytes([self[0], self[1]]) as u32 + u16::from_ne_bytes([self[2], self[3]]) as u32
    }

    #[inline(always)]
    fn sum16_complement(&self) -> u32 {
        !u16::from_ne_bytes([self[0], self[1]]) as u32 + !u16::from_ne_bytes([self[2], self[3]]) as u32
    }
}

impl Address for Ipv6 {
    type Client = Ipv6;
    const HAIRPIN: Self = HAIRPIN_ADDR6;

    #[inline(always)]
    fn client(self) -> Ipv6 {
        self
    }

    #[inline(always)]
    fn cookie_client(cookie: u64) -> Ipv6 {
        [cookie as u32, (cookie >> 32) as u32, 0, 0]
    }

    #[inline(always)]
    fn fold_be(&self) -> u32 {
        u32::from_be(self[0])
            ^ u32::from_be(self[1]).rotate_left(8)
            ^ u32::from_be(self[2]).rotate_left(16)
            ^ u32::from_be(self[3])
    }

    #[inline(always)]
    fn fold_ne(&self) -> u32 {
        self[0] ^ self[1].rotate_left(8) ^ self[2].rotate_left(16) ^ self[3]
    }

    #[inline(always)]
    fn sum16(&self) -> u32 {
        let mut sum = 0;
        let mut i = 0;
        while i < 4 {
            sum += (self[i] & 0xffff) + (self[i] >> 16);
            i += 1;
        }
        sum
    }

    #[inline(always)]
    fn sum16_complement(&self) -> u32 {
        let mut sum = 0;
        let mut i = 0;
        while i < 4 {
            sum += (!self[i] & 0xffff) + (!self[i] >> 16);
            i += 1;
        }
        sum
    }
}

/// One frontend slot: (VIP, port, protocol, slot).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A = Ipv4> {
    pub vip: A,
    pub port: [u8; 2],
    /// 0 for the frontend's own entry, 1..=backend_count for its backends.
    pub slot: u16,
    pub protocol: u8,
    /// `SCOPE_*`: which clients this view of the frontend is for.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// `ServiceKey::scope`: the frontend as every client sees it, unless the
/// frontend has two scopes.
pub const SCOPE_EXTERNAL: u8 = 0;
/// `ServiceKey::scope`: the frontend as clients inside the cluster (pods,
/// the node itself) see it, when its `FRONTEND_TWO_SCOPES` flag says so.
pub const SCOPE_INTERNAL: u8 = 1;

/// SERVICES6's key.
pub type ServiceKey6 = ServiceKey<Ipv6>;

impl<A: Copy> ServiceKey<A> {
    pub const fn new(vip: A, port: [u8; 2], protocol: u8, slot: u16) -> Self {
        Self { vip, port, slot, protocol, scope: SCOPE_EXTERNAL, _pad: [0; 2] }
    }

    pub const fn with_slot(&self, slot: u16) -> Self {
        Self { slot, ..*self }
    }

    pub const fn with_scope(&self, scope: u8) -> Self {
        Self { scope, ..*self }
    }
}

/// `ServiceValue::flags`: a NodePort, LoadBalancer or ExternalIP frontend.
/// A client outside the cluster reaches its backends on other nodes through
/// this node's address (SNAT), so that replies come back this way.
pub const FRONTEND_EXTERNAL: u8 = 1;
/// `ServiceValue::flags`: new flows only from clients in SOURCE_RANGES.
pub const FRONTEND_SOURCE_RANGES: u8 = 2;
/// `ServiceValue::flags`: with no backend, drop rather than refuse. A
/// traffic policy of Local on a node without local endpoints: the client
/// (or its load balancer) must time out and try a node that has some.
pub const FRONTEND_DROP_WHEN_EMPTY: u8 = 4;
/// `ServiceValue::flags`: clients inside the cluster get the backends of
/// the `SCOPE_INTERNAL` view of this frontend. An external traffic policy
/// of Local keeps external clients on this node's endpoints, while pods
/// and the node reaching the same address get the whole Service, as
/// kube-proxy short-circuits them.
pub const FRONTEND_TWO_SCOPES: u8 = 8;
/// `ServiceValue::flags`, for people (`lb services`), never read by the
/// datapath: why the frontend has fewer backends than its Service has
/// ready endpoints. A traffic policy of Local; topology hints naming this
/// node; topology hints naming this node's zone.
pub const FRONTEND_NARROWED_POLICY_LOCAL: u8 = 16;
pub const FRONTEND_NARROWED_NODE_HINTS: u8 = 32;
pub const FRONTEND_NARROWED_ZONE_HINTS: u8 = 64;

/// Slot 0: `backend_count`, `flags`, `affinity_timeout_s` and
/// `maglev_table` are set, `backend_id` is 0. Slot n > 0: `backend_id` is
/// set, the rest is 0.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub backend_count: u16,
    /// `FRONTEND_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// Session affinity (ClientIP) timeout in seconds; 0 is no affinity.
    pub affinity_timeout_s: u32,
    /// 0: random selection; t > 0: Maglev table t of the MAGLEV map.
    pub maglev_table: u32,
}

impl ServiceValue {
    pub const fn frontend(backend_count: u16, flags: u8, affinity_timeout_s: u32, maglev_table: u32) -> Self {
        Self { backend_id: 0, backend_count, flags, _pad: 0, affinity_timeout_s, maglev_table }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self { backend_id, backend_count: 0, flags: 0, _pad: 0, affinity_timeout_s: 0, maglev_table: 0 }
    }
}

/// The hash of a flow that picks its Maglev entry: the same function in
/// the kernel and in userspace, so the agent (and tests) can tell which
/// backend a flow will hit. Changing it reshuffles flows on upgrade.
/// An IPv6 flow's addresses are folded to a word each first.
#[inline(always)]
pub fn flow_hash<A: Address>(key: &CtKey<A>) -> u32 {
    let words = [
        key.saddr.fold_be(),
        key.daddr.fold_be(),
        (u16::from_be_bytes(key.sport) as u32) << 16 | u16::from_be_bytes(key.dport) as u32,
        key.protocol as u32,
    ];
    // murmur3's 32-bit mixing over the four words, then its finaliser.
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < words.len() {
        let mut k = words[i].wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= 16;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The slot (1..=count) a frontend without session affinity or Maglev
/// gives the flow (or socket) with hash `hash`, under the per-boot `seed`
/// (`MAP_FLOW_SEED`); 0 when it has no slots. The seed goes through
/// murmur3's finaliser with the hash, so flows spread evenly over any
/// count and nearby hashes (one source port apart) land far apart.
pub const fn random_slot(hash: u32, seed: u32, count: u16) -> u16 {
    if count == 0 {
        return 0;
    }
    let mut h = hash ^ seed.rotate_left(16) ^ 0x5bd1_e995;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    (h % count as u32) as u16 + 1
}

/// A host socket (by cookie) sent to a backend in place of a service.
/// `P` pads it to a whole number of words (the cookie's 8 bytes): bytes
/// left implicit would be hashed uninitialised.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey<A = Ipv4, P = [u8; 2]> {
    pub cookie: u64,
    pub backend_addr: A,
    pub backend_port: [u8; 2],
    pub _pad: P,
}

/// The service address and port the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNatValue<A = Ipv4> {
    pub vip: A,
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// SOCK_REVNAT6's key and value: native IPv6 sockets (v4-mapped ones use
/// SOCK_REVNAT).
pub type SockRevNatKey6 = SockRevNatKey<Ipv6, [u8; 6]>;
pub type SockRevNatValue6 = SockRevNatValue<Ipv6>;

/// A client of a frontend, for session affinity, or a socket that keeps its
/// backend (unconnected UDP): what the AFFINITY map is keyed by.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey<A: Address = Ipv4> {
    pub vip: A,
    pub port: [u8; 2],
    pub protocol: u8,
    /// The `SCOPE_*` view of the frontend the backend was chosen from: an
    /// internal client's backend need not be one of the external view's.
    pub scope: u8,
    /// `AFFINITY_CLIENT_*`: what `client` holds.
    pub client_kind: u8,
    pub _pad: [u8; 7],
    /// An address (`Address::client`: an IPv4 one then 4 zero bytes), or
    /// a cookie in native order (then zero bytes).
    pub client: A::Client,
}

/// AFFINITY6's key.
pub type AffinityKey6 = AffinityKey<Ipv6>;

/// `AffinityKey::client_kind`: a client address, seen by the packet hooks
/// (kube-proxy's ClientIP).
pub const AFFINITY_CLIENT_ADDR: u8 = 0;
/// `AffinityKey::client_kind`: a network namespace cookie, seen by the
/// socket hooks: one pod, or the node's host-network processes.
pub const AFFINITY_CLIENT_NETNS: u8 = 1;
/// `AffinityKey::client_kind`: a socket cookie. An unconnected UDP socket
/// keeps the backend of its first datagram, as a packet-level flow keeps
/// its conntrack entry; held for the UDP conntrack timeout.
pub const AFFINITY_CLIENT_SOCKET: u8 = 2;

impl<A: Address> AffinityKey<A> {
    pub const fn new(frontend: &ServiceKey<A>, client_kind: u8, client: A::Client) -> Self {
        Self {
            vip: frontend.vip,
            port: frontend.port,
            protocol: frontend.protocol,
            scope: frontend.scope,
            client_kind,
            _pad: [0; 7],
            client,
        }
    }

    /// The client address of an `AFFINITY_CLIENT_ADDR` key.
    #[inline(always)]
    pub fn addr_client(addr: A) -> A::Client {
        addr.client()
    }

    /// The frontend view (slot 0) this client entry belongs to.
    pub const fn frontend(&self) -> ServiceKey<A> {
        ServiceKey::new(self.vip, self.port, self.protocol, 0).with_scope(self.scope)
    }

    /// Whether the entry is session affinity (the frontend's
    /// `affinity_timeout_s`), rather than a socket keeping its backend.
    pub const fn is_session_affinity(&self) -> bool {
        self.client_kind != AFFINITY_CLIENT_SOCKET
    }
}

/// The backend a client last got, and when (bpf_ktime_get_ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: [u8; 4],
}

/// `Backend::flags`: the endpoint runs on this node.
pub const BACKEND_LOCAL: u8 = 1;

/// A backend's address and target port.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend<A = Ipv4> {
    pub addr: A,
    pub port: [u8; 2],
    /// `BACKEND_*` bits.
    pub flags: u8,
    pub _pad: u8,
}

/// BACKENDS6's value.
pub type Backend6 = Backend<Ipv6>;

impl<A: Copy> Backend<A> {
    pub const fn new(addr: A, port: [u8; 2]) -> Self {
        Self { addr, port, flags: 0, _pad: 0 }
    }

    pub const fn with_flags(self, flags: u8) -> Self {
        Self { flags, ..self }
    }

    pub const fn is_local(&self) -> bool {
        self.flags & BACKEND_LOCAL != 0
    }
}

/// `ServiceAddr::flags`: a cluster IP and nothing else. A packet to it on
/// a port no Service defines is dropped; on node, load-balancer and
/// external addresses other ports belong to someone else and pass.
pub const ADDR_DROP_UNKNOWN_PORTS: u8 = 1;

/// What SERVICE_ADDRS says about one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceAddr {
    /// How many frontends (address, port, protocol) the address has.
    pub frontends: u16,
    /// `ADDR_*` bits.
    pub flags: u8,
    pub _pad: u8,
}

/// A frontend and a client prefix, the data of a SOURCE_RANGES key; the
/// LPM prefix length covers the frontend's 64 bits plus the client prefix.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey<A = Ipv4> {
    pub vip: A,
    pub port: [u8; 2],
    pub protocol: u8,
    pub _pad: u8,
    pub client: A,
}

/// Bits of a `SourceRangeKey` (IPv4) before the client address.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 64;

impl<A> SourceRangeKey<A> {
    /// Bits of the key before the client address: the frontend's.
    pub const FRONTEND_BITS: u32 = (core::mem::size_of::<A>() as u32 + 4) * 8;
}

/// A flow's 5-tuple as seen in the packet, before any rewrite.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey<A = Ipv4> {
    pub saddr: A,
    pub daddr: A,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// `CtValue::direction` of a client → service packet: rewrite the destination.
pub const CT_DIRECTION_DNAT: u8 = 1;
/// `CtValue::direction` of a backend → client reply: rewrite the source.
pub const CT_DIRECTION_REVERSE_SNAT: u8 = 2;
/// `CtValue::direction` of a client → service packet whose backend is the
/// client itself: rewrite the destination, and the source to `HAIRPIN_ADDR`.
pub const CT_DIRECTION_HAIRPIN: u8 = 3;
/// `CtValue::direction` of the reply of a hairpin flow (backend →
/// `HAIRPIN_ADDR`): rewrite the source to the service, the destination
/// address back to the client (the backend itself).
pub const CT_DIRECTION_HAIRPIN_REPLY: u8 = 4;

/// `CtValue::direction` of an external client → service packet whose backend
/// is on another node: rewrite the destination to the backend, and the
/// source to this node (`snat_addr`, `snat_port`), then send it on.
pub const CT_DIRECTION_SNAT: u8 = 5;
/// `CtValue::direction` of the reply of an SNAT flow (backend → this node):
/// rewrite the source to the service (`nat_*`), the destination to the
/// client (`snat_*`), then send it back to the client.
pub const CT_DIRECTION_SNAT_REPLY: u8 = 6;

/// The source a pod sees on a connection it made to itself through a
/// Service (Cilium's "service loopback" address). A packet from its own
/// address would be dropped as martian; one from here makes the pod reply
/// through its gateway, where the datapath turns it back.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];
/// The IPv6 hairpin source: a unique local address (RFC 4193) of our own,
/// `fd6c:6200:4242::1`. Not link-local, so the pod routes its reply through
/// its gateway (where the datapath turns it back), as it does for
/// `HAIRPIN_ADDR`, rather than looking for it on its own link.
pub const HAIRPIN_ADDR6: Ipv6 = ipv6([0xfd, 0x6c, 0x62, 0, 0x42, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01]);

/// CONNTRACK6's key.
pub type CtKey6 = CtKey<Ipv6>;

/// `CtValue::state`: created, no packet but the first seen yet.
pub const CT_STATE_NEW: u8 = 0;
/// `CtValue::state`: traffic beyond a TCP SYN seen (for UDP: any later packet).
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// `CtValue::state`: a TCP FIN or RST seen in either direction.
pub const CT_STATE_CLOSING: u8 = 2;

/// Idle time after which an entry counts as gone, by state and protocol.
/// kube-proxy's defaults where it has them (established TCP: 24 h).
pub mod ct_timeout {
    pub const NEW_NS: u64 = 60 * 1_000_000_000;
    pub const TCP_ESTABLISHED_NS: u64 = 24 * 3600 * 1_000_000_000;
    pub const UDP_ESTABLISHED_NS: u64 = 120 * 1_000_000_000;
    pub const CLOSING_NS: u64 = 10 * 1_000_000_000;
    /// `last_seen_ns` is refreshed at most this often, to keep per-packet
    /// writes to shared map values rare.
    pub const REFRESH_NS: u64 = 1_000_000_000;
}

/// The address and port a conntrack hit rewrites to. The reply entry holds
/// the VIP and port itself, so replies of open flows keep being translated
/// even after their Service is deleted.
/// `P` pads `last_seen_ns` and the end to their alignment: nothing for
/// IPv4 (whose layout is the one CONNTRACK always had), 4 bytes each for
/// IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue<A = Ipv4, P = [u8; 0]> {
    pub nat_addr: A,
    pub nat_port: [u8; 2],
    /// One of `CT_DIRECTION_*`; anything else is ignored.
    pub direction: u8,
    /// `CT_STATE_*`; an unknown value is treated as NEW.
    pub state: u8,
    pub _pad_to_u64: P,
    /// bpf_ktime_get_ns of the last packet (within `ct_timeout::REFRESH_NS`).
    pub last_seen_ns: u64,
    /// The second rewrite of SNAT flows (see `CT_DIRECTION_SNAT*`); zero
    /// for the other directions.
    pub snat_addr: A,
    pub snat_port: [u8; 2],
    pub _pad: [u8; 2],
    pub _pad_tail: P,
}

/// CONNTRACK6's value.
pub type CtValue6 = CtValue<Ipv6, [u8; 4]>;

impl<A: Address, P> CtValue<A, P> {
    /// The key of the flow's other direction, for the entry `self` at `key`.
    #[inline(always)]
    pub fn peer_key(&self, key: &CtKey<A>) -> CtKey<A> {
        let (saddr, sport, daddr, dport) = match self.direction {
            // client → VIP: the reply comes from the backend (the NAT target).
            CT_DIRECTION_DNAT => (self.nat_addr, self.nat_port, key.saddr, key.sport),
            CT_DIRECTION_HAIRPIN => (self.nat_addr, self.nat_port, A::HAIRPIN, key.sport),
            // backend → client: the request went from the client to the VIP.
            CT_DIRECTION_HAIRPIN_REPLY => (key.saddr, key.dport, self.nat_addr, self.nat_port),
            // client → frontend: the reply comes from the backend to this node.
            CT_DIRECTION_SNAT => (self.nat_addr, self.nat_port, self.snat_addr, self.snat_port),
            // backend → this node: the request went from the client to the frontend.
            CT_DIRECTION_SNAT_REPLY => (self.snat_addr, self.snat_port, self.nat_addr, self.nat_port),
            _ => (key.daddr, key.dport, self.nat_addr, self.nat_port),
        };
        CtKey { saddr, daddr, sport, dport, protocol: key.protocol, _pad: [0; 3] }
    }

    /// Whether this is the entry of a flow's client → service direction.
    pub const fn is_forward(&self) -> bool {
        matches!(self.direction, CT_DIRECTION_DNAT | CT_DIRECTION_HAIRPIN | CT_DIRECTION_SNAT)
    }

    /// Idle time after which this entry counts as gone.
    pub const fn timeout_ns(&self, protocol: u8) -> u64 {
        match self.state {
            CT_STATE_ESTABLISHED if protocol == PROTO_TCP => ct_timeout::TCP_ESTABLISHED_NS,
            CT_STATE_ESTABLISHED => ct_timeout::UDP_ESTABLISHED_NS,
            CT_STATE_CLOSING => ct_timeout::CLOSING_NS,
            _ => ct_timeout::NEW_NS,
        }
    }
}

/// Packets and bytes seen for one verdict, summed over CPUs by the reader.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// Index into COUNTERS. The kernel and the agent share these numbers, so a
/// verdict means the same thing on both sides.
pub mod counter {
    /// First packet of a flow to a service: backend selected, destination rewritten.
    pub const DNAT_NEW: u32 = 0;
    /// Later packet of a known flow: destination rewritten from conntrack.
    pub const DNAT_ESTABLISHED: u32 = 1;
    /// Reply from a backend: source rewritten back to the service address.
    pub const REVERSE_NAT: u32 = 2;
    /// Not for a service: passed untouched.
    pub const PASS: u32 = 3;
    /// Not IPv4 TCP/UDP, a non-first fragment, or too short to parse: passed untouched.
    pub const PASS_UNPARSED: u32 = 4;
    /// For a service with no ready backend: answered with ICMP port unreachable.
    pub const REJECT_NO_BACKEND: u32 = 5;
    /// Rewriting the packet failed in the kernel: dropped.
    pub const DROP_REWRITE_FAILED: u32 = 6;
    /// For a service address on a port no Service defines: dropped.
    pub const DROP_UNKNOWN_PORT: u32 = 7;
    /// From a client outside the frontend's loadBalancerSourceRanges: dropped.
    pub const DROP_SOURCE_RANGE: u32 = 8;
    /// For a traffic-policy-Local frontend without a local endpoint: dropped.
    pub const DROP_NO_LOCAL_BACKEND: u32 = 9;
    /// ICMP error (unreachable, fragmentation needed, time exceeded) about a
    /// translated flow: translated to match the packet its sender saw.
    pub const ICMP_ERROR_TRANSLATED: u32 = 10;

    /// New external flow to a backend on another node that could not be
    /// source-NATed (no route to the backend, or no free port): dropped,
    /// as netfilter drops a packet masquerade cannot translate.
    pub const DROP_SNAT_FAILED: u32 = 11;

    pub const COUNT: u32 = 12;

    /// Names for inspection and metrics, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "dnat_new",
        "dnat_established",
        "reverse_nat",
        "pass",
        "pass_unparsed",
        "reject_no_backend",
        "drop_rewrite_failed",
        "drop_unknown_port",
        "drop_source_range",
        "drop_no_local_backend",
        "icmp_error_translated",
        "drop_snat_failed",
    ];
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 12);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<AffinityKey>() == 24);
    assert!(core::mem::size_of::<SockRevNatKey>() == 16);
    assert!(core::mem::size_of::<SockRevNatValue>() == 8);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<Backend>() == 8);
    assert!(core::mem::size_of::<CtKey>() == 16);
    assert!(core::mem::size_of::<CtValue>() == 24);
    assert!(core::mem::size_of::<ServiceAddr>() == 4);
    assert!(core::mem::size_of::<SourceRangeKey>() == 12);
    assert!(core::mem::size_of::<TrafficCounter>() == 16);
    assert!(core::mem::size_of::<ServiceKey6>() == 24);
    assert!(core::mem::size_of::<Backend6>() == 20);
    assert!(core::mem::size_of::<CtKey6>() == 40);
    assert!(core::mem::size_of::<CtValue6>() == 56);
    assert!(core::mem::size_of::<AffinityKey6>() == 44);
    assert!(core::mem::size_of::<SourceRangeKey<Ipv6>>() == 36);
    assert!(core::mem::size_of::<SockRevNatKey6>() == 32);
    assert!(core::mem::size_of::<SockRevNatValue6>() == 20);
    assert!(SourceRangeKey::<Ipv4>::FRONTEND_BITS == SOURCE_RANGE_FRONTEND_BITS);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all are repr(C), made only of integers and byte arrays, with
    // every padding byte spelled out as a field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for TrafficCounter {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for ServiceAddr {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for CtValue6 {}
    unsafe impl aya::Pod for AffinityKey6 {}
    unsafe impl aya::Pod for SourceRangeKey<Ipv6> {}
    unsafe impl aya::Pod for SockRevNatKey6 {}
    unsafe impl aya::Pod for SockRevNatValue6 {}
}

#[cfg(test)]
mod tests {
    use super::{
        CtKey, DEFAULT_ENDPOINT_FILTER_BITS_LOG2, FILTER_FROM, FILTER_TO, filter_bit, filter_lines, filter_position,
        flow_hash, random_slot,
    };

    #[test]
    fn filter_bits_spread_and_differ_by_side_and_port() {
        let mut lines = [0u32; 64];
        let mut seen = 0;
        for host in 0..4096u32 {
            let addr = (0x0af4_0000 + host).to_be_bytes();
            let bits = DEFAULT_ENDPOINT_FILTER_BITS_LOG2;
            let (line, word, mask) = filter_position(filter_bit(FILTER_FROM, addr, 8080u16.to_be_bytes(), bits));
            assert!(line < filter_lines(bits) && word < 8 && mask.count_ones() == 1);
            lines[(line % 64) as usize] += 1;
            seen += 1;
        }
        // Neighbouring pod addresses land all over the bitmap.
        assert!(lines.iter().all(|n| n.abs_diff(seen / 64) < seen / 64 / 2), "{lines:?}");
        let (addr, bits) = ([10u8, 96, 0, 10], DEFAULT_ENDPOINT_FILTER_BITS_LOG2);
        assert_ne!(filter_bit(FILTER_TO, addr, [0, 80], bits), filter_bit(FILTER_FROM, addr, [0, 80], bits));
        assert_ne!(filter_bit(FILTER_TO, addr, [0, 80], bits), filter_bit(FILTER_TO, addr, [0, 81], bits));
        // Out-of-range sizes are clamped, never a shift past 63.
        assert!(filter_bit(FILTER_TO, addr, [0, 80], 0) < 1 << 20);
        assert!(filter_bit(FILTER_TO, addr, [0, 80], 99) < 1 << 28);
    }

    #[test]
    fn random_slot_spreads_flows_evenly_and_depends_on_the_seed() {
        assert_eq!(random_slot(12345, 1, 0), 0, "no slots, no slot");
        for count in [1u16, 2, 3, 4, 7, 100] {
            let mut hits = [0u32; 101];
            let flows = 20_000u32;
            for port in 0..flows {
                let key = CtKey {
                    saddr: [10u8, 244, 0, 20],
                    daddr: [10, 96, 0, 10],
                    sport: ((port % 60_000) as u16 + 1024).to_be_bytes(),
                    dport: 80u16.to_be_bytes(),
                    protocol: 6,
                    _pad: [0; 3],
                };
                let slot = random_slot(flow_hash(&key).wrapping_add(port / 60_000), 0xdead_beef, count);
                assert!((1..=count).contains(&slot));
                hits[slot as usize] += 1;
            }
            let fair = flows / u32::from(count);
            for (slot, got) in hits.iter().enumerate().take(count as usize + 1).skip(1) {
                assert!(got.abs_diff(fair) < fair / 5 + 20, "count {count}: slot {slot} got {got}");
            }
        }
        let differ = (0..1000u32).filter(|h| random_slot(*h, 1, 16) != random_slot(*h, 2, 16)).count();
        assert!(differ > 800, "another seed, another draw: {differ} of 1000 differ");
    }
}
