//! `dialguard-bench-filter`: the filter cost benchmark's command line; `cargo
//! xtask bench filter [--quick] [--connections N]` builds `dist/` and runs it.
//! See the `dialguard_bench` library for the method.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dialguard_bench::{Options, Parts, Variant};

#[derive(Debug, Parser)]
#[command(
    name = "dialguard-bench-filter",
    about = "Instructions per connection inside Envoy (callgrind): tcp_proxy, an empty wasm filter, dialguard, the gRPC access log"
)]
struct Cli {
    /// A short run: 200 connections per variant, a smaller system view.
    #[arg(long)]
    quick: bool,
    /// Measured connections per variant (default 5000, or 200 with --quick).
    #[arg(long)]
    connections: Option<u64>,
    /// Warm-up connections per variant, not measured.
    #[arg(long)]
    warmup: Option<u64>,
    /// Only these variants, e.g. `1,3,4`.
    #[arg(long, value_delimiter = ',')]
    variants: Vec<u8>,
    /// Connections of the native system view at a 0.1% misroute rate (0 skips it).
    #[arg(long)]
    system_connections: Option<u64>,
    /// Skip the native memory measurement.
    #[arg(long)]
    no_memory: bool,
    /// Data chunks of the long-lived view (0 skips it; default 2000, or 200 with --quick).
    #[arg(long)]
    long_lived_chunks: Option<u64>,
    /// Idle seconds after the warm-up and after the measured connections.
    #[arg(long)]
    settle_secs: Option<f64>,
    /// Keep configurations, logs and callgrind dumps in this directory.
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut options = if cli.quick {
        Options::quick()
    } else {
        Options::full()
    };
    if let Some(n) = cli.connections {
        options.connections = n;
    }
    if let Some(n) = cli.warmup {
        options.warmup = n;
    }
    if !cli.variants.is_empty() {
        options.variants = cli
            .variants
            .iter()
            .map(|n| Variant::from_number(*n).with_context(|| format!("no variant ({n}): 1 to 6")))
            .collect::<anyhow::Result<_>>()?;
    }
    match cli.system_connections {
        Some(0) => options.system_connections = None,
        Some(n) => options.system_connections = Some(n),
        None => {}
    }
    if cli.no_memory {
        options.memory = false;
    }
    match cli.long_lived_chunks {
        Some(0) => options.long_lived_chunks = None,
        Some(n) => options.long_lived_chunks = Some(n),
        None => {}
    }
    if let Some(secs) = cli.settle_secs {
        options.settle = Duration::try_from_secs_f64(secs).context("--settle-secs")?;
    }
    options.keep = cli.keep;
    let parts = Parts::from_dist()?;
    let results = dialguard_bench::run(&parts, &options)?;
    print!("{}", results.render());
    Ok(())
}
