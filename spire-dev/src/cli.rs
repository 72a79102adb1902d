//! The `spire-dev` command line: `serve` runs a deployment, `ctl` drives one
//! through its control socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use meshauth_duration::parse_duration;

use crate::agent::IdentityInfo;
use crate::control::{ControlReply, ControlRequest, EntryAdd};
use crate::dev::{DevConfig, DevStatus, SpireDev};
use crate::entries::{EntrySpec, Selector};

/// A SPIRE-compatible development server (Workload API, Delegated Identity
/// API, per-node agents, outage switches). For demos and tests, never production.
#[derive(Debug, Parser)]
#[command(name = "spire-dev", version)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server, the node agents and the control socket.
    Serve(ServeArgs),
    /// Send a request to a running server's control socket.
    Ctl(CtlArgs),
}

/// `spire-dev serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory for agents/<node>/{agent,admin}.sock and control.sock.
    #[arg(long)]
    pub dir: PathBuf,
    /// Trust domain.
    #[arg(long, default_value = crate::server::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// A node to run an agent for (repeatable); nodes named by --entry are added.
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// NODE=SPIFFE_ID_OR_PATH[,selector=type:value...][,ttl=DURATION][,id=ID] (repeatable).
    #[arg(long = "entry")]
    pub entries: Vec<String>,
    /// Default SVID TTL (e.g. 1h, 30s).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// A SPIFFE ID allowed on the agents' admin sockets, as SPIRE's
    /// `authorized_delegates` (repeatable); without it every caller is.
    #[arg(long = "authorized-delegate")]
    pub authorized_delegates: Vec<String>,
}

/// `spire-dev ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket (`<dir>/control.sock`).
    #[arg(long, env = "SPIRE_DEV_CONTROL")]
    pub control: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
    /// The request.
    #[command(subcommand)]
    pub op: CtlCommand,
}

/// Output formats of `ctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable lines.
    Text,
    /// The reply as JSON.
    Json,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// `ctl` requests.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Server outage on or off.
    Outage {
        /// on | off
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Take a node agent down or bring it back up.
    Agent {
        /// down | up
        #[command(subcommand)]
        op: AgentOp,
    },
    /// Rotate the CA (the bundle keeps the previous CA).
    RotateCa,
    /// Prepare the next CA: it joins the bundle, SVIDs stay on the current
    /// one until `activate-ca` (SPIRE's "prepared").
    PrepareCa,
    /// Sign with the prepared CA from now on (SPIRE's "activated").
    ActivateCa,
    /// Drop previous CAs from the bundle.
    PruneCa,
    /// Add or remove a registration entry.
    Entry {
        /// add | remove
        #[command(subcommand)]
        op: EntryOp,
    },
    /// Show entries and the identities each node agent serves.
    List,
}

/// `ctl agent ...`.
#[derive(Debug, Subcommand)]
pub enum AgentOp {
    /// Remove the agent's sockets and end its streams.
    Down {
        /// The node.
        node: String,
    },
    /// Serve again on the same paths.
    Up {
        /// The node.
        node: String,
    },
}

/// `ctl entry ...`.
#[derive(Debug, Subcommand)]
pub enum EntryOp {
    /// Register an entry.
    Add {
        /// Parent node.
        #[arg(long)]
        node: String,
        /// SPIFFE ID or path (`/identity/7`).
        #[arg(long)]
        spiffe_id: String,
        /// Selector `type:value` (repeatable).
        #[arg(long = "selector", value_parser = Selector::parse)]
        selectors: Vec<Selector>,
        /// TTL (e.g. 30s); the server default when absent.
        #[arg(long)]
        ttl: Option<String>,
        /// Entry ID; generated when absent.
        #[arg(long)]
        id: Option<String>,
    },
    /// Remove an entry by ID.
    Remove {
        /// The entry ID.
        id: String,
    },
}

impl CtlCommand {
    /// The control request this command sends.
    pub fn request(self) -> ControlRequest {
        match self {
            Self::Outage { state } => ControlRequest::Outage {
                on: state == OnOff::On,
            },
            Self::Agent {
                op: AgentOp::Down { node },
            } => ControlRequest::AgentDown { node },
            Self::Agent {
                op: AgentOp::Up { node },
            } => ControlRequest::AgentUp { node },
            Self::RotateCa => ControlRequest::RotateCa,
            Self::PrepareCa => ControlRequest::PrepareCa,
            Self::ActivateCa => ControlRequest::ActivateCa,
            Self::PruneCa => ControlRequest::PruneCa,
            Self::Entry {
                op:
                    EntryOp::Add {
                        node,
                        spiffe_id,
                        selectors,
                        ttl,
                        id,
                    },
            } => ControlRequest::EntryAdd(EntryAdd {
                node,
                spiffe_id,
                selectors,
                ttl,
                id,
            }),
            Self::Entry {
                op: EntryOp::Remove { id },
            } => ControlRequest::EntryRemove { id },
            Self::List => ControlRequest::List,
        }
    }
}

