//! The agent's configuration: one `Config` and its settings — keys,
//! defaults, validators — built by a pure function ([`build`]) from
//! command-line flags, environment variables and a YAML file. Flags win over
//! the environment, the environment over the file, the file over defaults;
//! every invalid value is reported at once, each naming where it came from
//! (the layering is [`layers`], which knows none of these settings).
//! Durations are read and printed in the project's one grammar
//! ([`meshauth_duration`]: `500ms`, `90s`, `1h30m`), so the effective
//! configuration logged at start parses back.

pub mod keys;
pub mod layers;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshauth_duration::{format_duration, parse_duration};
use serde::{Deserialize, Serialize};

use layers::Resolver;
pub use layers::{ConfigErrors, File, Invalid, Key, Layers};

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
    /// SPIRE's Delegated Identity API, one subscription per pod on this
    /// node by the PID of one of its processes: SPIRE attests the pod, and
    /// only the pod's own identity is taken. Needs the host's PID namespace
    /// (the PIDs are the SPIRE agent's) and the pods' cgroups.
    DelegatedPods {
        /// The admin socket.
        socket: PathBuf,
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
    #[serde(with = "meshauth_duration::serde")]
    pub connect_timeout: Duration,
    /// Handshake timeout.
    #[serde(with = "meshauth_duration::serde")]
    pub handshake_timeout: Duration,
    /// The responder's bound on the TLS handshake alone (ClientHello to
    /// Finished); at most `handshake_timeout`.
    #[serde(with = "meshauth_duration::serde")]
    pub handshake_tls_timeout: Duration,
    /// Handshakes served at once.
    pub max_concurrent_handshakes: usize,
    /// Authenticated pairs the auth map holds.
    pub auth_map_capacity: u32,
    /// Addresses (pods and nodes of the whole cluster) the ipcache holds.
    pub ipcache_capacity: u32,
    /// Connections the responder holds from one source address at once.
    pub max_handshakes_per_source: usize,
    /// On shutdown, how long handshakes in flight and the agent's tasks may
    /// take to finish before they are cancelled.
    #[serde(with = "meshauth_duration::serde")]
    pub shutdown_grace: Duration,
    /// How often a manifest directory is checked for changes.
    #[serde(with = "meshauth_duration::serde")]
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
    #[serde(with = "meshauth_duration::serde")]
    pub identity_quarantine: Duration,
    /// WireGuard on or off.
    pub wireguard: bool,
    /// The WireGuard interface the agent owns.
    pub wireguard_interface: String,
    /// WireGuard's UDP port (the same on every node).
    pub wireguard_port: u16,
    /// The interface's MTU; `None`: the underlay's minus 80.
    pub wireguard_mtu: Option<u32>,
    /// Rotate the WireGuard key this often; `None`: only on demand
    /// (`meshauth wireguard rotate-key`).
    #[serde(with = "meshauth_duration::serde::option")]
    pub wireguard_key_rotation: Option<Duration>,
    /// How often the interface is read back (status, drift repair).
    #[serde(with = "meshauth_duration::serde")]
    pub wireguard_refresh: Duration,
    /// Strict mode: drop traffic of pod addresses not known yet (a pod the
    /// agent has not learned of) instead of passing it unenforced.
    pub drop_unknown_pods: bool,
    /// Check on egress that each pod sends only from its own addresses (its
    /// cgroup, found by pod UID, owns them); a spoofed source is dropped
    /// with 132 "Invalid source ip".
    pub source_check: bool,
    /// Kubernetes: the Lease (namespace, name) electing the one agent
    /// that writes policy status; `None`: no agent writes it.
    pub policy_status_lease: Option<(String, String)>,
    /// How long a leader that stopped renewing keeps that Lease.
    #[serde(with = "meshauth_duration::serde")]
    pub policy_status_lease_duration: Duration,
    /// Log format.
    pub log_format: LogFormat,
}

/// Default quarantine of a freed identity number: SPIRE's default 1 h
/// X.509-SVID TTL plus 30 minutes.
pub const DEFAULT_IDENTITY_QUARANTINE: Duration = policy_bridge::identity::DEFAULT_QUARANTINE;
/// The shortest quarantine accepted: SPIRE's default TTL plus 15 minutes.
pub const MIN_IDENTITY_QUARANTINE: Duration = Duration::from_secs(75 * 60);
/// The longest quarantine accepted (30 days).
pub const MAX_IDENTITY_QUARANTINE: Duration = Duration::from_secs(720 * 3600);

