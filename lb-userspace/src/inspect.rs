//! `lb services`, `lb backends` and `lb stats`: what the pinned maps and
//! links hold, of both families (IPv4's rows first; backend ids are per
//! family).
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::{datapath::Attachment, family::Family, model::Protocol, plan::MapContents};

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct BackendRow {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ServiceRow {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// ClientIP session affinity timeout; 0 is none.
    pub affinity_timeout_seconds: u32,
    /// "random", or "maglev" (with its table number).
    pub algorithm: String,
    /// Why the frontend has fewer backends than its Service has ready
    /// endpoints: "policy Local", "node hints" or "zone hints".
    pub narrowed_by: Option<&'static str>,
    pub backends: Vec<BackendRow>,
}

/// The reason kept in a frontend's `FRONTEND_NARROWED_*` flags.
fn narrowed_by(flags: u8) -> Option<&'static str> {
    [
        (lb_common::FRONTEND_NARROWED_POLICY_LOCAL, "policy Local"),
        (lb_common::FRONTEND_NARROWED_NODE_HINTS, "node hints"),
        (lb_common::FRONTEND_NARROWED_ZONE_HINTS, "zone hints"),
    ]
    .into_iter()
    .find_map(|(flag, reason)| (flags & flag != 0).then_some(reason))
}

pub fn service_rows<A: Family>(contents: &MapContents<A>) -> Vec<ServiceRow> {
    contents
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(key, value)| ServiceRow {
            address: key.vip.ip(),
            port: u16::from_be_bytes(key.port),
            protocol: Protocol::from_number(key.protocol).map_or_else(|| key.protocol.to_string(), |p| p.to_string()),
            affinity_timeout_seconds: value.affinity_timeout_s,
            algorithm: match value.maglev_table {
                0 => "random".to_owned(),
                table => format!("maglev #{table}"),
            },
            narrowed_by: narrowed_by(value.flags),
            backends: contents
                .slots_of(key)
                .into_iter()
                .filter_map(|id| contents.backends.get(&id).map(|b| backend_row(id, b)))
                .collect(),
        })
        .collect()
}

fn backend_row<A: Family>(id: u32, b: &lb_common::Backend<A>) -> BackendRow {
    BackendRow { id, address: b.addr.ip(), port: u16::from_be_bytes(b.port) }
}

pub fn backend_rows<A: Family>(contents: &MapContents<A>) -> Vec<BackendRow> {
    contents.backends.iter().map(|(id, b)| backend_row(*id, b)).collect()
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Packets and bytes per verdict, by counter name.
    pub verdicts: Vec<VerdictRow>,
    pub conntrack_entries: usize,
    /// Which program serves which interface.
    pub attachments: Vec<Attachment>,
    /// How full each map is.
    pub maps: Vec<MapFill>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

impl MapFill {
    pub fn percent(&self) -> f64 {
        if self.capacity == 0 { 0.0 } else { self.entries as f64 * 100.0 / f64::from(self.capacity) }
    }
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct VerdictRow {
    pub verdict: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

pub fn stats(
    counters: &[lb_common::TrafficCounter],
    conntrack_entries: usize,
    attachments: Vec<Attachment>,
    maps: Vec<MapFill>,
) -> Stats {
    let verdicts = lb_common::counter::NAMES
        .iter()
        .zip(counters)
        .map(|(verdict, c)| VerdictRow { verdict, packets: c.packets, bytes: c.bytes })
        .collect();
    Stats { verdicts, conntrack_entries, attachments, maps }
}

pub fn stats_table(stats: &Stats) -> String {
    let mut out = format!("{:<22} {:>14} {:>16}\n", "VERDICT", "PACKETS", "BYTES");
    for row in &stats.verdicts {
        out += &format!("{:<22} {:>14} {:>16}\n", row.verdict, row.packets, row.bytes);
    }
    out += &format!("\nconntrack entries: {} (two per flow)\n", stats.conntrack_entries);
    out += &format!("\n{:<16} {}\n", "INTERFACE", "PROGRAM");
    for a in &stats.attachments {
        out += &format!("{:<16} {}\n", a.interface, a.program);
    }
    if !stats.maps.is_empty() {
        out += &format!("\n{:<16} {:>10} {:>10} {:>6}\n", "MAP", "ENTRIES", "CAPACITY", "FILL");
        for m in &stats.maps {
            let warn = if m.percent() >= crate::sizing::WARN_FILL * 100.0 { "  (over 90%)" } else { "" };
            out += &format!("{:<16} {:>10} {:>10} {:>5.1}%{warn}\n", m.map, m.entries, m.capacity, m.percent());
        }
    }
    out
}

pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut out = format!(
        "{:<26} {:>8}  {:<10} {:<16} {:<13} {}\n",
        "FRONTEND", "BACKENDS", "ALGORITHM", "AFFINITY", "NARROWED BY", "ADDRESSES"
    );
    for row in rows {
        let frontend = format!("{}/{}", SocketAddr::new(row.address, row.port), row.protocol);
        let affinity = match row.affinity_timeout_seconds {
            0 => "-".to_owned(),
            t => format!("ClientIP {t}s"),
        };
        let addrs: Vec<String> = row.backends.iter().map(|b| SocketAddr::new(b.address, b.port).to_string()).collect();
        out += &format!(
            "{:<26} {:>8}  {:<10} {:<16} {:<13} {}\n",
            frontend,
            row.backends.len(),
            row.algorithm,
            affinity,
            row.narrowed_by.unwrap_or("-"),
            addrs.join(", ")
        );
    }
    out
}

pub fn backends_table(rows: &[BackendRow]) -> String {
    let mut out = format!("{:>6}  {}\n", "ID", "ADDRESS");
    for row in rows {
        out += &format!("{:>6}  {}\n", row.id, SocketAddr::new(row.address, row.port));
    }
    out
}

/// `lb explain`'s answer as lines.
pub fn explanation_table(flow: &crate::explain::Flow, answer: &crate::explain::Explanation) -> String {
    let client = match flow.client_port {
        Some(port) => std::net::SocketAddr::new(flow.client, port).to_string(),
        None => flow.client.to_string(),
    };
    let hook = match answer.hook {
        crate::explain::Hook::Pod => "a pod's packets (tc)",
        crate::explain::Hook::Wire => "packets from outside (external interface)",
        crate::explain::Hook::Socket => "a host process's socket (cgroup hooks)",
    };
    let mut out = format!("{:<11}{client} -> {}/{}, {hook}\n", "flow", flow.service, flow.protocol);
    if let Some(frontend) = &answer.frontend {
        let view = answer.view.map(|v| format!(" ({v} view)")).unwrap_or_default();
        out += &format!("{:<11}{frontend}{view}\n", "frontend");
    }
    out += &format!(
        "{:<11}{}\n",
        "verdict",
        serde_json::to_value(answer.verdict).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    );
    if let Some(backend) = answer.backend {
        out += &format!("{:<11}{backend}\n", "backend");
    }
    if !answer.candidates.is_empty() {
        let candidates: Vec<String> = answer.candidates.iter().map(ToString::to_string).collect();
        out += &format!("{:<11}{}\n", "candidates", candidates.join(", "));
    }
    out += &format!("{:<11}{}\n", "why", answer.reason);
    if let Some(rewrite) = &answer.rewrite {
        out += &format!("{:<11}{rewrite}\n", "rewrite");
    }
    out
}
