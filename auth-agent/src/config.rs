//! The agent's configuration: one `Config`, built by a pure function from a
//! YAML file, environment variables and command-line flags (flags win over
//! the environment, the environment over the file, the file over defaults).
//! Every invalid value is reported at once, each naming where it came from.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where SVIDs come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IdentitySource {
    /// The SPIFFE Workload API on the node's SPIRE agent socket.
    WorkloadApi {
        /// The socket.
        socket: PathBuf,
    },
    /// SPIRE's Delegated Identity API on the agent's admin socket.
    DelegatedIdentity {
        /// The admin socket.
        socket: PathBuf,
        /// Selectors (`type:value`) of the SVIDs to receive.
        selectors: Vec<String>,
    },
}

/// Where cluster state comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PolicySource {
    /// The Kubernetes API (in-cluster or kubeconfig).
    Kubernetes,
    /// A directory of YAML manifests, watched.
    Directory {
        /// The directory.
        path: PathBuf,
    },
}

/// Enforce or only report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop unauthenticated flows that policy says must authenticate.
    Enforce,
    /// Let them pass; count and report them.
    Audit,
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// This node's name (as Kubernetes knows it).
    pub node_name: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Where SVIDs come from.
    pub identity_source: IdentitySource,
    /// Where cluster state comes from.
    pub policy_source: PolicySource,
    /// bpffs directory for pinned maps and links.
    pub bpf_pin_dir: PathBuf,
    /// The pods' cgroup v2; `None` = detect kubelet's layout.
    pub pods_cgroup: Option<PathBuf>,
    /// Enforce or audit.
    pub mode: Mode,
    /// Where the handshake server listens.
    pub handshake_listen: SocketAddr,
    /// Handshake connect timeout.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Handshake timeout.
    #[serde(with = "duration_str")]
    pub handshake_timeout: Duration,
    /// The responder's bound on the TLS handshake alone (ClientHello to
    /// Finished); at most `handshake_timeout`.
    #[serde(with = "duration_str")]
    pub handshake_tls_timeout: Duration,
    /// Handshakes served at once.
    pub max_concurrent_handshakes: usize,
    /// Connections the responder holds from one source address at once.
    pub max_handshakes_per_source: usize,
    /// On shutdown, how long handshakes in flight and the agent's tasks may
    /// take to finish before they are cancelled.
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    /// How often a manifest directory is checked for changes.
    #[serde(with = "duration_str")]
    pub policy_poll_interval: Duration,
    /// Metrics and health endpoints.
    pub metrics_listen: SocketAddr,
    /// The local API socket for the CLI.
    pub api_socket: PathBuf,
    /// State kept across restarts (node ids, identity allocation).
    pub state_dir: PathBuf,
    /// Re-authenticate at this fraction of a pair's lifetime.
    pub reauth_fraction: f64,
    /// Cron expression (6 fields, seconds first) of the expired-entry sweep.
    pub sweep_cron: String,
    /// How long a freed identity number stays quarantined (not given to
    /// another label set): at least the longest X.509-SVID TTL plus margin.
    #[serde(with = "duration_str")]
    pub identity_quarantine: Duration,
    /// WireGuard on or off.
    pub wireguard: bool,
    /// Strict mode: drop traffic of pod addresses not known yet (a pod the
    /// agent has not learned of) instead of passing it unenforced.
    pub drop_unknown_pods: bool,
    /// Check on egress that each pod sends only from its own addresses (its
    /// cgroup, found by pod UID, owns them); a spoofed source is dropped
    /// with 132 "Invalid source ip".
    pub source_check: bool,
    /// Log format.
    pub log_format: LogFormat,
}

