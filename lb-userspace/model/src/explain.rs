//! `lb explain`: which frontend a flow meets, which backend it gets and
//! why, from the maps as they are. The rules are the datapath's
//! (`lb-ebpf/src/classify.rs` and `lb.rs`, ARCHITECTURE.md's packet flow),
//! restated here over map contents: conntrack first, then the frontend and
//! the view this client gets, source ranges, refusal, then session
//! affinity, Maglev or the seeded "random" slot. The hash and the slot
//! draw are lb-common's, the very functions the programs run, so for a
//! flow with a known source port the answer is the backend the programs
//! will pick.
use std::net::{IpAddr, SocketAddr};

use lb_common::{
    ADDR_DROP_UNKNOWN_PORTS, AFFINITY_CLIENT_ADDR, AffinityKey, AffinityValue, CT_DIRECTION_DNAT, CT_DIRECTION_HAIRPIN,
    CT_DIRECTION_SNAT, CtKey, CtValue, FRONTEND_DROP_WHEN_EMPTY, FRONTEND_EXTERNAL, FRONTEND_SOURCE_RANGES,
    FRONTEND_TWO_SCOPES, SCOPE_INTERNAL, ServiceKey, SourceRangeKey, flow_hash, random_slot,
};
use serde::Serialize;

use crate::{family::Family, model::Protocol, plan::MapContents};

/// The flow asked about: a client and a service of one family (explained
/// over that family's maps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub client: IpAddr,
    /// The client's port; without it a new flow's backend depends on the
    /// port the client will pick, and the answer lists the candidates.
    pub client_port: Option<u16>,
    pub service: SocketAddr,
    pub protocol: Protocol,
}

/// Where the flow meets the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// A pod's packets (tc on its interface): a client inside the cluster.
    Pod,
    /// Packets from outside (tc or XDP on an external interface).
    Wire,
    /// A host process's socket (the cgroup hooks): inside the cluster; the
    /// backend is drawn from the socket's cookie, which no one outside the
    /// process knows.
    Socket,
}

/// What the maps hold beyond SERVICES, BACKENDS, SERVICE_ADDRS and
/// SOURCE_RANGES (`MapContents`): the entries looked up one at a time,
/// in family `A`'s maps (CONNTRACK6, AFFINITY6 and MAGLEV6 for IPv6).
pub trait MapLookups<A: Family = lb_common::Ipv4> {
    fn conntrack(&self, key: &CtKey<A>) -> Option<CtValue<A, A::CtPad>>;
    fn affinity(&self, key: &AffinityKey<A>) -> Option<AffinityValue>;
    /// Entry `index` of MAGLEV (MAGLEV6).
    fn maglev(&self, index: u32) -> Option<u32>;
    fn flow_seed(&self) -> u32;
    /// Line `line` of ENDPOINT_FILTER; None when it cannot be read (the
    /// programs then take the full path, as if the bit were set).
    fn endpoint_filter(&self, line: u32) -> Option<lb_common::FilterLine>;
    /// log2 of ENDPOINT_FILTER's bits.
    fn endpoint_filter_bits_log2(&self) -> u32;
    /// The datapath's clock (CLOCK_MONOTONIC, ns), for affinity's age.
    fn now_ns(&self) -> u64;
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub hook: Hook,
    /// The frontend met, as `address:port/protocol`, if any.
    pub frontend: Option<String>,
    /// For a frontend with two views (externalTrafficPolicy Local): the
    /// one this client gets, "internal" (from inside the cluster, the whole
    /// Service) or "external" (this node's endpoints).
    pub view: Option<&'static str>,
    pub verdict: Verdict,
    /// Why, in words.
    pub reason: String,
    /// The backend the flow goes to, when one is known.
    pub backend: Option<SocketAddr>,
    /// Without a client port: the backends a new flow may get.
    pub candidates: Vec<SocketAddr>,
    /// The rewrite of the flow's packets (or socket), when translated.
    pub rewrite: Option<String>,
    /// The source is rewritten to this node too (a client outside the
    /// cluster, a backend on another node).
    pub source_nat: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not a service address: the datapath leaves it alone.
    NotService,
    /// A cluster IP's port no Service defines: dropped.
    UnknownPort,
    /// Not from the frontend's loadBalancerSourceRanges: dropped.
    SourceRangeDenied,
    /// No endpoints: refused (ICMP port unreachable, or ECONNREFUSED).
    Refused,
    /// Traffic policy Local and none here: dropped.
    Dropped,
    /// An established flow: its conntrack entry decides.
    Established,
    /// A new flow, sent to a backend.
    New,
}

