//! `lb-load`: the benchmarks' load tools, usable on their own.
//!
//! `lb-load serve [--tcp ADDR] [--udp ADDR]` (both families by default) answers every 64-byte request
//! with 64 bytes; `lb-load crr|rr|udp-rr --target ADDR [--seconds S]
//! [--concurrency C]` runs that load and prints one JSON report (rate,
//! transactions, errors, p50/p90/p99 latency in µs).
use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use lb_tests::load::{self, Mode};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer requests over TCP and UDP until killed.
    Serve {
        /// `[::]` takes IPv4 too (unless net.ipv6.bindv6only says not).
        #[arg(long, default_value = "[::]:8080")]
        tcp: SocketAddr,
        #[arg(long, default_value = "[::]:8080")]
        udp: SocketAddr,
    },
    /// TCP_CRR: connect, request, response, close.
    Crr(Client),
    /// TCP_RR: requests on one kept-open connection per worker.
    Rr(Client),
    /// UDP request and response, one socket per worker.
    UdpRr(Client),
}

#[derive(clap::Args)]
struct Client {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
}

fn main() -> anyhow::Result<()> {
    let (mode, client) = match Cli::parse().command {
        Command::Serve { tcp, udp } => return Ok(load::serve(tcp, udp)?),
        Command::Crr(client) => (Mode::Crr, client),
        Command::Rr(client) => (Mode::Rr, client),
        Command::UdpRr(client) => (Mode::UdpRr, client),
    };
    let report = load::run(mode, client.target, Duration::from_secs_f64(client.seconds), client.concurrency);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
