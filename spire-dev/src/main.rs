//! `spire-dev`: parses arguments and runs the library's `serve` or `ctl`.

use clap::Parser;
use spire_dev::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SPIRE_DEV_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => spire_dev::cli::serve(args).await,
        Command::Ctl(args) => spire_dev::cli::ctl(args).await,
    }
}
