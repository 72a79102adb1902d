//! `meshauth spire render`: the SPIRE server's and agent's configuration
//! files (HCL) for a meshauth deployment, from typed settings
//! (`spire-config`). Every invalid setting is reported at once (exit 2).
//! `meshauth spire reconcile`: the registration entries (see
//! [`reconcile`]).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

mod reconcile;
use spire_config::{DataStore, Deployment, Settings};

/// `meshauth spire ...`.
#[derive(Subcommand, Debug)]
pub enum SpireCommand {
    /// Render server.conf and agent.conf.
    Render(Box<RenderArgs>),
    /// Keep the SPIRE server's registration entries as meshauth wants
    /// them (Entry API on the server's admin socket).
    Reconcile(Box<reconcile::ReconcileArgs>),
}

/// `meshauth spire render`.
#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// The trust domain.
    #[arg(long)]
    pub trust_domain: String,
    /// `standalone` (join_token nodes, unix workloads) or `kubernetes`
    /// (k8s_psat nodes, k8s workloads).
    #[arg(long, default_value = "standalone", value_parser = ["standalone", "kubernetes"])]
    pub deployment: String,
    /// Kubernetes: the cluster's name.
    #[arg(long, default_value = "meshauth")]
    pub cluster: String,
    /// Kubernetes: the SPIRE agents' service account (namespace:name).
    #[arg(long, default_value = "spire:spire-agent")]
    pub agent_service_account: String,
    /// Kubernetes: the ConfigMap (namespace/name) the server publishes the
    /// trust bundle to and the agents bootstrap from. Default: spire-bundle
    /// in the agents' namespace.
    #[arg(long)]
    pub bundle_configmap: Option<String>,
    /// SPIRE server replicas (more than one needs postgres).
    #[arg(long, default_value_t = 1)]
    pub server_replicas: u32,
    /// `sqlite3` or `postgres`.
    #[arg(long, default_value = "sqlite3", value_parser = ["sqlite3", "postgres"])]
    pub datastore: String,
    /// The postgres connection string (libpq).
    #[arg(long, env = "MESHAUTH_SPIRE_POSTGRES", hide_env_values = true)]
    pub postgres_connection_string: Option<String>,
    /// server.conf names this file for the datastore's settings (SPIRE's
    /// `plugin_data_file`) instead of holding them, so server.conf can live
    /// in a ConfigMap and the connection string in a Secret; the file is
    /// rendered too (`datastore.hcl`), for postgres when
    /// `--postgres-connection-string` is given.
    #[arg(long)]
    pub datastore_file: Option<PathBuf>,
    /// The CA's lifetime (Go duration: 24h).
    #[arg(long, default_value = "24h")]
    pub ca_ttl: String,
    /// X.509-SVIDs' lifetime (1h).
    #[arg(long, default_value = "1h")]
    pub svid_ttl: String,
    /// Agents' own SVID lifetime (Go duration). Default: 12h standalone
    /// (a join-token agent whose SVID expires in a server outage cannot
    /// attest again), SPIRE's default (the SVID TTL) on Kubernetes.
    #[arg(long)]
    pub agent_ttl: Option<String>,
    /// The server's address as agents dial it.
    #[arg(long, default_value = "spire-server")]
    pub server_address: String,
    /// The agent's Workload API socket.
    #[arg(long, default_value = "/run/spire/sockets/agent.sock")]
    pub workload_socket: PathBuf,
    /// The agent's admin socket, for meshauth's Delegated Identity mode
    /// (not under the Workload API socket's directory).
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// A SPIFFE ID allowed on the admin socket (meshauth's); repeatable.
    #[arg(long)]
    pub authorized_delegate: Vec<String>,
    /// Write `server.conf` and `agent.conf` here (mode 0600) instead of
    /// printing them.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(command: &SpireCommand) -> ExitCode {
    match command {
        SpireCommand::Render(args) => render(args),
        SpireCommand::Reconcile(args) => reconcile::run(args),
    }
}

