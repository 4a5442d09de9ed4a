//! The command line. A library module so that other code (the Helm chart's
//! tests) can check flags against the real definition.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "lb", version, about = "eBPF service load balancer for Kubernetes (kube-proxy replacement)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level or tracing filter (RUST_LOG wins when set).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: keep the datapath in step with the Services.
    Run(RunArgs),
    /// Print the services the pinned maps hold.
    Services(InspectArgs),
    /// Print the backends the pinned maps hold.
    Backends(InspectArgs),
    /// Print the datapath's packet counters by verdict and its conntrack entries.
    Stats(InspectArgs),
}

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A directory of manifests, watched for changes.
    Dir(PathBuf),
}

fn parse_source(value: &str) -> Result<Source, String> {
    match value.split_once(':') {
        Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(path.into())),
        _ if value == "kube" => Err("the Kubernetes API source is not built yet; use dir:PATH".into()),
        _ => Err(format!("{value:?}: expected dir:PATH")),
    }
}

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Source of Services and EndpointSlices: dir:PATH reads every YAML file in PATH.
    #[arg(long, value_parser = parse_source)]
    pub source: Source,
    /// Interfaces to attach to, as globs (e.g. "veth*,cali*"); default: every veth.
    #[arg(long, value_delimiter = ',')]
    pub pod_interfaces: Vec<String>,
    /// bpffs directory for the pinned maps, program and links.
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Size of the services map (frontends plus backend slots).
    #[arg(long, default_value_t = lb_common::DEFAULT_SERVICES_MAX_ENTRIES)]
    pub services_max_entries: u32,
    /// Size of the backends map.
    #[arg(long, default_value_t = lb_common::DEFAULT_BACKENDS_MAX_ENTRIES)]
    pub backends_max_entries: u32,
    /// Size of the connection-tracking map (two entries per flow).
    #[arg(long, default_value_t = lb_common::DEFAULT_CONNTRACK_MAX_ENTRIES)]
    pub conntrack_max_entries: u32,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}