/// Explains `flow` at `hook` over family `A`'s maps.
pub fn explain<A: Family>(
    contents: &MapContents<A>,
    lookups: &dyn MapLookups<A>,
    maglev_table_size: u32,
    flow: Flow,
    hook: Hook,
) -> Explanation {
    let port = flow.service.port().to_be_bytes();
    let protocol = flow.protocol.number();
    let mut answer = Explanation {
        hook,
        frontend: None,
        view: None,
        verdict: Verdict::NotService,
        reason: String::new(),
        backend: None,
        candidates: Vec::new(),
        rewrite: None,
        source_nat: false,
    };
    let (Some(vip), Some(client)) = (A::of(flow.service.ip()), A::of(flow.client)) else {
        answer.reason = format!(
            "{} and {} are not both {}: explained over the {} maps",
            flow.client,
            flow.service.ip(),
            A::NAME,
            A::NAME
        );
        return answer;
    };
    let endpoint = |addr: A, port: [u8; 2]| SocketAddr::new(addr.ip(), u16::from_be_bytes(port));
    let ct_key = flow.client_port.map(|sport| CtKey {
        saddr: client,
        daddr: vip,
        sport: sport.to_be_bytes(),
        dport: port,
        protocol,
        _pad: [0; 3],
    });
    // The endpoint filter first, as the packet hooks have it: only a map
    // out of step with the others would rule out a service's flow.
    if hook != Hook::Socket
        && let Some(key) = ct_key
        && !crate::filter::lets_through(&key, lookups)
    {
        answer.reason = format!(
            "ENDPOINT_FILTER has no bit of {}:{} or {}:{}: passed without a lookup",
            flow.service.ip(),
            flow.service.port(),
            flow.client,
            u16::from_be_bytes(key.sport)
        );
        return answer;
    }
    // Then conntrack, as the packet hooks do (sockets have no entries).
    // An entry idle past its timeout is gone, though the LRU map still
    // holds it until evicted.
    if hook != Hook::Socket
        && let Some(entry) = ct_key.and_then(|key| lookups.conntrack(&key))
        && lookups.now_ns().wrapping_sub(entry.last_seen_ns) < entry.timeout_ns(protocol)
        && matches!(entry.direction, CT_DIRECTION_DNAT | CT_DIRECTION_SNAT | CT_DIRECTION_HAIRPIN)
    {
        let backend = endpoint(entry.nat_addr, entry.nat_port);
        answer.verdict = Verdict::Established;
        answer.backend = Some(backend);
        answer.frontend = Some(format!("{}/{}", flow.service, flow.protocol));
        answer.reason = "an established flow: its conntrack entry keeps its backend".into();
        answer.source_nat = entry.direction == CT_DIRECTION_SNAT;
        answer.rewrite = Some(rewrite(flow, backend, answer.source_nat));
        return answer;
    }
    let Some(addr) = contents.addrs.get(&vip) else {
        answer.reason = format!("{} is not a service address", flow.service.ip());
        return answer;
    };
    let mut key = ServiceKey::new(vip, port, protocol, 0);
    let Some(external) = contents.services.get(&key) else {
        let cluster_ip = addr.flags & ADDR_DROP_UNKNOWN_PORTS != 0;
        answer.verdict = match (cluster_ip, hook) {
            // A socket cannot be dropped: its connect is refused at once.
            (true, Hook::Socket) => Verdict::Refused,
            (true, _) => Verdict::UnknownPort,
            (false, _) => Verdict::NotService,
        };
        answer.reason = if cluster_ip {
            let fate = if hook == Hook::Socket { "refused" } else { "dropped" };
            format!("no Service defines port {}/{} on this cluster IP: {fate}", flow.service.port(), flow.protocol)
        } else {
            format!("no frontend at {}/{}: left to the node", flow.service, flow.protocol)
        };
        return answer;
    };
    answer.frontend = Some(format!("{}/{}", flow.service, flow.protocol));
    let internal_client = hook != Hook::Wire;
    let mut value = *external;
    if value.flags & FRONTEND_TWO_SCOPES != 0 {
        answer.view = Some("external");
    }
    if internal_client && value.flags & FRONTEND_TWO_SCOPES != 0 {
        let internal = key.with_scope(SCOPE_INTERNAL);
        if let Some(view) = contents.services.get(&internal) {
            (key, value) = (internal, *view);
            answer.view = Some("internal");
        }
    }
    // The socket hooks do not check source ranges (their clients are the
    // node's own processes).
    if hook != Hook::Socket && external.flags & FRONTEND_SOURCE_RANGES != 0 && !source_allowed(contents, &key, client) {
        answer.verdict = Verdict::SourceRangeDenied;
        answer.reason = format!("{} is outside the Service's loadBalancerSourceRanges: dropped", flow.client);
        return answer;
    }
    let slots = contents.slots_of(&key);
    let backends: Vec<SocketAddr> =
        slots.iter().filter_map(|id| contents.backends.get(id)).map(|b| endpoint(b.addr, b.port)).collect();
    if value.backend_count == 0 {
        // A socket is refused either way: it has no other node to try.
        let drop = value.flags & FRONTEND_DROP_WHEN_EMPTY != 0 && hook != Hook::Socket;
        answer.verdict = if drop { Verdict::Dropped } else { Verdict::Refused };
        answer.reason = if drop {
            "traffic policy Local and no endpoint on this node (other nodes have some): dropped".into()
        } else {
            "the Service has no endpoints: refused".into()
        };
        return answer;
    }
    answer.verdict = Verdict::New;
    // A client outside the cluster reaching a backend on another node
    // (the backend's own flag: one address may be a local backend of one
    // frontend and a remote one of another).
    let snat = |backend: &lb_common::Backend<A>| {
        hook == Hook::Wire && value.flags & FRONTEND_EXTERNAL != 0 && !backend.is_local()
    };
    // Session affinity: the backend remembered for this client, if used
    // within the timeout and still there.
    if value.affinity_timeout_s != 0 && hook != Hook::Socket {
        let affinity_key = AffinityKey::new(&key, AFFINITY_CLIENT_ADDR, AffinityKey::addr_client(client));
        let timeout_ns = u64::from(value.affinity_timeout_s) * 1_000_000_000;
        if let Some(entry) = lookups.affinity(&affinity_key)
            && lookups.now_ns().wrapping_sub(entry.last_used_ns) < timeout_ns
            && let Some(chosen) = contents.backends.get(&entry.backend_id)
        {
            let backend = endpoint(chosen.addr, chosen.port);
            let age_s = lookups.now_ns().wrapping_sub(entry.last_used_ns) / 1_000_000_000;
            answer.backend = Some(backend);
            answer.reason = format!(
                "session affinity (ClientIP, {} s): this client's backend, last used {age_s} s ago",
                value.affinity_timeout_s
            );
            answer.source_nat = snat(chosen);
            answer.rewrite = Some(rewrite(flow, backend, answer.source_nat));
            return answer;
        }
    }
    let Some(ct_key) = ct_key.filter(|_| hook != Hook::Socket) else {
        let by = if value.maglev_table != 0 { "Maglev" } else { "random" };
        let on = if hook == Hook::Socket { "the socket's cookie" } else { "the client's port" };
        answer.reason = format!("a new flow: one of {} backends, by {by} selection on {on}", backends.len());
        answer.candidates = backends;
        return answer;
    };
    let hash = flow_hash(&ct_key);
    let chosen = if value.maglev_table != 0 && maglev_table_size > 0 {
        let entry = hash % maglev_table_size;
        let index = (value.maglev_table - 1) * maglev_table_size + entry;
        let id = lookups.maglev(index);
        answer.reason = format!(
            "a new flow: Maglev table {} entry {entry} of {maglev_table_size} (flow hash {hash:#010x})",
            value.maglev_table
        );
        id.and_then(|id| contents.backends.get(&id))
    } else {
        let slot = random_slot(hash, lookups.flow_seed(), value.backend_count);
        answer.reason = format!(
            "a new flow: slot {slot} of {} drawn from the flow hash {hash:#010x} and this boot's seed (\"random\")",
            value.backend_count
        );
        slots.get(usize::from(slot).wrapping_sub(1)).and_then(|id| contents.backends.get(id))
    };
    let Some(chosen) = chosen else {
        answer.verdict = Verdict::Refused;
        answer.reason += ", which names no backend: refused";
        return answer;
    };
    let backend = endpoint(chosen.addr, chosen.port);
    answer.backend = Some(backend);
    answer.source_nat = snat(chosen);
    answer.rewrite = Some(rewrite(flow, backend, answer.source_nat));
    answer
}