fn render(a: &RenderArgs) -> ExitCode {
    let deployment = match a.deployment.as_str() {
        "kubernetes" => Deployment::Kubernetes {
            cluster: a.cluster.clone(),
            agent_service_account: a.agent_service_account.clone(),
        },
        _ => Deployment::Standalone,
    };
    let mut s = Settings::new(&a.trust_domain, deployment);
    let mut errs = Vec::new();
    for (flag, text, slot) in [
        ("--ca-ttl", &a.ca_ttl, &mut s.server.ca_ttl),
        ("--svid-ttl", &a.svid_ttl, &mut s.server.svid_ttl),
    ] {
        match meshauth_duration::parse_duration(text) {
            Ok(d) => *slot = d,
            Err(e) => errs.push(format!("{flag} {text:?}: {e}")),
        }
    }
    if let Some(text) = &a.agent_ttl {
        match meshauth_duration::parse_duration(text) {
            Ok(d) => s.server.agent_ttl = Some(d),
            Err(e) => errs.push(format!("--agent-ttl {text:?}: {e}")),
        }
    }
    if let Some(cm) = &a.bundle_configmap {
        match cm.split_once('/') {
            Some((ns, name)) => s.server.bundle_config_map = Some((ns.into(), name.into())),
            None => errs.push(format!("--bundle-configmap {cm:?}: want namespace/name")),
        }
    }
    s.server.replicas = a.server_replicas;
    // The datastore's own file, when the server reads it from one.
    let mut datastore = None;
    if let Some(f) = &a.datastore_file {
        if a.datastore == "sqlite3" && a.server_replicas > 1 {
            errs.push(format!(
                "datastore sqlite3 with {} server replicas: each replica would keep its own database and CA; use postgres or 1 replica",
                a.server_replicas
            ));
        }
        datastore = match (a.datastore.as_str(), &a.postgres_connection_string) {
            ("postgres", Some(c)) => Some(spire_config::render_sql_plugin_data("postgres", c)),
            ("postgres", None) => None,
            _ => Some(spire_config::render_sql_plugin_data(
                "sqlite3",
                &s.server
                    .data_dir
                    .join("datastore.sqlite3")
                    .display()
                    .to_string(),
            )),
        };
        s.server.datastore = DataStore::SqlFile {
            plugin_data_file: f.clone(),
        };
    } else if a.datastore == "postgres" {
        s.server.datastore = DataStore::Postgres {
            connection_string: a.postgres_connection_string.clone().unwrap_or_default(),
        };
    }
    s.agent.server_address = a.server_address.clone();
    s.agent.socket_path = a.workload_socket.clone();
    s.agent.admin_socket_path = a.admin_socket.clone();
    s.agent.authorized_delegates = a.authorized_delegate.clone();
    if let Err(e) = s.validate() {
        errs.extend(e.0);
    }
    if !errs.is_empty() {
        return super::fail(
            "spire render",
            &format!(
                "{} invalid setting(s):\n  {}",
                errs.len(),
                errs.join("\n  ")
            ),
        );
    }
    for w in s.warnings() {
        eprintln!("meshauth spire render: warning: {w}");
    }
    let (server, agent) = match (
        spire_config::render_server(&s),
        spire_config::render_agent(&s),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return super::fail("spire render", &e),
    };
    match &a.out {
        None => {
            println!("# server.conf\n{server}\n# agent.conf\n{agent}");
            if let Some(d) = &datastore {
                println!("# datastore.hcl\n{d}");
            }
            ExitCode::SUCCESS
        }
        Some(dir) => {
            let mut files = vec![("server.conf", &server), ("agent.conf", &agent)];
            if let Some(d) = &datastore {
                files.push(("datastore.hcl", d));
            }
            for (name, text) in files {
                let path = dir.join(name);
                let r = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .and_then(|mut f| f.write_all(text.as_bytes()));
                if let Err(e) = r {
                    return super::fail("spire render", &format!("{}: {e}", path.display()));
                }
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
    }
}