/// The configuration file: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigFile {
    /// See [`Config::node_name`].
    pub node_name: Option<String>,
    /// See [`Config::trust_domain`].
    pub trust_domain: Option<String>,
    /// `workload` or `delegated`.
    pub identity_source: Option<String>,
    /// Workload API or admin socket.
    pub spire_socket: Option<String>,
    /// Delegated Identity API selectors.
    pub spire_selectors: Option<Vec<String>>,
    /// `kubernetes` or a directory path.
    pub policy_source: Option<String>,
    /// See [`Config::bpf_pin_dir`].
    pub bpf_pin_dir: Option<String>,
    /// See [`Config::pods_cgroup`]; `auto` to detect.
    pub pods_cgroup: Option<String>,
    /// `enforce` or `audit`.
    pub mode: Option<String>,
    /// `ip:port`.
    pub handshake_listen: Option<String>,
    /// e.g. `5s`.
    pub connect_timeout: Option<String>,
    /// e.g. `5s`.
    pub handshake_timeout: Option<String>,
    /// e.g. `1s`: see [`Config::handshake_tls_timeout`].
    pub handshake_tls_timeout: Option<String>,
    /// See [`Config::max_concurrent_handshakes`].
    pub max_concurrent_handshakes: Option<usize>,
    /// See [`Config::max_handshakes_per_source`].
    pub max_handshakes_per_source: Option<usize>,
    /// e.g. `5s`: see [`Config::shutdown_grace`].
    pub shutdown_grace: Option<String>,
    /// e.g. `1s`.
    pub policy_poll_interval: Option<String>,
    /// `ip:port`.
    pub metrics_listen: Option<String>,
    /// See [`Config::api_socket`].
    pub api_socket: Option<String>,
    /// See [`Config::state_dir`].
    pub state_dir: Option<String>,
    /// See [`Config::reauth_fraction`].
    pub reauth_fraction: Option<f64>,
    /// See [`Config::sweep_cron`].
    pub sweep_cron: Option<String>,
    /// e.g. `90m`: see [`Config::identity_quarantine`].
    pub identity_quarantine: Option<String>,
    /// See [`Config::wireguard`].
    pub wireguard: Option<bool>,
    /// `pass` (default) or `drop`: see [`Config::drop_unknown_pods`].
    pub unknown_pods: Option<String>,
    /// See [`Config::source_check`].
    pub source_check: Option<bool>,
    /// `plain` or `json`.
    pub log_format: Option<String>,
}

/// One invalid value: where it came from, what it was, what would be right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `--flag`, `ENV_VAR` or `file: key`.
    pub source: String,
    /// The value given.
    pub value: String,
    /// What is wrong and what would be right.
    pub reason: String,
}

/// Every invalid value found, all at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} invalid configuration value(s):\n{}", .0.len(), .0.iter().map(|i| format!("  {} = {:?}: {}", i.source, i.value, i.reason)).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<Invalid>);

/// Default quarantine of a freed identity number: SPIRE's default 1 h
/// X.509-SVID TTL plus 30 minutes.
pub const DEFAULT_IDENTITY_QUARANTINE: Duration = policy_bridge::identity::DEFAULT_QUARANTINE;
/// The shortest quarantine accepted: SPIRE's default TTL plus 15 minutes.
pub const MIN_IDENTITY_QUARANTINE: Duration = Duration::from_secs(75 * 60);
/// The longest quarantine accepted (30 days).
pub const MAX_IDENTITY_QUARANTINE: Duration = Duration::from_secs(720 * 3600);

/// Default Workload API socket (SPIRE's default agent socket).
pub const DEFAULT_SPIRE_SOCKET: &str = "/run/spire/sockets/agent.sock";

/// The inputs, in the order that wins: flags, environment, file.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// Flag name → value (flags given on the command line).
    pub flags: Vec<(&'static str, String)>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// The parsed file, with its path for messages.
    pub file: Option<(PathBuf, ConfigFile)>,
}

/// A key of the configuration: its flag, its environment variable, and how
/// to read it from the file.
struct Key {
    flag: &'static str,
    env: &'static str,
    file: fn(&ConfigFile) -> Option<String>,
    file_key: &'static str,
}

impl Layers {
    /// The winning raw value of `key` and where it came from.
    fn get(&self, key: &Key) -> Option<(String, String)> {
        if let Some((_, v)) = self.flags.iter().rev().find(|(f, _)| *f == key.flag) {
            return Some((format!("--{}", key.flag), v.clone()));
        }
        if let Some((_, v)) = self.env.iter().find(|(k, _)| k == key.env) {
            return Some((key.env.to_string(), v.clone()));
        }
        let (path, file) = self.file.as_ref()?;
        (key.file)(file).map(|v| (format!("{}: {}", path.display(), key.file_key), v))
    }
}

macro_rules! key {
    ($flag:literal, $env:literal, $field:ident, $file_key:literal) => {
        Key {
            flag: $flag,
            env: $env,
            file: |f| f.$field.as_ref().map(|v| v.to_string()),
            file_key: $file_key,
        }
    };
}