/// Whether `client` is inside one of the frontend's source ranges (the
/// SOURCE_RANGES trie's longest-prefix match, over its entries).
fn source_allowed<A: Family>(contents: &MapContents<A>, frontend: &ServiceKey<A>, client: A) -> bool {
    let client = client.octets();
    contents.source_ranges.iter().any(|(prefix_len, range)| {
        let bits = prefix_len.saturating_sub(SourceRangeKey::<A>::FRONTEND_BITS) as usize;
        range.vip == frontend.vip
            && range.port == frontend.port
            && range.protocol == frontend.protocol
            && prefix_matches(&range.client.octets(), &client, bits)
    })
}

/// Whether the first `bits` bits of `a` and `b` (network order) agree.
fn prefix_matches(a: &[u8], b: &[u8], bits: usize) -> bool {
    let bits = bits.min(8 * a.len().min(b.len()));
    let (whole, rest) = (bits / 8, bits % 8);
    let mask = if rest == 0 { 0 } else { 0xffu8 << (8 - rest) };
    a[..whole] == b[..whole] && (rest == 0 || a[whole] & mask == b[whole] & mask)
}

fn rewrite(flow: Flow, backend: SocketAddr, snat: bool) -> String {
    let client = match flow.client_port {
        Some(port) => SocketAddr::new(flow.client, port).to_string(),
        None => flow.client.to_string(),
    };
    let source = if snat { " (source NAT to this node's address: the backend is on another node)" } else { "" };
    format!("{client} -> {} becomes {client} -> {backend}{source}", flow.service)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lb_common::{Backend, ServiceAddr, ServiceValue};

    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    #[derive(Default)]
    struct Lookups {
        conntrack: Vec<(CtKey, CtValue)>,
        affinity: BTreeMap<AffinityKey, AffinityValue>,
        maglev: Vec<u32>,
        now_ns: u64,
    }

    impl MapLookups for Lookups {
        fn conntrack(&self, key: &CtKey) -> Option<CtValue> {
            self.conntrack.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
        }
        fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
            self.affinity.get(key).copied()
        }
        fn maglev(&self, index: u32) -> Option<u32> {
            self.maglev.get(index as usize).copied()
        }
        fn flow_seed(&self) -> u32 {
            0x1234_5678
        }
        /// Every bit set: these tests are about what comes after the filter.
        fn endpoint_filter(&self, _: u32) -> Option<lb_common::FilterLine> {
            Some([u64::MAX; 8])
        }
        fn endpoint_filter_bits_log2(&self) -> u32 {
            lb_common::DEFAULT_ENDPOINT_FILTER_BITS_LOG2
        }
        fn now_ns(&self) -> u64 {
            self.now_ns
        }
    }

    const VIP: [u8; 4] = [10, 96, 0, 10];

    /// A frontend 10.96.0.10:80/TCP with backends 10.0.0.1..=n:8080.
    fn contents(n: u8, value: impl Fn(u16) -> ServiceValue) -> MapContents {
        let mut contents = MapContents::default();
        let key = ServiceKey::new(VIP, 80u16.to_be_bytes(), 6, 0);
        contents.services.insert(key, value(u16::from(n)));
        for i in 1..=n {
            contents.backends.insert(u32::from(i), Backend::new([10, 0, 0, i], 8080u16.to_be_bytes()));
            contents.services.insert(key.with_slot(u16::from(i)), ServiceValue::slot(u32::from(i)));
        }
        contents.addrs.insert(VIP, ServiceAddr { frontends: 1, flags: ADDR_DROP_UNKNOWN_PORTS, _pad: 0 });
        contents
    }

    /// The 5-tuple of `flow(Some(40000))`.
    fn flow_key() -> CtKey {
        CtKey {
            saddr: [10, 244, 1, 5],
            daddr: VIP,
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            protocol: 6,
            _pad: [0; 3],
        }
    }

    fn flow(port: Option<u16>) -> Flow {
        Flow {
            client: Ipv4Addr::new(10, 244, 1, 5).into(),
            client_port: port,
            service: SocketAddrV4::new(VIP.into(), 80).into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn source_range_prefixes_match_bit_by_bit_in_either_family() {
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert!(prefix_matches(&v6("2001:db8::"), &v6("2001:db8:ffff::1"), 32));
        assert!(!prefix_matches(&v6("2001:db8::"), &v6("2001:db9::1"), 32));
        assert!(prefix_matches(&v6("2001:db8::"), &v6("2001:db9::1"), 31), "the first 31 bits agree");
        assert!(prefix_matches(&[10, 0, 0, 0], &[10, 1, 2, 3], 8));
        assert!(!prefix_matches(&[10, 0, 0, 0], &[11, 0, 0, 0], 8));
        assert!(prefix_matches(&[10, 0, 0, 0], &[200, 0, 0, 0], 0), "a /0 takes everyone");
        assert!(prefix_matches(&[10, 1, 2, 3], &[10, 1, 2, 3], 99), "capped at the address");
    }

    #[test]
    fn a_new_flow_gets_the_slot_its_hash_draws_and_without_a_port_the_candidates() {
        let contents = contents(3, |n| ServiceValue::frontend(n, 0, 0, 0));
        let lookups = Lookups::default();
        let answer = explain(&contents, &lookups, 0, flow(Some(40000)), Hook::Pod);
        let key = flow_key();
        let slot = random_slot(flow_hash(&key), 0x1234_5678, 3);
        assert_eq!(answer.verdict, Verdict::New);
        assert_eq!(answer.backend, Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, slot as u8), 8080).into()));
        assert!(answer.reason.contains(&format!("slot {slot} of 3")), "{}", answer.reason);
        let any = explain(&contents, &lookups, 0, flow(None), Hook::Pod);
        assert_eq!((any.backend, any.candidates.len()), (None, 3));
    }

    #[test]
    fn conntrack_then_affinity_then_maglev_decide() {
        let mut lookups = Lookups { now_ns: 100_000_000_000, ..Default::default() };
        let key = flow_key();
        // Maglev table 1 of 7 entries, all naming backend 2.
        lookups.maglev = vec![2; 7];
        let maglev = contents(3, |n| ServiceValue::frontend(n, 0, 0, 1));
        let answer = explain(&maglev, &lookups, 7, flow(Some(40000)), Hook::Wire);
        assert_eq!(answer.backend, Some("10.0.0.2:8080".parse().unwrap()));
        assert!(answer.reason.starts_with("a new flow: Maglev table 1 entry"), "{}", answer.reason);

        // Affinity: remembered 30 s ago, within 60 s.
        let sticky = contents(3, |n| ServiceValue::frontend(n, 0, 60, 0));
        let frontend = ServiceKey::new(VIP, 80u16.to_be_bytes(), 6, 0);
        let client = AffinityKey::addr_client([10u8, 244, 1, 5]);
        lookups.affinity.insert(
            AffinityKey::new(&frontend, AFFINITY_CLIENT_ADDR, client),
            AffinityValue { last_used_ns: 70_000_000_000, backend_id: 3, _pad: [0; 4] },
        );
        let answer = explain(&sticky, &lookups, 7, flow(Some(40000)), Hook::Pod);
        assert_eq!(answer.backend, Some("10.0.0.3:8080".parse().unwrap()));
        assert!(answer.reason.contains("last used 30 s ago"), "{}", answer.reason);

        // An established flow: conntrack, whatever the rest says.
        let entry = CtValue {
            nat_addr: [10, 0, 0, 1],
            nat_port: 8080u16.to_be_bytes(),
            direction: CT_DIRECTION_DNAT,
            state: 0,
            last_seen_ns: 90_000_000_000,
            snat_addr: [0; 4],
            snat_port: [0; 2],
            _pad: [0; 2],
            ..Default::default()
        };
        lookups.conntrack.push((key, entry));
        let answer = explain(&sticky, &lookups, 7, flow(Some(40000)), Hook::Pod);
        assert_eq!((answer.verdict, answer.backend), (Verdict::Established, Some("10.0.0.1:8080".parse().unwrap())));
        // Idle past its timeout (NEW: 60 s), the entry no longer counts.
        lookups.now_ns = 151_000_000_000;
        assert_eq!(explain(&sticky, &lookups, 7, flow(Some(40000)), Hook::Pod).verdict, Verdict::New);
    }

    /// Regression (found by the differential test): one address can be a
    /// backend on this node for one frontend (Local policy) and a remote one
    /// for another; source NAT follows the chosen backend's own flag.
    #[test]
    fn source_nat_follows_the_chosen_backends_own_locality() {
        let mut contents = contents(1, |n| ServiceValue::frontend(n, FRONTEND_EXTERNAL, 0, 0));
        let local = Backend::new([10, 0, 0, 1], 8080u16.to_be_bytes()).with_flags(lb_common::BACKEND_LOCAL);
        contents.backends.insert(7, local);
        let lookups = Lookups::default();
        let remote = explain(&contents, &lookups, 0, flow(Some(40000)), Hook::Wire);
        assert_eq!((remote.backend, remote.source_nat), (Some("10.0.0.1:8080".parse().unwrap()), true));
        let key = ServiceKey::new(VIP, 80u16.to_be_bytes(), 6, 0);
        contents.services.insert(key.with_slot(1), ServiceValue::slot(7));
        let here = explain(&contents, &lookups, 0, flow(Some(40000)), Hook::Wire);
        assert_eq!((here.backend, here.source_nat), (Some("10.0.0.1:8080".parse().unwrap()), false));
        let from_a_pod = explain(&contents, &lookups, 0, flow(Some(40000)), Hook::Pod);
        assert!(!from_a_pod.source_nat, "clients inside the cluster are never source-NATed");
    }

    #[test]
    fn no_frontend_unknown_ports_and_empty_services_say_why() {
        let lookups = Lookups::default();
        let empty = contents(0, |_| ServiceValue::frontend(0, 0, 0, 0));
        assert_eq!(explain(&empty, &lookups, 0, flow(Some(1)), Hook::Pod).verdict, Verdict::Refused);
        let local = contents(0, |_| ServiceValue::frontend(0, FRONTEND_DROP_WHEN_EMPTY, 0, 0));
        assert_eq!(explain(&local, &lookups, 0, flow(Some(1)), Hook::Wire).verdict, Verdict::Dropped);
        assert_eq!(
            explain(&local, &lookups, 0, flow(None), Hook::Socket).verdict,
            Verdict::Refused,
            "sockets are refused"
        );
        let other_port = Flow { service: SocketAddrV4::new(VIP.into(), 81).into(), ..flow(Some(1)) };
        assert_eq!(explain(&empty, &lookups, 0, other_port, Hook::Pod).verdict, Verdict::UnknownPort);
        assert_eq!(explain(&empty, &lookups, 0, other_port, Hook::Socket).verdict, Verdict::Refused);
        let elsewhere = Flow { service: "10.96.9.9:80".parse().unwrap(), ..flow(Some(1)) };
        let answer = explain(&empty, &lookups, 0, elsewhere, Hook::Pod);
        assert_eq!((answer.verdict, answer.frontend), (Verdict::NotService, None));
    }
}
