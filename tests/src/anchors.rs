//! The benchmarks' anchors: the rulesets kube-proxy writes for N ClusterIP
//! Services (and NodePorts, iptables mode only), in its iptables mode (for
//! iptables-restore) and its nftables mode (for `nft -f`). kube-proxy cannot be installed here, so these
//! follow the shapes its source and documentation give:
//!
//! - iptables: `KUBE-SERVICES` holds one rule per service port, in order,
//!   jumping to a `KUBE-SVC-*` chain that marks off-cluster clients for
//!   masquerade and picks a `KUBE-SEP-*` endpoint chain with
//!   `statistic --mode random --probability 1/(n-i)`; the endpoint chain
//!   marks hairpin traffic and DNATs. `KUBE-POSTROUTING` masquerades
//!   marked packets.
//! - iptables, NodePorts (`externalTrafficPolicy: Cluster`, the default):
//!   `KUBE-SERVICES` ends with `-m addrtype --dst-type LOCAL -j
//!   KUBE-NODEPORTS` (every node address; kube-proxy's default with no
//!   `--nodeport-addresses`), which has one rule per node port jumping to
//!   a `KUBE-EXT-*` chain (the `KUBE-SVC-*` chain's suffix) that marks the
//!   packet for masquerade and goes on to the `KUBE-SVC-*` chain. Left
//!   out: the filter table's `KUBE-FORWARD`, `KUBE-NODEPORTS` and
//!   firewall chains, which only accept what a FORWARD policy of ACCEPT
//!   accepts anyway, drop conntrack-INVALID packets, or reject Services
//!   with no endpoints.
//! - nftables: a verdict map from (address, protocol, port) to a
//!   per-service chain, which picks an endpoint chain with
//!   `numgen random mod n vmap`; the endpoint chain DNATs.
//!
//! Chain names carry a hash of the service port name, as kube-proxy's do.
//!
//! IPv6 Services get the same rulesets in the IPv6 family, as kube-proxy
//! writes one per family: for ip6tables-restore, and an `ip6` table.
use std::{
    fmt::Write,
    net::{IpAddr, SocketAddr},
};

/// One Service port as the anchors program it. A ruleset's Services are
/// of one family.
#[derive(Clone, Debug)]
pub struct AnchorService {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub endpoints: Vec<IpAddr>,
    pub target_port: u16,
    /// A NodePort Service's node port (`externalTrafficPolicy: Cluster`);
    /// only the iptables anchor programs it.
    pub node_port: Option<u16>,
}

/// The pod CIDR: traffic from outside it is marked for masquerade, as
/// kube-proxy does with `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";
/// The IPv6 pod CIDR, as broad (the test pods' are in fd00::/8).
pub const CLUSTER_CIDR6: &str = "fd00::/8";
const MASQ_MARK: &str = "0x4000";

/// What the rulesets say differently per family: the host prefix length,
/// the cluster CIDR, and nft's family and address words.
struct FamilyWords {
    host: &'static str,
    cluster_cidr: &'static str,
    nft_family: &'static str,
    nft_addr: &'static str,
    nft_addr_type: &'static str,
}

fn family_words(services: &[AnchorService]) -> FamilyWords {
    match services.first().is_some_and(|s| s.vip.is_ipv6()) {
        false => FamilyWords {
            host: "32",
            cluster_cidr: CLUSTER_CIDR,
            nft_family: "ip",
            nft_addr: "ip",
            nft_addr_type: "ipv4_addr",
        },
        true => FamilyWords {
            host: "128",
            cluster_cidr: CLUSTER_CIDR6,
            nft_family: "ip6",
            nft_addr: "ip6",
            nft_addr_type: "ipv6_addr",
        },
    }
}

/// `endpoint`:`port` as both tools write it (`[addr]:port` for IPv6).
fn endpoint_at(endpoint: IpAddr, port: u16) -> String {
    SocketAddr::new(endpoint, port).to_string()
}

/// kube-proxy's chain-name suffix: 16 base-32 characters (80 bits) of a
/// hash of the name. kube-proxy uses SHA-256; two FNV-1a hashes do here.
fn suffix(name: &str) -> String {
    let fnv = |seed: u64| name.bytes().fold(seed, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3));
    let bits = u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64 | u128::from(fnv(0x8422_2325_cbf2_9ce4));
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16).map(|i| ALPHABET[(bits >> (i * 5)) as usize & 31] as char).collect()
}

