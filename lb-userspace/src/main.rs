use anyhow::Context;
use clap::Parser;
use lb_userspace::{
    agent::{self, AgentConfig, SocketBalancing, SourceConfig},
    cli::{Cli, Command, InspectArgs, OptionalPath, Output, RunArgs, SocketLb, Source},
    datapath::{MapSizes, Maps},
    inspect,
    interfaces::{ExternalInterfaces, PodInterfaces},
    kube_source::Connection,
    model::ModelOptions,
    plan::MaglevConfig,
    sizing,
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&cli.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Services(args) => print_inspect(&args, |c, c6| {
            let mut rows = inspect::service_rows(c);
            rows.extend(inspect::service_rows(c6));
            Ok(match args.output {
                Output::Table => inspect::services_table(&rows),
                Output::Json => serde_json::to_string_pretty(&rows)? + "\n",
            })
        }),
        Command::Backends(args) => print_inspect(&args, |c, c6| {
            let mut rows = inspect::backend_rows(c);
            rows.extend(inspect::backend_rows(c6));
            Ok(match args.output {
                Output::Table => inspect::backends_table(&rows),
                Output::Json => serde_json::to_string_pretty(&rows)? + "\n",
            })
        }),
        Command::Mount(args) => {
            let request = lb_userspace::mounts::MountRequest {
                cgroup_ns: args.cgroup_ns,
                mount_ns: args.mount_ns,
                bpffs: args.bpffs,
                cgroup2: args.cgroup2,
            };
            for line in lb_userspace::mounts::mount_missing(&request)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Explain(args) => {
            let maps = open_pinned(&args.inspect)?;
            let (client, client_port) = args.from;
            let (service, protocol) = args.to;
            if client.is_ipv4() != service.is_ipv4() {
                anyhow::bail!("--from {client} and --to {service}: a flow's two ends are of one family");
            }
            let flow = lb_userspace::explain::Flow { client, client_port, service, protocol };
            let (table_size, hook) = (args.maglev_table_size, args.hook.into());
            // Each family over its own maps.
            let answer = if service.is_ipv4() {
                lb_userspace::explain::explain(&maps.read_contents()?, &maps, table_size, flow, hook)
            } else {
                lb_userspace::explain::explain(&maps.read_contents6()?, &maps, table_size, flow, hook)
            };
            match args.inspect.output {
                Output::Table => print!("{}", inspect::explanation_table(&flow, &answer)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
            }
            Ok(())
        }
        Command::Stats(args) => {
            let maps = open_pinned(&args)?;
            let attachments = lb_userspace::datapath::pinned_attachments(&args.pin_path);
            let stats = inspect::stats(&maps.counters()?, maps.conntrack_entries(), attachments, maps.fill()?);
            match args.output {
                Output::Table => print!("{}", inspect::stats_table(&stats)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
            }
            Ok(())
        }
    }
}

fn open_pinned(args: &InspectArgs) -> anyhow::Result<Maps> {
    Maps::open_pinned(&args.pin_path)
        .with_context(|| format!("no datapath pinned at {} (is the agent running?)", args.pin_path.display()))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = match args.source {
        Source::Dir(path) => SourceConfig::Dir(path),
        Source::Kube => SourceConfig::Kube(
            Connection { kubeconfig: args.kubeconfig, api_server: args.k8s_api_server },
            args.node_name.clone(),
        ),
    };
    anyhow::ensure!(
        lb_userspace::maglev::is_prime(args.maglev_table_size),
        "--maglev-table-size {} is not a prime (try 16381 or 65521)",
        args.maglev_table_size
    );
    let config = AgentConfig {
        source,
        model: ModelOptions {
            proxy_name: args.proxy_name,
            algorithm: args.lb_algorithm.into(),
            node_name: args.node_name,
            // Both from the Node object, once the source has it.
            zone: None,
            node_addresses: Vec::new(),
            external_ip_cidrs: args.external_ip_cidrs,
        },
        nodeport_addresses: args.nodeport_addresses,
        external_interfaces: ExternalInterfaces::new(&args.external_interfaces).context("--external-interfaces")?,
        external_datapath: args.external_datapath,
        min_sync_period: args.min_sync_period,
        healthz_addr: args.healthz_addr.0,
        metrics_addr: args.metrics_addr.0,
        healthz_timeout: args.healthz_timeout,
        pod_interfaces: PodInterfaces::new(&args.pod_interfaces).context("--pod-interfaces")?,
        pin_path: args.pin_path,
        socket_lb: match (args.socket_lb, args.cgroup_path) {
            (SocketLb::Off, _) | (_, Some(OptionalPath(None))) => None,
            (scope, cgroup) => {
                Some(SocketBalancing { cgroup: cgroup.and_then(|c| c.0), own_netns_only: scope == SocketLb::Host })
            }
        },
        fixed_map_sizes: args.fixed_map_sizes,
        map_sizes: MapSizes {
            services: args.services_max_entries,
            backends: args.backends_max_entries,
            conntrack: args.conntrack_max_entries.unwrap_or_else(|| {
                let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
                sizing::conntrack_entries(sizing::mem_total(&meminfo).unwrap_or(0), args.memory_limit)
            }),
            affinity: args.affinity_max_entries,
            source_ranges: args.source_ranges_max_entries,
            maglev: MaglevConfig { table_size: args.maglev_table_size, tables: args.maglev_tables },
            // Dormant until a sync has IPv6 frontends (`sizing::Ipv6Maps`).
            ipv6: false,
        },
    };
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(agent::run(config))
}

fn print_inspect(
    args: &InspectArgs,
    render: impl Fn(
        &lb_userspace::plan::MapContents,
        &lb_userspace::plan::MapContents<lb_common::Ipv6>,
    ) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let maps = open_pinned(args)?;
    print!("{}", render(&maps.read_contents()?, &maps.read_contents6()?)?);
    Ok(())
}