/// Reads the configuration file.
pub fn read_file(path: &Path) -> Result<ConfigFile, ConfigErrors> {
    let invalid = |reason: String| {
        ConfigErrors(vec![Invalid {
            source: path.display().to_string(),
            value: String::new(),
            reason,
        }])
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read: {e}")))?;
    serde_norway::from_str(&text).map_err(|e| invalid(format!("not a meshauth config: {e}")))
}

/// Builds the effective configuration.
pub fn build(layers: &Layers) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut bad = |source: &str, value: &str, reason: &str| {
        errors.push(Invalid {
            source: source.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        });
    };

    let node = key!("node-name", "NODE_NAME", node_name, "nodeName");
    let node_name = match layers.get(&node) {
        Some((_, v)) if is_dns_name(&v) => v,
        Some((src, v)) => {
            bad(
                &src,
                &v,
                "a node name is a DNS-1123 subdomain (lowercase letters, digits, '-', '.')",
            );
            String::new()
        }
        None => {
            bad(
                "--node-name",
                "",
                "required (set NODE_NAME from the pod's spec.nodeName)",
            );
            String::new()
        }
    };

    let td = key!(
        "trust-domain",
        "MESHAUTH_TRUST_DOMAIN",
        trust_domain,
        "trustDomain"
    );
    let trust_domain = match layers.get(&td) {
        Some((src, v)) => match svid_cache::TrustDomain::new(&v) {
            Ok(_) => v,
            Err(e) => {
                bad(&src, &v, &e.to_string());
                v
            }
        },
        None => svid_cache::DEFAULT_TRUST_DOMAIN.to_string(),
    };

    let socket_key = key!(
        "spire-socket",
        "SPIFFE_ENDPOINT_SOCKET",
        spire_socket,
        "spireSocket"
    );
    let socket = match layers.get(&socket_key) {
        Some((src, v)) => {
            let p = v
                .strip_prefix("unix://")
                .unwrap_or(v.strip_prefix("unix:").unwrap_or(&v));
            if !p.starts_with('/') {
                bad(
                    &src,
                    &v,
                    "an absolute unix socket path (unix:///run/spire/sockets/agent.sock)",
                );
            }
            PathBuf::from(p)
        }
        None => PathBuf::from(DEFAULT_SPIRE_SOCKET),
    };
    let src_key = key!(
        "identity-source",
        "MESHAUTH_IDENTITY_SOURCE",
        identity_source,
        "identitySource"
    );
    let sel_key = Key {
        flag: "spire-selector",
        env: "MESHAUTH_SPIRE_SELECTORS",
        file: |f| f.spire_selectors.as_ref().map(|v| v.join(",")),
        file_key: "spireSelectors",
    };
    let identity_source = match layers
        .get(&src_key)
        .map(|(s, v)| (s, v.to_ascii_lowercase()))
    {
        None => IdentitySource::WorkloadApi { socket },
        Some((_, v)) if v == "workload" => IdentitySource::WorkloadApi { socket },
        Some((src, v)) if v == "delegated" => {
            let selectors: Vec<String> = layers
                .get(&sel_key)
                .map(|(_, v)| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            if selectors.is_empty() {
                bad(
                    &src,
                    &v,
                    "the delegated source needs selectors (--spire-selector k8s:ns:meshauth,...)",
                );
            }
            for s in &selectors {
                if !s.contains(':') {
                    bad("spire selector", s, "a selector is type:value");
                }
            }
            IdentitySource::DelegatedIdentity { socket, selectors }
        }
        Some((src, v)) => {
            bad(&src, &v, "workload or delegated");
            IdentitySource::WorkloadApi { socket }
        }
    };

    let pol = key!(
        "policy-source",
        "MESHAUTH_POLICY_SOURCE",
        policy_source,
        "policySource"
    );
    let policy_source = match layers.get(&pol) {
        None => PolicySource::Kubernetes,
        Some((_, v)) if v == "kubernetes" => PolicySource::Kubernetes,
        Some((src, v)) => {
            let p = PathBuf::from(v.strip_prefix("dir:").unwrap_or(&v));
            if !p.is_absolute() {
                bad(&src, &v, "kubernetes, or an absolute directory path");
            }
            PolicySource::Directory { path: p }
        }
    };

    let path_or = |k: &Key, default: &str, bad: &mut dyn FnMut(&str, &str, &str)| -> PathBuf {
        match layers.get(k) {
            Some((src, v)) => {
                if !v.starts_with('/') {
                    bad(&src, &v, "an absolute path");
                }
                PathBuf::from(v)
            }
            None => PathBuf::from(default),
        }
    };
    let bpf_pin_dir = path_or(
        &key!(
            "bpf-pin-dir",
            "MESHAUTH_BPF_PIN_DIR",
            bpf_pin_dir,
            "bpfPinDir"
        ),
        auth_ebpf::DEFAULT_PIN_DIR,
        &mut bad,
    );
    let api_socket = path_or(
        &key!("api-socket", "MESHAUTH_API_SOCKET", api_socket, "apiSocket"),
        "/var/run/meshauth/agent.sock",
        &mut bad,
    );
    let state_dir = path_or(
        &key!("state-dir", "MESHAUTH_STATE_DIR", state_dir, "stateDir"),
        "/var/lib/meshauth",
        &mut bad,
    );
    let cg = key!(
        "pods-cgroup",
        "MESHAUTH_PODS_CGROUP",
        pods_cgroup,
        "podsCgroup"
    );
    let pods_cgroup = match layers.get(&cg) {
        None => None,
        Some((_, v)) if v == "auto" => None,
        Some((src, v)) => {
            if !v.starts_with('/') {
                bad(
                    &src,
                    &v,
                    "auto, or the absolute path of the pods' cgroup v2",
                );
            }
            Some(PathBuf::from(v))
        }
    };

    let mode = match layers.get(&key!("mode", "MESHAUTH_MODE", mode, "mode")) {
        None => Mode::Enforce,
        Some((_, v)) if v == "enforce" => Mode::Enforce,
        Some((_, v)) if v == "audit" => Mode::Audit,
        Some((src, v)) => {
            bad(&src, &v, "enforce or audit");
            Mode::Enforce
        }
    };
    let log_format = match layers.get(&key!(
        "log-format",
        "MESHAUTH_LOG_FORMAT",
        log_format,
        "logFormat"
    )) {
        None => LogFormat::Plain,
        Some((_, v)) if v == "plain" => LogFormat::Plain,
        Some((_, v)) if v == "json" => LogFormat::Json,
        Some((src, v)) => {
            bad(&src, &v, "plain or json");
            LogFormat::Plain
        }
    };

    let addr_or =
        |k: &Key, default: SocketAddr, bad: &mut dyn FnMut(&str, &str, &str)| -> SocketAddr {
            match layers.get(k) {
                Some((src, v)) => match v.parse::<SocketAddr>() {
                    Ok(a) if a.port() != 0 => a,
                    _ => {
                        bad(
                            &src,
                            &v,
                            "ip:port with a non-zero port ([::]:4250, 0.0.0.0:9964)",
                        );
                        default
                    }
                },
                None => default,
            }
        };
    let handshake_listen = addr_or(
        &key!(
            "handshake-listen",
            "MESHAUTH_HANDSHAKE_LISTEN",
            handshake_listen,
            "handshakeListen"
        ),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 4250),
        &mut bad,
    );
    let metrics_listen = addr_or(
        &key!(
            "metrics-listen",
            "MESHAUTH_METRICS_LISTEN",
            metrics_listen,
            "metricsListen"
        ),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9964),
        &mut bad,
    );

    let dur_or = |k: &Key, default: Duration, bad: &mut dyn FnMut(&str, &str, &str)| -> Duration {
        match layers.get(k) {
            Some((src, v)) => match parse_duration(&v) {
                Some(d) if d >= Duration::from_millis(100) && d <= Duration::from_secs(120) => d,
                _ => {
                    bad(
                        &src,
                        &v,
                        "a duration between 100ms and 120s (500ms, 5s, 1m)",
                    );
                    default
                }
            },
            None => default,
        }
    };
    let connect_timeout = dur_or(
        &key!(
            "connect-timeout",
            "MESHAUTH_CONNECT_TIMEOUT",
            connect_timeout,
            "connectTimeout"
        ),
        Duration::from_secs(5),
        &mut bad,
    );
    let handshake_timeout = dur_or(
        &key!(
            "handshake-timeout",
            "MESHAUTH_HANDSHAKE_TIMEOUT",
            handshake_timeout,
            "handshakeTimeout"
        ),
        Duration::from_secs(5),
        &mut bad,
    );
    let tls_key = key!(
        "handshake-tls-timeout",
        "MESHAUTH_HANDSHAKE_TLS_TIMEOUT",
        handshake_tls_timeout,
        "handshakeTlsTimeout"
    );
    let mut handshake_tls_timeout = dur_or(&tls_key, Duration::from_secs(1), &mut bad);
    if handshake_tls_timeout > handshake_timeout {
        match layers.get(&tls_key) {
            Some((src, v)) => bad(
                &src,
                &v,
                &format!(
                    "at most the handshake timeout ({handshake_timeout:?}): it bounds the TLS part of the handshake"
                ),
            ),
            // Only the overall timeout was lowered: the TLS part follows it.
            None => handshake_tls_timeout = handshake_timeout,
        }
    }
    let shutdown_grace = dur_or(
        &key!(
            "shutdown-grace",
            "MESHAUTH_SHUTDOWN_GRACE",
            shutdown_grace,
            "shutdownGrace"
        ),
        Duration::from_secs(5),
        &mut bad,
    );

    let policy_poll_interval = dur_or(
        &key!(
            "policy-poll-interval",
            "MESHAUTH_POLICY_POLL_INTERVAL",
            policy_poll_interval,
            "policyPollInterval"
        ),
        Duration::from_secs(1),
        &mut bad,
    );

    let max_concurrent_handshakes = match layers.get(&key!(
        "max-concurrent-handshakes",
        "MESHAUTH_MAX_CONCURRENT_HANDSHAKES",
        max_concurrent_handshakes,
        "maxConcurrentHandshakes"
    )) {
        None => 256,
        Some((src, v)) => match v.parse::<usize>() {
            Ok(n) if (1..=100_000).contains(&n) => n,
            _ => {
                bad(&src, &v, "a whole number from 1 to 100000");
                256
            }
        },
    };
    let max_handshakes_per_source = match layers.get(&key!(
        "max-handshakes-per-source",
        "MESHAUTH_MAX_HANDSHAKES_PER_SOURCE",
        max_handshakes_per_source,
        "maxHandshakesPerSource"
    )) {
        None => crate::handshake::DEFAULT_MAX_PER_SOURCE,
        Some((src, v)) => match v.parse::<usize>() {
            Ok(n) if (1..=100_000).contains(&n) => n,
            _ => {
                bad(&src, &v, "a whole number from 1 to 100000");
                crate::handshake::DEFAULT_MAX_PER_SOURCE
            }
        },
    };
    let reauth_fraction = match layers.get(&key!(
        "reauth-fraction",
        "MESHAUTH_REAUTH_FRACTION",
        reauth_fraction,
        "reauthFraction"
    )) {
        None => 2.0 / 3.0,
        Some((src, v)) => match v.parse::<f64>() {
            Ok(f) if (0.1..=0.95).contains(&f) => f,
            _ => {
                bad(
                    &src,
                    &v,
                    "a fraction from 0.1 to 0.95 of the pair's lifetime",
                );
                2.0 / 3.0
            }
        },
    };
    let sweep_cron = match layers.get(&key!(
        "sweep-cron",
        "MESHAUTH_SWEEP_CRON",
        sweep_cron,
        "sweepCron"
    )) {
        None => "0 * * * * *".to_string(),
        Some((src, v)) => {
            if v.split_whitespace().count() != 6 {
                bad(
                    &src,
                    &v,
                    "a cron expression of 6 fields, seconds first (0 * * * * *)",
                );
            }
            v
        }
    };
    let identity_quarantine = match layers.get(&key!(
        "identity-quarantine",
        "MESHAUTH_IDENTITY_QUARANTINE",
        identity_quarantine,
        "identityQuarantine"
    )) {
        None => DEFAULT_IDENTITY_QUARANTINE,
        Some((src, v)) => match parse_duration(&v) {
            Some(d) if (MIN_IDENTITY_QUARANTINE..=MAX_IDENTITY_QUARANTINE).contains(&d) => d,
            _ => {
                bad(
                    &src,
                    &v,
                    "a duration from 75m to 720h, at least the longest X.509-SVID TTL plus margin (90m for SPIRE's default 1h TTL)",
                );
                DEFAULT_IDENTITY_QUARANTINE
            }
        },
    };
    let wireguard = match layers.get(&key!(
        "wireguard",
        "MESHAUTH_WIREGUARD",
        wireguard,
        "wireguard"
    )) {
        None => false,
        Some((_, v)) if v == "true" => true,
        Some((_, v)) if v == "false" => false,
        Some((src, v)) => {
            bad(&src, &v, "true or false");
            false
        }
    };
    let drop_unknown_pods = match layers.get(&key!(
        "unknown-pods",
        "MESHAUTH_UNKNOWN_PODS",
        unknown_pods,
        "unknownPods"
    )) {
        None => false,
        Some((_, v)) if v == "pass" => false,
        Some((_, v)) if v == "drop" => true,
        Some((src, v)) => {
            bad(
                &src,
                &v,
                "pass (traffic of pods not known yet is not enforced) or drop (strict)",
            );
            false
        }
    };
    let source_check = match layers.get(&key!(
        "source-check",
        "MESHAUTH_SOURCE_CHECK",
        source_check,
        "sourceCheck"
    )) {
        None => true,
        Some((_, v)) if v == "true" => true,
        Some((_, v)) if v == "false" => false,
        Some((src, v)) => {
            bad(
                &src,
                &v,
                "true (each pod may send only from its own addresses) or false",
            );
            true
        }
    };

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        node_name,
        trust_domain,
        identity_source,
        policy_source,
        bpf_pin_dir,
        pods_cgroup,
        mode,
        handshake_listen,
        connect_timeout,
        handshake_timeout,
        handshake_tls_timeout,
        max_concurrent_handshakes,
        max_handshakes_per_source,
        shutdown_grace,
        policy_poll_interval,
        metrics_listen,
        api_socket,
        state_dir,
        reauth_fraction,
        sweep_cron,
        identity_quarantine,
        wireguard,
        drop_unknown_pods,
        source_check,
        log_format,
    })
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Parses `500ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    })
}

mod duration_str {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_millis() != 0 {
            s.serialize_str(&format!("{}ms", d.as_millis()))
        } else {
            s.serialize_str(&format!("{}s", d.as_secs()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(v: &[(&'static str, &str)]) -> Layers {
        Layers {
            flags: v.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            ..Layers::default()
        }
    }

    #[test]
    fn handshake_limits_are_validated_and_the_tls_timeout_follows_a_lower_handshake_timeout() {
        let e = build(&flags(&[
            ("node-name", "node-a"),
            ("handshake-timeout", "2s"),
            ("handshake-tls-timeout", "3s"),
            ("max-handshakes-per-source", "0"),
            ("shutdown-grace", "forever"),
        ]))
        .unwrap_err();
        let sources: Vec<&str> = e.0.iter().map(|i| i.source.as_str()).collect();
        assert_eq!(
            sources,
            [
                "--handshake-tls-timeout",
                "--shutdown-grace",
                "--max-handshakes-per-source"
            ],
            "{e}"
        );
        assert!(
            e.to_string().contains("at most the handshake timeout (2s)"),
            "{e}"
        );
        let c = build(&flags(&[
            ("node-name", "node-a"),
            ("handshake-timeout", "500ms"),
            ("max-handshakes-per-source", "4"),
        ]))
        .unwrap();
        assert_eq!(c.handshake_tls_timeout, Duration::from_millis(500));
        assert_eq!(c.max_handshakes_per_source, 4);
    }

    #[test]
    fn defaults_with_only_the_node_name() {
        let c = build(&flags(&[("node-name", "node-a")])).unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.trust_domain, "meshauth.local");
        assert_eq!(
            c.identity_source,
            IdentitySource::WorkloadApi {
                socket: DEFAULT_SPIRE_SOCKET.into()
            }
        );
        assert_eq!(c.policy_source, PolicySource::Kubernetes);
        assert_eq!(c.handshake_listen.port(), 4250);
        assert_eq!(c.metrics_listen.port(), 9964);
        assert_eq!(c.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/meshauth"));
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.identity_quarantine, Duration::from_secs(90 * 60));
        assert_eq!(c.handshake_tls_timeout, Duration::from_secs(1));
        assert_eq!(c.max_handshakes_per_source, 16);
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json["connect_timeout"], "5s",
            "the effective config serialises for the start log"
        );
    }

    #[test]
    fn every_invalid_value_is_reported_at_once_with_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshauth.yaml");
        std::fs::write(
            &path,
            "mode: block\nreauthFraction: 2.0\nsweepCron: \"* * *\"\nidentityQuarantine: 15m\n",
        )
        .unwrap();
        let layers = Layers {
            flags: vec![
                ("handshake-listen", "localhost".into()),
                ("connect-timeout", "forever".into()),
            ],
            env: vec![("SPIFFE_ENDPOINT_SOCKET".into(), "relative.sock".into())],
            file: Some((path.clone(), read_file(&path).unwrap())),
        };
        let err = build(&layers).unwrap_err();
        let sources: Vec<&str> = err.0.iter().map(|i| i.source.as_str()).collect();
        assert_eq!(err.0.len(), 8, "{err}");
        assert!(
            sources.contains(&"--node-name"),
            "missing node name: {sources:?}"
        );
        assert!(sources.contains(&"--handshake-listen"));
        assert!(sources.contains(&"--connect-timeout"));
        assert!(sources.contains(&"SPIFFE_ENDPOINT_SOCKET"));
        assert!(sources.iter().any(|s| s.ends_with("meshauth.yaml: mode")));
        assert!(
            sources
                .iter()
                .any(|s| s.ends_with("meshauth.yaml: reauthFraction"))
        );
        assert!(
            sources
                .iter()
                .any(|s| s.ends_with("meshauth.yaml: sweepCron"))
        );
        assert!(
            sources
                .iter()
                .any(|s| s.ends_with("meshauth.yaml: identityQuarantine"))
        );
        let text = err.to_string();
        assert!(
            text.contains("8 invalid configuration value(s)") && text.contains("enforce or audit"),
            "{text}"
        );
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "nodeName: from-file\nmode: audit\ntrustDomain: file.example\n",
        )
        .unwrap();
        let layers = Layers {
            flags: vec![("node-name", "from-flag".into())],
            env: vec![
                ("NODE_NAME".into(), "from-env".into()),
                ("MESHAUTH_TRUST_DOMAIN".into(), "env.example".into()),
            ],
            file: Some((path.clone(), read_file(&path).unwrap())),
        };
        let c = build(&layers).unwrap();
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.trust_domain, "env.example");
        assert_eq!(c.mode, Mode::Audit);
    }

    #[test]
    fn unknown_file_keys_and_bad_yaml_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "nodeNmae: typo\n").unwrap();
        let e = read_file(&path).unwrap_err().to_string();
        assert!(e.contains("nodeNmae"), "{e}");
        std::fs::write(&path, ": : :\n").unwrap();
        assert!(read_file(&path).is_err());
    }

    #[test]
    fn delegated_source_needs_selectors() {
        let err = build(&flags(&[
            ("node-name", "a"),
            ("identity-source", "delegated"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("needs selectors"), "{err}");
        let c = build(&flags(&[
            ("node-name", "a"),
            ("identity-source", "delegated"),
            ("spire-socket", "unix:///run/spire/admin.sock"),
            ("spire-selector", "k8s:ns:meshauth,k8s:sa:agent"),
        ]))
        .unwrap();
        assert_eq!(
            c.identity_source,
            IdentitySource::DelegatedIdentity {
                socket: "/run/spire/admin.sock".into(),
                selectors: vec!["k8s:ns:meshauth".into(), "k8s:sa:agent".into()]
            }
        );
    }

    #[test]
    fn identity_quarantine_from_flag_env_file_and_its_bounds() {
        let c = build(&flags(&[("node-name", "n"), ("identity-quarantine", "2h")])).unwrap();
        assert_eq!(c.identity_quarantine, Duration::from_secs(7200));
        let layers = Layers {
            flags: vec![("node-name", "n".into())],
            env: vec![("MESHAUTH_IDENTITY_QUARANTINE".into(), "75m".into())],
            file: None,
        };
        assert_eq!(
            build(&layers).unwrap().identity_quarantine,
            Duration::from_secs(75 * 60)
        );
        for bad in ["74m", "1h", "721h", "soon", "0s"] {
            let e = build(&flags(&[("node-name", "n"), ("identity-quarantine", bad)])).unwrap_err();
            assert_eq!(e.0.len(), 1, "{bad}: {e}");
            assert_eq!(e.0[0].source, "--identity-quarantine");
            assert!(e.0[0].reason.contains("SVID TTL"), "{e}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("x5s"), None);
    }
}
