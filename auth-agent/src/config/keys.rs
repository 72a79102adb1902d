//! The agent's settings: for each its flag, environment variable and file
//! key.

use super::Key;

/// [`super::Config::node_name`].
pub const NODE_NAME: Key = Key::new("node-name", "NODE_NAME", "nodeName");
/// [`super::Config::trust_domain`].
pub const TRUST_DOMAIN: Key = Key::new("trust-domain", "MESHAUTH_TRUST_DOMAIN", "trustDomain");
/// `workload`, `delegated` or `delegated-pods`.
pub const IDENTITY_SOURCE: Key = Key::new(
    "identity-source",
    "MESHAUTH_IDENTITY_SOURCE",
    "identitySource",
);
/// Workload API or admin socket.
pub const SPIRE_SOCKET: Key = Key::new("spire-socket", "SPIFFE_ENDPOINT_SOCKET", "spireSocket");
/// Delegated Identity API selectors, comma-separated (a list in the file).
pub const SPIRE_SELECTORS: Key = Key::new(
    "spire-selector",
    "MESHAUTH_SPIRE_SELECTORS",
    "spireSelectors",
);
/// `kubernetes` or a directory path.
pub const POLICY_SOURCE: Key = Key::new("policy-source", "MESHAUTH_POLICY_SOURCE", "policySource");
/// [`super::Config::policy_poll_interval`].
pub const POLICY_POLL_INTERVAL: Key = Key::new(
    "policy-poll-interval",
    "MESHAUTH_POLICY_POLL_INTERVAL",
    "policyPollInterval",
);
/// [`super::Config::bpf_pin_dir`].
pub const BPF_PIN_DIR: Key = Key::new("bpf-pin-dir", "MESHAUTH_BPF_PIN_DIR", "bpfPinDir");
/// [`super::Config::pods_cgroup`]; `auto` to detect.
pub const PODS_CGROUP: Key = Key::new("pods-cgroup", "MESHAUTH_PODS_CGROUP", "podsCgroup");
/// `enforce` or `audit`.
pub const MODE: Key = Key::new("mode", "MESHAUTH_MODE", "mode");
/// [`super::Config::handshake_listen`].
pub const HANDSHAKE_LISTEN: Key = Key::new(
    "handshake-listen",
    "MESHAUTH_HANDSHAKE_LISTEN",
    "handshakeListen",
);
/// [`super::Config::connect_timeout`].
pub const CONNECT_TIMEOUT: Key = Key::new(
    "connect-timeout",
    "MESHAUTH_CONNECT_TIMEOUT",
    "connectTimeout",
);
/// [`super::Config::handshake_timeout`].
pub const HANDSHAKE_TIMEOUT: Key = Key::new(
    "handshake-timeout",
    "MESHAUTH_HANDSHAKE_TIMEOUT",
    "handshakeTimeout",
);
/// [`super::Config::handshake_tls_timeout`].
pub const HANDSHAKE_TLS_TIMEOUT: Key = Key::new(
    "handshake-tls-timeout",
    "MESHAUTH_HANDSHAKE_TLS_TIMEOUT",
    "handshakeTlsTimeout",
);
/// [`super::Config::max_concurrent_handshakes`].
pub const MAX_CONCURRENT_HANDSHAKES: Key = Key::new(
    "max-concurrent-handshakes",
    "MESHAUTH_MAX_CONCURRENT_HANDSHAKES",
    "maxConcurrentHandshakes",
);
/// [`super::Config::auth_map_capacity`].
pub const AUTH_MAP_CAPACITY: Key = Key::new(
    "auth-map-capacity",
    "MESHAUTH_AUTH_MAP_CAPACITY",
    "authMapCapacity",
);
/// [`super::Config::ipcache_capacity`].
pub const IPCACHE_CAPACITY: Key = Key::new(
    "ipcache-capacity",
    "MESHAUTH_IPCACHE_CAPACITY",
    "ipcacheCapacity",
);
/// [`super::Config::max_handshakes_per_source`].
pub const MAX_HANDSHAKES_PER_SOURCE: Key = Key::new(
    "max-handshakes-per-source",
    "MESHAUTH_MAX_HANDSHAKES_PER_SOURCE",
    "maxHandshakesPerSource",
);
/// [`super::Config::shutdown_grace`].
pub const SHUTDOWN_GRACE: Key =
    Key::new("shutdown-grace", "MESHAUTH_SHUTDOWN_GRACE", "shutdownGrace");
/// [`super::Config::metrics_listen`].
pub const METRICS_LISTEN: Key =
    Key::new("metrics-listen", "MESHAUTH_METRICS_LISTEN", "metricsListen");