/// The auth map's capacity when not set: the datapath object's (131,072 pairs).
pub const DEFAULT_AUTH_MAP_CAPACITY: u32 = 131_072;

/// The ipcache's capacity when not set: the datapath object's (65,536
/// addresses: every pod and node of the cluster).
pub const DEFAULT_IPCACHE_CAPACITY: u32 = 65_536;

/// Default Workload API socket (SPIRE's default agent socket).
pub const DEFAULT_SPIRE_SOCKET: &str = "/run/spire/sockets/agent.sock";

/// Reads the configuration file (YAML, the camelCase keys of [`keys`]);
/// unknown keys are refused, all at once.
pub fn read_file(path: &Path) -> Result<File, ConfigErrors> {
    let known: Vec<&str> = keys::ALL.iter().map(|k| k.file).collect();
    File::read(path, &known)
}

/// Builds the effective configuration from `layers`, or every invalid value.
pub fn build(layers: &Layers) -> Result<Config, ConfigErrors> {
    let mut r = Resolver::new(layers);

    let node_name = match r.raw(&keys::NODE_NAME) {
        Some(v) if is_dns_name(&v.text) => v.text,
        Some(v) => {
            r.invalid(
                &v,
                "a node name is a DNS-1123 subdomain (lowercase letters, digits, '-', '.')",
            );
            String::new()
        }
        None => {
            r.invalid_at(
                "--node-name",
                "",
                "required (set NODE_NAME from the pod's spec.nodeName)",
            );
            String::new()
        }
    };
    let trust_domain = r.get(
        &keys::TRUST_DOMAIN,
        svid_cache::DEFAULT_TRUST_DOMAIN.to_owned(),
        |v| {
            svid_cache::TrustDomain::new(v)
                .map(|_| v.to_owned())
                .map_err(|e| e.to_string())
        },
    );

    let socket = r.get(
        &keys::SPIRE_SOCKET,
        PathBuf::from(DEFAULT_SPIRE_SOCKET),
        |v| {
            let p = v
                .strip_prefix("unix://")
                .unwrap_or(v.strip_prefix("unix:").unwrap_or(v));
            if p.starts_with('/') {
                Ok(PathBuf::from(p))
            } else {
                Err("an absolute unix socket path (unix:///run/spire/sockets/agent.sock)".into())
            }
        },
    );
    let identity_source = match r.raw(&keys::IDENTITY_SOURCE) {
        None => IdentitySource::WorkloadApi { socket },
        Some(v) => match v.text.to_ascii_lowercase().as_str() {
            "workload" => IdentitySource::WorkloadApi { socket },
            "delegated-pods" => {
                if let Some(given) = r.raw(&keys::SPIRE_SELECTORS) {
                    r.invalid(
                        &given,
                        "delegated-pods attests each pod by its PID; selectors are for the delegated source",
                    );
                }
                IdentitySource::DelegatedPods { socket }
            }
            "delegated" => {
                let given = r.raw(&keys::SPIRE_SELECTORS);
                let selectors: Vec<String> = given
                    .as_ref()
                    .map(|s| {
                        s.text
                            .split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default();
                if selectors.is_empty() {
                    r.invalid(
                        &v,
                        "the delegated source needs selectors (--spire-selector k8s:ns:meshauth,...)",
                    );
                }
                if let Some(given) = &given {
                    for s in selectors.iter().filter(|s| !s.contains(':')) {
                        r.invalid(given, format!("{s:?} is not a selector: type:value"));
                    }
                }
                IdentitySource::DelegatedIdentity { socket, selectors }
            }
            _ => {
                r.invalid(&v, "workload, delegated or delegated-pods");
                IdentitySource::WorkloadApi { socket }
            }
        },
    };

    let policy_source = r.get(&keys::POLICY_SOURCE, PolicySource::Kubernetes, |v| {
        if v == "kubernetes" {
            return Ok(PolicySource::Kubernetes);
        }
        let path = PathBuf::from(v.strip_prefix("dir:").unwrap_or(v));
        if path.is_absolute() {
            Ok(PolicySource::Directory { path })
        } else {
            Err("kubernetes, or an absolute directory path".into())
        }
    });

    let bpf_pin_dir = r.get(
        &keys::BPF_PIN_DIR,
        auth_ebpf::DEFAULT_PIN_DIR.into(),
        absolute_path,
    );
    let api_socket = r.get(
        &keys::API_SOCKET,
        "/var/run/meshauth/agent.sock".into(),
        absolute_path,
    );
    let state_dir = r.get(&keys::STATE_DIR, "/var/lib/meshauth".into(), absolute_path);
    let pods_cgroup = r.get(&keys::PODS_CGROUP, None, |v| match v {
        "auto" => Ok(None),
        v if v.starts_with('/') => Ok(Some(PathBuf::from(v))),
        _ => Err("auto, or the absolute path of the pods' cgroup v2".into()),
    });

    let mode = r.get(&keys::MODE, Mode::Enforce, |v| match v {
        "enforce" => Ok(Mode::Enforce),
        "audit" => Ok(Mode::Audit),
        _ => Err("enforce or audit".into()),
    });
    let log_format = r.get(&keys::LOG_FORMAT, LogFormat::Plain, |v| match v {
        "plain" => Ok(LogFormat::Plain),
        "json" => Ok(LogFormat::Json),
        _ => Err("plain or json".into()),
    });

    let handshake_listen = r.get(
        &keys::HANDSHAKE_LISTEN,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 4250),
        listen_addr,
    );
    let metrics_listen = r.get(
        &keys::METRICS_LISTEN,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9964),
        listen_addr,
    );

    let timeout = |v: &str| {
        duration_in(
            v,
            Duration::from_millis(100)..=Duration::from_secs(120),
            "a duration between 100ms and 120s (500ms, 5s, 1m)",
        )
    };
    let connect_timeout = r.get(&keys::CONNECT_TIMEOUT, Duration::from_secs(5), timeout);
    let handshake_timeout = r.get(&keys::HANDSHAKE_TIMEOUT, Duration::from_secs(5), timeout);
    let mut handshake_tls_timeout = r.get(
        &keys::HANDSHAKE_TLS_TIMEOUT,
        Duration::from_secs(1),
        timeout,
    );
    if handshake_tls_timeout > handshake_timeout {
        match r.raw(&keys::HANDSHAKE_TLS_TIMEOUT) {
            Some(v) => r.invalid(
                &v,
                format!(
                    "at most the handshake timeout ({}): it bounds the TLS part of the handshake",
                    format_duration(handshake_timeout)
                ),
            ),
            // Only the overall timeout was lowered: the TLS part follows it.
            None => handshake_tls_timeout = handshake_timeout,
        }
    }
    let shutdown_grace = r.get(&keys::SHUTDOWN_GRACE, Duration::from_secs(5), timeout);
    let policy_poll_interval = r.get(&keys::POLICY_POLL_INTERVAL, Duration::from_secs(1), timeout);

    let handshakes = |v: &str| match v.parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err("a whole number from 1 to 100000".to_owned()),
    };
    let max_concurrent_handshakes = r.get(&keys::MAX_CONCURRENT_HANDSHAKES, 256, handshakes);
    let max_handshakes_per_source = r.get(
        &keys::MAX_HANDSHAKES_PER_SOURCE,
        crate::handshake::DEFAULT_MAX_PER_SOURCE,
        handshakes,
    );
    let auth_map_capacity = r.get(
        &keys::AUTH_MAP_CAPACITY,
        DEFAULT_AUTH_MAP_CAPACITY,
        |v| match v.parse::<u32>() {
            Ok(n) if (2..=4 * 1024 * 1024).contains(&n) => Ok(n),
            _ => Err("a number of pairs from 2 to 4194304".into()),
        },
    );
    let ipcache_capacity = r.get(
        &keys::IPCACHE_CAPACITY,
        DEFAULT_IPCACHE_CAPACITY,
        |v| match v.parse::<u32>() {
            Ok(n) if (1024..=16 * 1024 * 1024).contains(&n) => Ok(n),
            _ => Err("a number of addresses from 1024 to 16777216".into()),
        },
    );
    let reauth_fraction = r.get(&keys::REAUTH_FRACTION, 2.0 / 3.0, |v| {
        match v.parse::<f64>() {
            Ok(f) if (0.1..=0.95).contains(&f) => Ok(f),
            _ => Err("a fraction from 0.1 to 0.95 of the pair's lifetime".into()),
        }
    });
    let sweep_cron = r.get(&keys::SWEEP_CRON, "0 * * * * *".to_owned(), |v| {
        if v.split_whitespace().count() == 6 {
            Ok(v.to_owned())
        } else {
            Err("a cron expression of 6 fields, seconds first (0 * * * * *)".into())
        }
    });
    let identity_quarantine = r.get(
        &keys::IDENTITY_QUARANTINE,
        DEFAULT_IDENTITY_QUARANTINE,
        |v| {
            duration_in(
                v,
                MIN_IDENTITY_QUARANTINE..=MAX_IDENTITY_QUARANTINE,
                "a duration from 75m to 720h, at least the longest X.509-SVID TTL plus margin (90m for SPIRE's default 1h TTL)",
            )
        },
    );
    let wireguard = r.get(&keys::WIREGUARD, false, |v| match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("true or false".into()),
    });
    let wireguard_interface = r.get(
        &keys::WIREGUARD_INTERFACE,
        crate::wireguard::DEFAULT_INTERFACE.to_owned(),
        |v| {
            let ok = !v.is_empty()
                && v.len() <= 15
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if ok {
                Ok(v.to_owned())
            } else {
                Err("an interface name: 1 to 15 of [A-Za-z0-9_.-]".into())
            }
        },
    );
    let wireguard_port = r.get(
        &keys::WIREGUARD_PORT,
        crate::wireguard::DEFAULT_PORT,
        |v| match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err("a UDP port from 1 to 65535".into()),
        },
    );
    let wireguard_mtu = r.get(&keys::WIREGUARD_MTU, None, |v| match v {
        "auto" | "0" => Ok(None),
        _ => match v.parse::<u32>() {
            Ok(m) if (1280..=65455).contains(&m) => Ok(Some(m)),
            _ => Err("auto (the underlay's MTU minus 80) or 1280..=65455".into()),
        },
    });
    let wireguard_key_rotation = r.get(&keys::WIREGUARD_KEY_ROTATION, None, |v| match v {
        "0" | "off" => Ok(None),
        _ => duration_in(
            v,
            Duration::from_secs(60)..=Duration::from_secs(365 * 24 * 3600),
            "off, or a duration from 1m to 8760h (720h = 30 days)",
        )
        .map(Some),
    });
    let wireguard_refresh = r.get(&keys::WIREGUARD_REFRESH, Duration::from_secs(10), |v| {
        duration_in(
            v,
            Duration::from_millis(500)..=Duration::from_secs(600),
            "a duration from 500ms to 10m",
        )
    });
    let drop_unknown_pods = r.get(&keys::UNKNOWN_PODS, false, |v| match v {
        "pass" => Ok(false),
        "drop" => Ok(true),
        _ => Err("pass (traffic of pods not known yet is not enforced) or drop (strict)".into()),
    });
    let source_check = r.get(&keys::SOURCE_CHECK, true, |v| match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("true (each pod may send only from its own addresses) or false".into()),
    });
    let policy_status_lease = r.get(&keys::POLICY_STATUS_LEASE, None, |v| {
        if v == "off" {
            return Ok(None);
        }
        match v.split_once('/') {
            Some((ns, name)) if is_dns_label(ns) && is_dns_name(name) => {
                Ok(Some((ns.to_owned(), name.to_owned())))
            }
            _ => Err("off, or NAMESPACE/NAME of a Lease (lowercase DNS names)".into()),
        }
    });
    let policy_status_lease_duration = r.get(
        &keys::POLICY_STATUS_LEASE_DURATION,
        Duration::from_secs(15),
        |v| {
            duration_in(
                v,
                Duration::from_secs(2)..=Duration::from_secs(300),
                "a duration from 2s to 5m",
            )
        },
    );

    r.finish()?;
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
        auth_map_capacity,
        ipcache_capacity,
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
        wireguard_interface,
        wireguard_port,
        wireguard_mtu,
        wireguard_key_rotation,
        wireguard_refresh,
        drop_unknown_pods,
        source_check,
        policy_status_lease,
        policy_status_lease_duration,
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