/// Builds the deployment config from `serve` flags, reporting every bad
/// `--entry` at once.
pub fn dev_config(args: &ServeArgs) -> anyhow::Result<DevConfig> {
    let mut errors = Vec::new();
    let mut entries = Vec::new();
    for e in &args.entries {
        match EntrySpec::parse_cli(&args.trust_domain, e) {
            Ok(spec) => entries.push(spec),
            Err(err) => errors.push(format!("--entry {e}: {err}")),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("invalid flags:\n  {}", errors.join("\n  "));
    }
    Ok(DevConfig {
        dir: args.dir.clone(),
        trust_domain: args.trust_domain.clone(),
        default_ttl: args.ttl,
        nodes: args.nodes.clone(),
        entries,
        control_socket: true,
        authorized_delegates: (!args.authorized_delegates.is_empty())
            .then(|| args.authorized_delegates.clone()),
    })
}

/// Runs `spire-dev serve` until SIGINT or SIGTERM, then removes the sockets.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let config = dev_config(&args)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let dev = SpireDev::start(config)
        .await
        .context("starting spire-dev")?;
    let status = dev.status();
    print!("{}", format_status(&status));
    println!("control socket: {}", dev.control_socket().display());
    tracing::info!("spire-dev ready");
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    dev.shutdown().await;
    Ok(())
}

/// Runs `spire-dev ctl`: prints the reply as text or JSON.
pub async fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let reply = crate::control::request(&args.control, &args.op.request()).await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&reply)?),
        Output::Text => print!("{}", format_reply(&reply)),
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// A reply as human-readable lines.
pub fn format_reply(reply: &ControlReply) -> String {
    match reply {
        ControlReply::Outage { was, now } => {
            format!("server outage: {} (was {})\n", on_off(*now), on_off(*was))
        }
        ControlReply::Agent { node, up, changed } => format!(
            "agent {node}: {}{}\n",
            if *up { "up" } else { "down" },
            if *changed { "" } else { " (unchanged)" }
        ),
        ControlReply::CaRotated {
            generation,
            bundle_cas,
        } => format!("CA rotated: generation {generation}, bundle holds {bundle_cas} CA(s)\n"),
        ControlReply::CaPrepared {
            generation,
            bundle_cas,
        } => format!(
            "CA prepared: generation {generation} in the bundle (holds {bundle_cas} CA(s)), not signing yet\n"
        ),
        ControlReply::CaActivated {
            generation,
            bundle_cas,
        } => format!(
            "CA activated: generation {generation} signs, bundle holds {bundle_cas} CA(s)\n"
        ),
        ControlReply::CaPruned {
            dropped,
            bundle_cas,
        } => format!("pruned {dropped} previous CA(s); bundle holds {bundle_cas} CA(s)\n"),
        ControlReply::EntryAdded { entry } => format!(
            "entry added: {} {} node={}\n",
            entry.id, entry.spiffe_id, entry.node
        ),
        ControlReply::EntryRemoved { entry } => format!(
            "entry removed: {} {} node={}\n",
            entry.id, entry.spiffe_id, entry.node
        ),
        ControlReply::Status(status) => format_status(status),
    }
}

fn format_identity(i: &IdentityInfo) -> String {
    format!(
        "    {}  serial={}  not_after={}{}\n",
        i.spiffe_id,
        i.serial,
        i.not_after_rfc3339,
        if i.expired { "  EXPIRED" } else { "" }
    )
}

/// The status as human-readable lines.
pub fn format_status(s: &DevStatus) -> String {
    let mut out = format!(
        "trust domain {}  outage={}  CA generation {} (bundle: {} CA(s))\n",
        s.trust_domain,
        on_off(s.outage),
        s.ca_generation,
        s.bundle_cas
    );
    out.push_str(&format!("entries ({}):\n", s.entries.len()));
    for e in &s.entries {
        let selectors: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "  {}  {}  node={}  ttl={}  selectors=[{}]\n",
            e.id,
            e.spiffe_id,
            e.node,
            meshauth_duration::format_duration(e.ttl),
            selectors.join(",")
        ));
    }
    for n in &s.nodes {
        out.push_str(&format!(
            "node {} ({})  {}  {}\n",
            n.node,
            if n.up { "up" } else { "down" },
            n.workload_socket.display(),
            n.admin_socket.display()
        ));
        if n.identities.is_empty() {
            out.push_str("    (no identities)\n");
        }
        for i in &n.identities {
            out.push_str(&format_identity(i));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inputs the agent's settings are tested with too
    /// (`auth-agent/src/config.rs`): one grammar, Go's plus days.
    const DURATIONS_ACCEPTED: [(&str, Duration); 5] = [
        ("1h30m", Duration::from_secs(5400)),
        ("90m", Duration::from_secs(5400)),
        ("1.5h", Duration::from_secs(5400)),
        ("5400s", Duration::from_secs(5400)),
        ("5400000ms", Duration::from_secs(5400)),
    ];
    const DURATIONS_REFUSED: [&str; 6] = ["forever", "90", "1h 30m", "-90m", "90y", "h30m"];

    fn serve(ttl: &str) -> Result<ServeArgs, clap::Error> {
        let argv = [
            "spire-dev",
            "serve",
            "--dir",
            "/tmp/x",
            &format!("--ttl={ttl}"),
        ];
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Serve(a) => a,
            Command::Ctl(_) => panic!("serve parsed as ctl"),
        })
    }

    #[test]
    fn ttl_flag_and_entry_ttl_read_the_project_grammar() {
        for (input, want) in DURATIONS_ACCEPTED {
            let args = serve(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(args.ttl, want, "{input}");
            let spec = EntrySpec::parse_cli("meshauth.local", &format!("a=/x,ttl={input}"))
                .unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(spec.ttl, Some(want), "{input}");
        }
        assert_eq!(serve("2d").unwrap().ttl, Duration::from_secs(48 * 3600));
        for input in DURATIONS_REFUSED {
            let e = serve(input).unwrap_err().to_string();
            assert!(e.contains(&format!("parse_duration({input:?})")), "{e}");
            let e = EntrySpec::parse_cli("meshauth.local", &format!("a=/x,ttl={input}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("parse_duration({input:?})")), "{e}");
        }
    }
}