/// The `nat` table of kube-proxy's iptables mode, for iptables-restore
/// (ip6tables-restore for IPv6 Services).
pub fn iptables_ruleset(services: &[AnchorService]) -> String {
    let FamilyWords { host, cluster_cidr, .. } = family_words(services);
    let mut chains = String::new();
    let mut rules = String::new();
    let node_ports = services.iter().any(|s| s.node_port.is_some());
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
        .into_iter()
        .chain(node_ports.then_some("KUBE-NODEPORTS"))
    {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    rules.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    rules.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for service in services {
        let svc_chain = format!("KUBE-SVC-{}", suffix(&service.name));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let comment = format!("{} cluster IP", service.name);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/{host} -p tcp -m comment --comment \"{comment}\" -m tcp --dport {} -j {svc_chain}",
            service.vip, service.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {cluster_cidr} -d {}/{host} -p tcp -m comment --comment \"{comment}\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            service.vip, service.port
        );
        if let Some(node_port) = service.node_port {
            let ext_chain = format!("KUBE-EXT-{}", suffix(&service.name));
            let _ = writeln!(chains, ":{ext_chain} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{}\" -m tcp --dport {node_port} -j {ext_chain}",
                service.name
            );
            let _ = writeln!(
                rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
                service.name
            );
            let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
        }
        let count = service.endpoints.len();
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            let endpoint_at = endpoint_at(*endpoint, service.target_port);
            let sep_chain = format!("KUBE-SEP-{}", suffix(&format!("{}/{endpoint_at}", service.name)));
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            let comment = format!("{} -> {endpoint_at}", service.name);
            if i + 1 < count {
                let probability = 1.0 / (count - i) as f64;
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{comment}\" -m statistic --mode random --probability {probability:.11} -j {sep_chain}"
                );
            } else {
                let _ = writeln!(rules, "-A {svc_chain} -m comment --comment \"{comment}\" -j {sep_chain}");
            }
            let _ = writeln!(
                rules,
                "-A {sep_chain} -s {endpoint}/{host} -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                service.name
            );
            let _ = writeln!(
                rules,
                "-A {sep_chain} -p tcp -m comment --comment \"{}\" -m tcp -j DNAT --to-destination {endpoint_at}",
                service.name
            );
        }
    }
    if node_ports {
        rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// The table of kube-proxy's nftables mode, for `nft -f`.
pub fn nftables_ruleset(table: &str, services: &[AnchorService]) -> String {
    let FamilyWords { cluster_cidr, nft_family: family, nft_addr: addr, nft_addr_type: addr_type, .. } =
        family_words(services);
    let mut out = String::new();
    // Deleting first makes the file reloadable, as kube-proxy's syncs are.
    let _ = writeln!(out, "table {family} {table} {{ }}\ndelete table {family} {table}\ntable {family} {table} {{");
    out.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    out.push_str("  chain masquerading {\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n");
    out.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n");
    out.push_str(
        "  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n",
    );
    out.push_str("  chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }\n");
    let mut elements = Vec::with_capacity(services.len());
    for service in services {
        let svc_chain = format!("service-{}", suffix(&service.name));
        elements.push(format!("{} . tcp . {} : goto {svc_chain}", service.vip, service.port));
        let mut picks = Vec::new();
        let mut endpoint_chains = String::new();
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            let endpoint_at = endpoint_at(*endpoint, service.target_port);
            let ep_chain = format!("endpoint-{}", suffix(&format!("{}/{endpoint_at}", service.name)));
            picks.push(format!("{i} : goto {ep_chain}"));
            let _ = writeln!(
                endpoint_chains,
                "  chain {ep_chain} {{\n    {addr} saddr {endpoint} jump mark-for-masquerade\n    meta l4proto tcp dnat to {endpoint_at}\n  }}"
            );
        }
        let _ = writeln!(
            out,
            "  chain {svc_chain} {{\n    {addr} daddr {} tcp dport {} {addr} saddr != {cluster_cidr} jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}",
            service.vip,
            service.port,
            service.endpoints.len(),
            picks.join(", ")
        );
        out.push_str(&endpoint_chains);
    }
    let _ = writeln!(out, "  map service-ips {{\n    type {addr_type} . inet_proto . inet_service : verdict");
    if !elements.is_empty() {
        let _ = writeln!(out, "    elements = {{ {} }}", elements.join(",\n      "));
    }
    let _ = writeln!(
        out,
        "  }}\n  chain services {{\n    {addr} daddr . meta l4proto . th dport vmap @service-ips\n  }}\n}}"
    );
    out
}

