//! `meshauth-agent` flags. Each overrides its environment variable, which
//! overrides the file (`--config`); the layering and validation are in
//! [`crate::config`].

/// `meshauth-agent` flags: each overrides its environment variable, which
/// overrides the file (`--config`). See [`crate::config`]. Durations are
/// written as in Go and SPIRE, or in days: `500ms`, `90s`, `1h30m`, `2d`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// YAML configuration file (every key optional, camelCase).
    #[arg(long, env = "MESHAUTH_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Only check the configuration: print the effective settings (JSON)
    /// and exit 0, or every invalid value and exit 2. Touches nothing.
    #[arg(long)]
    pub check_config: bool,
    /// This node's name [env NODE_NAME].
    #[arg(long)]
    pub node_name: Option<String>,
    /// SPIFFE trust domain [env MESHAUTH_TRUST_DOMAIN; default meshauth.local].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// `workload` (SPIFFE Workload API), `delegated` (SPIRE Delegated Identity API by
    /// selectors) or `delegated-pods` (the same API, per local pod by PID).
    #[arg(long)]
    pub identity_source: Option<String>,
    /// SPIRE socket [env SPIFFE_ENDPOINT_SOCKET; default unix:///run/spire/sockets/agent.sock].
    #[arg(long)]
    pub spire_socket: Option<String>,
    /// Delegated Identity API selector `type:value` (repeatable).
    #[arg(long)]
    pub spire_selector: Vec<String>,
    /// `kubernetes` or a manifest directory.
    #[arg(long)]
    pub policy_source: Option<String>,
    /// How often a manifest directory is re-read (e.g. 1s).
    #[arg(long)]
    pub policy_poll_interval: Option<String>,
    /// bpffs directory for pins [default /sys/fs/bpf/meshauth].
    #[arg(long)]
    pub bpf_pin_dir: Option<String>,
    /// The pods' cgroup v2 directory, or `auto`.
    #[arg(long)]
    pub pods_cgroup: Option<String>,
    /// `enforce` or `audit`.
    #[arg(long)]
    pub mode: Option<String>,
    /// Handshake server address [default 0.0.0.0:4250].
    #[arg(long)]
    pub handshake_listen: Option<String>,
    /// Handshake connect timeout (e.g. 5s).
    #[arg(long)]
    pub connect_timeout: Option<String>,
    /// Handshake timeout (e.g. 5s).
    #[arg(long)]
    pub handshake_timeout: Option<String>,
    /// Bound on the responder's TLS handshake alone (e.g. 1s); at most the
    /// handshake timeout.
    #[arg(long)]
    pub handshake_tls_timeout: Option<String>,
    /// Handshakes served at once.
    #[arg(long)]
    pub max_concurrent_handshakes: Option<String>,
    /// Connections the responder holds from one source address at once.
    #[arg(long)]
    pub max_handshakes_per_source: Option<String>,
    /// Authenticated pairs the auth map holds [default 131072]; changing
    /// it migrates the pinned entries.
    #[arg(long)]
    pub auth_map_capacity: Option<String>,
    /// Pod and node addresses the ipcache holds [default 65536]; changing
    /// it recreates the ipcache, rewritten from desired state at start.
    #[arg(long)]
    pub ipcache_capacity: Option<String>,
    /// On shutdown, how long in-flight handshakes and tasks may take (e.g. 5s).
    #[arg(long)]
    pub shutdown_grace: Option<String>,
    /// Metrics and health address [default 0.0.0.0:9964].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Local API socket [default /var/run/meshauth/agent.sock].
    #[arg(long)]
    pub api_socket: Option<String>,
    /// State directory (node ids, identity allocation).
    #[arg(long)]
    pub state_dir: Option<String>,
    /// Re-authenticate at this fraction of a pair's lifetime.
    #[arg(long)]
    pub reauth_fraction: Option<String>,
    /// Expired-entry sweep schedule (cron, 6 fields).
    #[arg(long)]
    pub sweep_cron: Option<String>,
    /// How long a freed identity number is not given to another label set
    /// (at least the longest SVID TTL plus margin) [default 90m].
    #[arg(long)]
    pub identity_quarantine: Option<String>,
    /// WireGuard: true or false.
    #[arg(long)]
    pub wireguard: Option<String>,
    /// The WireGuard interface [default meshauth_wg0].
    #[arg(long)]
    pub wireguard_interface: Option<String>,
    /// WireGuard's UDP port [default 51871].
    #[arg(long)]
    pub wireguard_port: Option<String>,
    /// The WireGuard interface's MTU: auto (underlay − 80) or a number.
    #[arg(long)]
    pub wireguard_mtu: Option<String>,
    /// Rotate the WireGuard key this often (e.g. 720h), or off [default off].
    #[arg(long)]
    pub wireguard_key_rotation: Option<String>,
    /// How often the WireGuard interface is read back [default 10s].
    #[arg(long)]
    pub wireguard_refresh: Option<String>,
    /// Kubernetes: the Lease (NAMESPACE/NAME) electing the one agent that
    /// writes policy status, or off [default off].
    #[arg(long)]
    pub policy_status_lease: Option<String>,
    /// How long a leader that stopped renewing keeps the policy status
    /// Lease [default 15s].
    #[arg(long)]
    pub policy_status_lease_duration: Option<String>,
    /// Traffic of pod addresses not known yet: `pass` (not enforced) or
    /// `drop` (strict: 133 "Policy denied" until the agent knows the pod).
    #[arg(long)]
    pub unknown_pods: Option<String>,
    /// Check that each pod sends only from its own addresses (132 "Invalid
    /// source ip" otherwise): true (default) or false.
    #[arg(long)]
    pub source_check: Option<String>,
    /// `plain` or `json`.
    #[arg(long)]
    pub log_format: Option<String>,
}