/// [`super::Config::api_socket`].
pub const API_SOCKET: Key = Key::new("api-socket", "MESHAUTH_API_SOCKET", "apiSocket");
/// [`super::Config::state_dir`].
pub const STATE_DIR: Key = Key::new("state-dir", "MESHAUTH_STATE_DIR", "stateDir");
/// [`super::Config::reauth_fraction`].
pub const REAUTH_FRACTION: Key = Key::new(
    "reauth-fraction",
    "MESHAUTH_REAUTH_FRACTION",
    "reauthFraction",
);
/// [`super::Config::sweep_cron`].
pub const SWEEP_CRON: Key = Key::new("sweep-cron", "MESHAUTH_SWEEP_CRON", "sweepCron");
/// [`super::Config::identity_quarantine`].
pub const IDENTITY_QUARANTINE: Key = Key::new(
    "identity-quarantine",
    "MESHAUTH_IDENTITY_QUARANTINE",
    "identityQuarantine",
);
/// [`super::Config::wireguard`].
pub const WIREGUARD: Key = Key::new("wireguard", "MESHAUTH_WIREGUARD", "wireguard");
/// [`super::Config::wireguard_interface`].
pub const WIREGUARD_INTERFACE: Key = Key::new(
    "wireguard-interface",
    "MESHAUTH_WIREGUARD_INTERFACE",
    "wireguardInterface",
);
/// [`super::Config::wireguard_port`].
pub const WIREGUARD_PORT: Key =
    Key::new("wireguard-port", "MESHAUTH_WIREGUARD_PORT", "wireguardPort");
/// [`super::Config::wireguard_mtu`].
pub const WIREGUARD_MTU: Key = Key::new("wireguard-mtu", "MESHAUTH_WIREGUARD_MTU", "wireguardMtu");
/// [`super::Config::wireguard_key_rotation`].
pub const WIREGUARD_KEY_ROTATION: Key = Key::new(
    "wireguard-key-rotation",
    "MESHAUTH_WIREGUARD_KEY_ROTATION",
    "wireguardKeyRotation",
);
/// [`super::Config::wireguard_refresh`].
pub const WIREGUARD_REFRESH: Key = Key::new(
    "wireguard-refresh",
    "MESHAUTH_WIREGUARD_REFRESH",
    "wireguardRefresh",
);
/// `pass` or `drop`: [`super::Config::drop_unknown_pods`].
pub const UNKNOWN_PODS: Key = Key::new("unknown-pods", "MESHAUTH_UNKNOWN_PODS", "unknownPods");
/// [`super::Config::source_check`].
pub const SOURCE_CHECK: Key = Key::new("source-check", "MESHAUTH_SOURCE_CHECK", "sourceCheck");
/// `NAMESPACE/NAME` or `off`: [`super::Config::policy_status_lease`].
pub const POLICY_STATUS_LEASE: Key = Key::new(
    "policy-status-lease",
    "MESHAUTH_POLICY_STATUS_LEASE",
    "policyStatusLease",
);
/// [`super::Config::policy_status_lease_duration`].
pub const POLICY_STATUS_LEASE_DURATION: Key = Key::new(
    "policy-status-lease-duration",
    "MESHAUTH_POLICY_STATUS_LEASE_DURATION",
    "policyStatusLeaseDuration",
);
/// `plain` or `json`.
pub const LOG_FORMAT: Key = Key::new("log-format", "MESHAUTH_LOG_FORMAT", "logFormat");

/// Every setting.
pub const ALL: &[Key] = &[
    NODE_NAME,
    TRUST_DOMAIN,
    IDENTITY_SOURCE,
    SPIRE_SOCKET,
    SPIRE_SELECTORS,
    POLICY_SOURCE,
    POLICY_POLL_INTERVAL,
    BPF_PIN_DIR,
    PODS_CGROUP,
    MODE,
    HANDSHAKE_LISTEN,
    CONNECT_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    HANDSHAKE_TLS_TIMEOUT,
    MAX_CONCURRENT_HANDSHAKES,
    MAX_HANDSHAKES_PER_SOURCE,
    AUTH_MAP_CAPACITY,
    IPCACHE_CAPACITY,
    SHUTDOWN_GRACE,
    METRICS_LISTEN,
    API_SOCKET,
    STATE_DIR,
    REAUTH_FRACTION,
    SWEEP_CRON,
    IDENTITY_QUARANTINE,
    WIREGUARD,
    WIREGUARD_INTERFACE,
    WIREGUARD_PORT,
    WIREGUARD_MTU,
    WIREGUARD_KEY_ROTATION,
    WIREGUARD_REFRESH,
    UNKNOWN_PODS,
    SOURCE_CHECK,
    POLICY_STATUS_LEASE,
    POLICY_STATUS_LEASE_DURATION,
    LOG_FORMAT,
];