/// kube-proxy's partial sync after `old` became `new` (same address and
/// port, other endpoints), for `iptables-restore --noflush`: the service
/// chain is rewritten, new endpoint chains are made, gone ones deleted.
pub fn iptables_service_update(old: &AnchorService, new: &AnchorService) -> String {
    let full = iptables_ruleset(std::slice::from_ref(new));
    let svc_chain = format!("KUBE-SVC-{}", suffix(&new.name));
    let sep = |s: &AnchorService, e: &IpAddr| {
        format!("KUBE-SEP-{}", suffix(&format!("{}/{}", s.name, endpoint_at(*e, s.target_port))))
    };
    let mut out = String::from("*nat\n");
    let new_seps: Vec<String> = new.endpoints.iter().map(|e| sep(new, e)).collect();
    let gone: Vec<String> = old.endpoints.iter().map(|e| sep(old, e)).filter(|c| !new_seps.contains(c)).collect();
    for chain in std::iter::once(&svc_chain).chain(&new_seps).chain(&gone) {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for line in full.lines().filter(|l| l.starts_with(&format!("-A {svc_chain} ")) || l.starts_with("-A KUBE-SEP-")) {
        let _ = writeln!(out, "{line}");
    }
    for chain in &gone {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The same change in kube-proxy's nftables mode, for `nft -f`.
pub fn nftables_service_update(table: &str, old: &AnchorService, new: &AnchorService) -> String {
    let full = nftables_ruleset(table, std::slice::from_ref(new));
    let family = family_words(std::slice::from_ref(new)).nft_family;
    let svc_chain = format!("service-{}", suffix(&new.name));
    let endpoint = |s: &AnchorService, e: &IpAddr| {
        format!("endpoint-{}", suffix(&format!("{}/{}", s.name, endpoint_at(*e, s.target_port))))
    };
    let new_chains: Vec<String> = new.endpoints.iter().map(|e| endpoint(new, e)).collect();
    let mut out = String::new();
    for chain in &new_chains {
        let _ = writeln!(out, "add chain {family} {table} {chain}\nflush chain {family} {table} {chain}");
    }
    let _ = writeln!(out, "flush chain {family} {table} {svc_chain}");
    // The rules of the new chains, taken from the full ruleset.
    let mut current = None;
    for line in full.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("chain ").and_then(|l| l.strip_suffix(" {")) {
            current = (name == svc_chain || new_chains.iter().any(|c| c == name)).then(|| name.to_owned());
        } else if line == "}" {
            current = None;
        } else if let Some(chain) = &current {
            let _ = writeln!(out, "add rule {family} {table} {chain} {line}");
        }
    }
    for chain in old.endpoints.iter().map(|e| endpoint(old, e)).filter(|c| !new_chains.contains(c)) {
        let _ = writeln!(out, "delete chain {family} {table} {chain}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn services(n: u8) -> Vec<AnchorService> {
        (0..n)
            .map(|i| AnchorService {
                name: format!("bench/svc-{i}:http"),
                vip: Ipv4Addr::new(10, 96, 0, i + 1).into(),
                port: 80,
                endpoints: (1..=4).map(|e| Ipv4Addr::new(10, 128, i, e).into()).collect(),
                target_port: 8080,
                node_port: None,
            })
            .collect()
    }

    #[test]
    fn iptables_services_are_tried_in_order_and_endpoints_picked_uniformly() {
        let rules = iptables_ruleset(&services(3));
        let dispatch: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).collect();
        assert_eq!(dispatch.len(), 3);
        assert!(dispatch[2].contains("-d 10.96.0.3/32"), "the last service is last in KUBE-SERVICES");
        let svc = dispatch[0].rsplit(' ').next().unwrap();
        let picks: Vec<&str> =
            rules.lines().filter(|l| l.starts_with(&format!("-A {svc} ")) && l.contains("KUBE-SEP")).collect();
        // 1/4, 1/3, 1/2 and the rest: each endpoint gets a quarter.
        assert!(picks[0].contains("--probability 0.25000000000"));
        assert!(picks[1].contains("--probability 0.33333333333"));
        assert!(picks[2].contains("--probability 0.50000000000"));
        assert!(!picks[3].contains("statistic"));
        assert_eq!(rules.lines().filter(|l| l.contains("-j DNAT --to-destination")).count(), 12);
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
        let declared = rules.lines().filter(|l| l.starts_with(':')).count();
        assert_eq!(declared, 3 + 3 + 12, "fixed chains, one per service, one per endpoint");
    }

    #[test]
    fn a_node_port_is_matched_last_on_local_addresses_and_masqueraded() {
        let mut services = services(2);
        services[0].node_port = Some(30080);
        let rules = iptables_ruleset(&services);
        let dispatch: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).collect();
        assert_eq!(dispatch.len(), 3);
        assert!(dispatch[2].ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"), "{rules}");
        let svc = dispatch[0].rsplit(' ').next().unwrap();
        let ext = svc.replace("KUBE-SVC-", "KUBE-EXT-");
        assert!(rules.contains(&format!("--dport 30080 -j {ext}\n")), "{rules}");
        let ext_rules: Vec<&str> = rules.lines().filter(|l| l.starts_with(&format!("-A {ext} "))).collect();
        assert!(ext_rules[0].ends_with("-j KUBE-MARK-MASQ") && ext_rules[1].ends_with(&format!("-j {svc}")));
        assert_eq!(rules.lines().filter(|l| l.starts_with(':')).count(), 4 + 1 + 2 + 8, "{rules}");
        assert!(!iptables_ruleset(&services[1..]).contains("KUBE-NODEPORTS"), "none without a node port");
    }

    #[test]
    fn nftables_dispatches_through_one_verdict_map() {
        let rules = nftables_ruleset("kube-proxy", &services(2));
        assert!(rules.contains("10.96.0.2 . tcp . 80 : goto service-"));
        assert_eq!(rules.matches("numgen random mod 4 vmap").count(), 2);
        assert_eq!(rules.matches("dnat to 10.128.").count(), 8);
        assert_eq!(rules.matches('{').count(), rules.matches('}').count());
    }

    #[test]
    fn one_endpoint_change_rewrites_its_service_chain_and_swaps_the_endpoint_chain() {
        let old = services(1).remove(0);
        let mut new = old.clone();
        new.endpoints[0] = Ipv4Addr::new(10, 129, 0, 1).into();
        let update = iptables_service_update(&old, &new);
        assert_eq!(update.lines().filter(|l| l.starts_with("-X ")).count(), 1, "{update}");
        assert!(update.contains("--to-destination 10.129.0.1:8080"));
        assert!(!update.contains("KUBE-SERVICES"), "the dispatch rule is unchanged");
        let update = nftables_service_update("kube-proxy", &old, &new);
        assert_eq!(update.lines().filter(|l| l.starts_with("delete chain")).count(), 1, "{update}");
        assert!(update.contains("dnat to 10.129.0.1:8080") && update.contains("numgen random mod 4 vmap"));
    }

    #[test]
    fn ipv6_services_get_the_same_rulesets_in_the_ipv6_family() {
        let six: Vec<AnchorService> = (1..=2u16)
            .map(|i| AnchorService {
                name: format!("bench/six-{i}:http"),
                vip: Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, i).into(),
                port: 80,
                endpoints: (1..=4).map(|e| Ipv6Addr::new(0xfd00, 0x128, i, 0, 0, 0, 0, e).into()).collect(),
                target_port: 8080,
                node_port: None,
            })
            .collect();
        let rules = iptables_ruleset(&six);
        assert!(rules.contains("-A KUBE-SERVICES -d fd00:96::2/128 -p tcp"), "{rules}");
        assert!(rules.contains("! -s fd00::/8 -d fd00:96::1/128"), "{rules}");
        assert!(rules.contains("--to-destination [fd00:128:1::1]:8080"), "{rules}");
        assert!(!rules.contains("/32"), "{rules}");
        let nft = nftables_ruleset("kube-proxy", &six);
        assert!(nft.starts_with("table ip6 kube-proxy"), "{nft}");
        assert!(nft.contains("type ipv6_addr . inet_proto . inet_service") && nft.contains("ip6 daddr fd00:96::1"));
        assert!(nft.contains("dnat to [fd00:128:2::4]:8080") && !nft.contains(" ip saddr"), "{nft}");
        let mut new = six[0].clone();
        new.endpoints[0] = Ipv6Addr::new(0xfd00, 0x129, 0, 0, 0, 0, 0, 1).into();
        let update = nftables_service_update("kube-proxy", &six[0], &new);
        assert!(update.contains("add rule ip6 kube-proxy") && update.contains("delete chain ip6 kube-proxy"));
    }

    #[test]
    fn chain_names_are_stable_and_distinct() {
        assert_eq!(suffix("a"), suffix("a"));
        assert_ne!(suffix("bench/svc-1:http"), suffix("bench/svc-2:http"));
        assert_eq!(suffix("x").len(), 16);
    }
}