impl AgentArgs {
    /// The configuration these flags, the environment and the file give.
    pub fn build(&self) -> Result<crate::config::Config, crate::config::ConfigErrors> {
        let mut flags: Vec<(&'static str, String)> = Vec::new();
        let mut put = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                flags.push((k, v.clone()));
            }
        };
        put("node-name", &self.node_name);
        put("trust-domain", &self.trust_domain);
        put("identity-source", &self.identity_source);
        put("spire-socket", &self.spire_socket);
        put("policy-source", &self.policy_source);
        put("policy-poll-interval", &self.policy_poll_interval);
        put("bpf-pin-dir", &self.bpf_pin_dir);
        put("pods-cgroup", &self.pods_cgroup);
        put("mode", &self.mode);
        put("handshake-listen", &self.handshake_listen);
        put("connect-timeout", &self.connect_timeout);
        put("handshake-timeout", &self.handshake_timeout);
        put("max-concurrent-handshakes", &self.max_concurrent_handshakes);
        put("handshake-tls-timeout", &self.handshake_tls_timeout);
        put("max-handshakes-per-source", &self.max_handshakes_per_source);
        put("auth-map-capacity", &self.auth_map_capacity);
        put("ipcache-capacity", &self.ipcache_capacity);
        put("shutdown-grace", &self.shutdown_grace);
        put("metrics-listen", &self.metrics_listen);
        put("api-socket", &self.api_socket);
        put("state-dir", &self.state_dir);
        put("reauth-fraction", &self.reauth_fraction);
        put("sweep-cron", &self.sweep_cron);
        put("identity-quarantine", &self.identity_quarantine);
        put("wireguard", &self.wireguard);
        put("wireguard-interface", &self.wireguard_interface);
        put("wireguard-port", &self.wireguard_port);
        put("wireguard-mtu", &self.wireguard_mtu);
        put("wireguard-key-rotation", &self.wireguard_key_rotation);
        put("wireguard-refresh", &self.wireguard_refresh);
        put("unknown-pods", &self.unknown_pods);
        put("source-check", &self.source_check);
        put("policy-status-lease", &self.policy_status_lease);
        put(
            "policy-status-lease-duration",
            &self.policy_status_lease_duration,
        );
        put("log-format", &self.log_format);
        if !self.spire_selector.is_empty() {
            flags.push(("spire-selector", self.spire_selector.join(",")));
        }
        let file = match &self.config {
            Some(p) => Some(crate::config::read_file(p)?),
            None => None,
        };
        crate::config::build(&crate::config::Layers {
            flags,
            env: std::env::vars().collect(),
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args, CommandFactory, Parser};

    use super::AgentArgs;
    use crate::config::keys;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn every_setting_has_a_flag_and_every_flag_reaches_the_config() {
        let command = AgentArgs::augment_args(clap::Command::new("meshauth-agent"));
        let mut flags: Vec<&str> = command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|f| *f != "config" && *f != "check-config")
            .collect();
        flags.sort_unstable();
        let mut settings: Vec<&str> = keys::ALL.iter().map(|k| k.flag).collect();
        settings.sort_unstable();
        assert_eq!(flags, settings);
        Cli::command().debug_assert();

        // Each flag given a bad value must come back as an error naming it.
        let mut argv = vec!["meshauth-agent".to_owned()];
        for k in keys::ALL {
            argv.push(format!("--{}", k.flag));
            argv.push("\u{1}bad".to_owned());
        }
        let args = Cli::try_parse_from(&argv).unwrap().agent;
        let e = args.build().unwrap_err();
        for k in keys::ALL.iter().filter(|k| k.flag != "spire-selector") {
            let flag = format!("--{}", k.flag);
            assert!(e.0.iter().any(|i| i.source == flag), "{flag} not read: {e}");
        }
    }
}