fn is_dns_label(s: &str) -> bool {
    !s.contains('.') && s.len() <= 63 && is_dns_name(s)
}

fn absolute_path(v: &str) -> Result<PathBuf, String> {
    if v.starts_with('/') {
        Ok(PathBuf::from(v))
    } else {
        Err("an absolute path".into())
    }
}

fn listen_addr(v: &str) -> Result<SocketAddr, String> {
    match v.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        _ => Err("ip:port with a non-zero port ([::]:4250, 0.0.0.0:9964)".into()),
    }
}

/// A duration of the project's grammar ([`meshauth_duration`]) within
/// `range`; `expected` says what would be right.
fn duration_in(
    v: &str,
    range: RangeInclusive<Duration>,
    expected: &str,
) -> Result<Duration, String> {
    match parse_duration(v) {
        Ok(d) if range.contains(&d) => Ok(d),
        Ok(_) => Err(expected.to_owned()),
        Err(e) => Err(format!("{expected}; {e}")),
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
            file: Some(read_file(&path).unwrap()),
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
            file: Some(read_file(&path).unwrap()),
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
        let c = build(&flags(&[
            ("node-name", "a"),
            ("identity-source", "delegated-pods"),
            ("spire-socket", "unix:///run/spire/admin.sock"),
        ]))
        .unwrap();
        assert_eq!(
            c.identity_source,
            IdentitySource::DelegatedPods {
                socket: "/run/spire/admin.sock".into()
            }
        );
        let err = build(&flags(&[
            ("node-name", "a"),
            ("identity-source", "delegated-pods"),
            ("spire-selector", "k8s:ns:meshauth"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("by its PID"), "{err}");
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

    /// The inputs spire-dev's `--ttl` is tested with too
    /// (`spire-dev/src/cli.rs`): one grammar, Go's plus days.
    const DURATIONS_ACCEPTED: [(&str, Duration); 5] = [
        ("1h30m", Duration::from_secs(5400)),
        ("90m", Duration::from_secs(5400)),
        ("1.5h", Duration::from_secs(5400)),
        ("5400s", Duration::from_secs(5400)),
        ("5400000ms", Duration::from_secs(5400)),
    ];
    const DURATIONS_REFUSED: [&str; 6] = ["forever", "90", "1h 30m", "-90m", "90y", "h30m"];

    #[test]
    fn durations_are_the_project_grammar_and_garbage_is_named() {
        for (input, want) in DURATIONS_ACCEPTED {
            let c = build(&flags(&[
                ("node-name", "n"),
                ("identity-quarantine", input),
            ]))
            .unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(c.identity_quarantine, want, "{input}");
        }
        let c = build(&flags(&[
            ("node-name", "n"),
            ("connect-timeout", "1.5s"),
            ("identity-quarantine", "2d"),
        ]))
        .unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert_eq!(c.identity_quarantine, Duration::from_secs(48 * 3600));
        for input in DURATIONS_REFUSED {
            let e = build(&flags(&[
                ("node-name", "n"),
                ("identity-quarantine", input),
            ]))
            .unwrap_err();
            assert_eq!(e.0.len(), 1, "{input}: {e}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("--identity-quarantine = {input:?}"))
                    && text.contains(&format!("parse_duration({input:?})"))
                    && text.contains("a duration from 75m to 720h"),
                "{text}"
            );
        }
    }

    #[test]
    fn the_logged_effective_config_prints_durations_that_parse_back() {
        let c = build(&flags(&[
            ("node-name", "n"),
            ("handshake-timeout", "1.5s"),
            ("identity-quarantine", "1h30m"),
        ]))
        .unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["identity_quarantine"], "1h30m");
        assert_eq!(json["handshake_timeout"], "1s500ms");
        for (field, want) in [
            ("connect_timeout", c.connect_timeout),
            ("handshake_timeout", c.handshake_timeout),
            ("handshake_tls_timeout", c.handshake_tls_timeout),
            ("shutdown_grace", c.shutdown_grace),
            ("policy_poll_interval", c.policy_poll_interval),
            ("identity_quarantine", c.identity_quarantine),
        ] {
            let printed = json[field].as_str().unwrap();
            assert_eq!(parse_duration(printed), Ok(want), "{field} = {printed}");
        }
    }

    #[test]
    fn file_values_of_any_type_are_validated_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "nodeName: n\nconnectTimeout: 5\nwireguard: maybe\nspireSelectors: [k8s:ns:a, b]\nidentitySource: delegated\n",
        )
        .unwrap();
        let layers = Layers {
            file: Some(read_file(&path).unwrap()),
            ..Layers::default()
        };
        let e = build(&layers).unwrap_err();
        let got: Vec<(String, &str)> =
            e.0.iter()
                .map(|i| {
                    let key = i.source.rsplit(": ").next().unwrap_or_default().to_owned();
                    (key, i.value.as_str())
                })
                .collect();
        assert_eq!(
            got,
            [
                ("spireSelectors".to_owned(), "k8s:ns:a,b"),
                ("connectTimeout".to_owned(), "5"),
                ("wireguard".to_owned(), "maybe"),
            ],
            "{e}"
        );
        assert!(e.0[1].reason.contains("has no unit"), "{e}");
    }

    #[test]
    fn every_setting_has_its_own_flag_variable_and_file_key() {
        for (i, a) in keys::ALL.iter().enumerate() {
            for b in &keys::ALL[i + 1..] {
                assert!(
                    a.flag != b.flag && a.env != b.env && a.file != b.file,
                    "{a:?} and {b:?} share a name"
                );
            }
        }
    }
}
