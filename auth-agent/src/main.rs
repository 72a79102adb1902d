//! `meshauth`: thin entry point; everything lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use auth_agent::api::ApiClient;
use auth_agent::cli::{self, ObserveArgs};
use auth_agent::flags::AgentArgs;
use clap::{Parser, Subcommand};

const DEFAULT_API_SOCKET: &str = "/var/run/meshauth/agent.sock";

#[derive(Parser, Debug)]
#[command(
    name = "meshauth",
    version,
    about = "Sidecarless mutual authentication between Kubernetes workloads, enforced in the kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the running agent's API is.
#[derive(clap::Args, Debug, Clone)]
struct Api {
    /// The agent's local API socket.
    #[arg(long, env = "MESHAUTH_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    api_socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent.
    Agent(Box<AgentArgs>),
    /// The running agent's health, SPIRE state, map usage and peers.
    Status(Api),
    /// Stream flow verdicts, like `hubble observe`.
    Observe {
        #[command(flatten)]
        api: Api,
        /// Only this verdict: DROPPED, FORWARDED or AUDIT.
        #[arg(long)]
        verdict: Option<String>,
        /// Only flows to or from this identity.
        #[arg(long)]
        identity: Option<u32>,
        /// Past flows to show first.
        #[arg(long, default_value_t = 20)]
        last: usize,
        /// Keep following new flows.
        #[arg(short, long)]
        follow: bool,
    },
    /// The auth map.
    Auth {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Identities in the desired state.
    Identity {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Policies: what meshauth makes of them.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run the demo on this machine.
    Demo {
        /// SVID lifetime in seconds (rotation at half of it; the outage lasts until expiry).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=300))]
        ttl: u64,
    },
    /// Check this node before install: kernel, BPF, mounts, privileges,
    /// SPIRE, ports. One line per check with what to fix; exits 1 if any
    /// check FAILs.
    Preflight(PreflightArgs),
    /// Run CMD in a cgroup and network namespace (the lab's process launcher).
    #[command(hide = true)]
    LabExec {
        /// Network namespace file to enter.
        #[arg(long)]
        netns: std::path::PathBuf,
        /// Cgroup v2 directory to join first.
        #[arg(long)]
        cgroup: Option<std::path::PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<std::ffi::OsString>,
    },
    /// A lab pod's workload: a line protocol on stdin/stdout.
    #[command(hide = true)]
    LabPod,
}

#[derive(clap::Args, Debug)]
struct PreflightArgs {
    /// The SPIRE agent's Workload API socket.
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = "unix:///run/spire/sockets/agent.sock"
    )]
    spire_socket: String,
    /// The cgroup v2 directory holding all pods (detected if not given).
    #[arg(long)]
    pods_cgroup: Option<std::path::PathBuf>,
    /// The handshake port (TCP).
    #[arg(long, default_value_t = 4250)]
    handshake_port: u16,
    /// The metrics and health port (TCP).
    #[arg(long, default_value_t = 9964)]
    metrics_port: u16,
    /// Where bpffs must be mounted.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: std::path::PathBuf,
    /// Seconds the SPIRE agent gets to answer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    spire_timeout: u64,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Subcommand, Debug)]
enum ListCommand {
    /// List them.
    List(Api),
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Accepted, partially enforced or rejected, with the reasons: for every
    /// policy the running agent sees, or in a manifest directory with
    /// `--dir`. Exits 1 if any is rejected or a file cannot be read.
    Status {
        /// Directory of YAML manifests (policies, pods, namespaces, nodes);
        /// without it, ask the running agent.
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        api: Api,
    },
}

use auth_agent::daemon::{init_logs, limit_malloc_arenas};

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // Before any runtime thread exists: lab-exec changes this thread's netns.
    match &cli.command {
        Command::LabExec { netns, cgroup, cmd } => {
            let e = auth_agent::lab::exec::exec_in(netns, cgroup.as_deref(), cmd);
            eprintln!("meshauth lab-exec: {e}");
            return ExitCode::from(127);
        }
        Command::LabPod => {
            return match auth_agent::lab::pod::run_stdio() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshauth lab-pod: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshauth: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("meshauth {what}: {e}");
        ExitCode::from(2)
    };
    let print = |json: bool, text: String, value: serde_json::Result<String>| {
        if json {
            println!("{}", value.unwrap_or_default());
        } else {
            print!("{text}");
        }
        ExitCode::SUCCESS
    };
    match cli.command {
        Command::Agent(args) => {
            drop(runtime);
            auth_agent::daemon::main("meshauth agent", &args)
        }
        Command::Status(api) => {
            init_logs("error", false);
            let c = ApiClient::new(&api.api_socket);
            match runtime.block_on(c.get_json::<auth_agent::api::types::AgentStatus>("/v1/status"))
            {
                Ok(s) => {
                    let ready = s.ready.all();
                    print(
                        api.output == "json",
                        cli::render_status(&s),
                        serde_json::to_string_pretty(&s),
                    );
                    if ready {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail("status", &e),
            }
        }
        Command::Observe {
            api,
            verdict,
            identity,
            last,
            follow,
        } => {
            init_logs("error", false);
            let c = ApiClient::new(&api.api_socket);
            let args = ObserveArgs {
                verdict,
                identity,
                last,
                follow,
                json: api.output == "json",
            };
            match runtime.block_on(cli::observe(&c, &args, std::io::stdout().lock())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail("observe", &e),
            }
        }
        Command::Auth {
            command: ListCommand::List(api),
        } => {
            init_logs("error", false);
            let c = ApiClient::new(&api.api_socket);
            match runtime.block_on(c.get_json::<Vec<auth_agent::api::types::AuthEntry>>("/v1/auth"))
            {
                Ok(v) => print(
                    api.output == "json",
                    cli::render_auth(&v),
                    serde_json::to_string_pretty(&v),
                ),
                Err(e) => fail("auth list", &e),
            }
        }
        Command::Identity {
            command: ListCommand::List(api),
        } => {
            init_logs("error", false);
            let c = ApiClient::new(&api.api_socket);
            match runtime.block_on(
                c.get_json::<Vec<auth_agent::api::types::IdentityEntry>>("/v1/identities"),
            ) {
                Ok(v) => print(
                    api.output == "json",
                    cli::render_identities(&v),
                    serde_json::to_string_pretty(&v),
                ),
                Err(e) => fail("identity list", &e),
            }
        }
        Command::Policy {
            command: PolicyCommand::Status { dir, api },
        } => {
            init_logs("error", false);
            let json = api.output == "json";
            let result = match dir {
                Some(dir) => cli::policy_status(&dir, json).map_err(|e| format!("{e:#}")),
                None => runtime
                    .block_on(cli::policy_status_live(
                        &ApiClient::new(&api.api_socket),
                        json,
                    ))
                    .map_err(|e| e.to_string()),
            };
            match result {
                Ok((report, clean)) => {
                    print!("{report}");
                    if clean {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail("policy status", &e),
            }
        }
        Command::Preflight(args) => {
            use auth_agent::preflight;
            let opts = preflight::Options {
                spire_socket: preflight::socket_path(&args.spire_socket),
                pods_cgroup: args.pods_cgroup,
                handshake_port: args.handshake_port,
                metrics_port: args.metrics_port,
                bpffs: args.bpffs,
                spire_timeout: Duration::from_secs(args.spire_timeout),
            };
            let report = runtime.block_on(preflight::run(&preflight::Host::default(), &opts));
            if args.output == "json" {
                println!("{}", report.render_json());
            } else {
                print!("{}", report.render_text());
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Demo { ttl } => {
            init_logs("error", false);
            let opts = auth_agent::demo::DemoOptions {
                ttl: Duration::from_secs(ttl),
            };
            match runtime.block_on(auth_agent::demo::run(opts)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("meshauth demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::LabExec { .. } | Command::LabPod => unreachable!("handled above"),
    }
}
