//! The typed settings and their validation.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How nodes and workloads are attested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deployment {
    /// `join_token` nodes, `unix` workloads.
    Standalone,
    /// `k8s_psat` nodes, `k8s` workloads.
    Kubernetes {
        /// The cluster's name (the psat plugin's key).
        cluster: String,
        /// The SPIRE agents' service account, `namespace:name`.
        agent_service_account: String,
    },
}

/// SPIRE's datastore (the `sql` plugin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataStore {
    /// One file; one server only.
    Sqlite3 {
        /// The database file.
        path: PathBuf,
    },
    /// A postgres database shared by every server replica.
    Postgres {
        /// libpq connection string (may hold a password: the rendered file
        /// is written 0600 by `meshauth spire render`).
        connection_string: String,
    },
    /// The database's settings in a file of their own, which SPIRE reads
    /// (`plugin_data_file`): `database_type` and `connection_string`
    /// ([`crate::render_sql_plugin_data`]), kept in a Secret, so the
    /// configuration itself (a ConfigMap) holds no password.
    SqlFile {
        /// The plugin data file, as the server sees it.
        plugin_data_file: PathBuf,
    },
}

/// The server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Where agents reach it.
    pub bind_address: IpAddr,
    /// Its port (8081).
    pub bind_port: u16,
    /// Its local admin API socket (the registration reconciler uses it).
    pub socket_path: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Server replicas.
    pub replicas: u32,
    /// The datastore.
    pub datastore: DataStore,
    /// The CA's lifetime.
    pub ca_ttl: Duration,
    /// X.509-SVIDs' lifetime.
    pub svid_ttl: Duration,
    /// The health check port (`/live`, `/ready`).
    pub health_port: u16,
    /// Agents' own SVID lifetime (`agent_ttl`; None: SPIRE's default, the
    /// X.509-SVID TTL). An agent whose SVID expires while the server is
    /// unreachable must attest again, which a join-token agent cannot do
    /// (a token is used once): make it longer than the longest server
    /// outage to ride out.
    pub agent_ttl: Option<Duration>,
    /// Kubernetes: the ConfigMap (`namespace`, `name`) the server keeps the
    /// trust bundle in (SPIRE's `k8sbundle` notifier), which the agents
    /// mount as their bootstrap bundle. None: no notifier.
    pub bundle_config_map: Option<(String, String)>,
}

/// The agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// The server's address as agents dial it.
    pub server_address: String,
    /// The server's port.
    pub server_port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The Workload API socket.
    pub socket_path: PathBuf,
    /// The admin socket (Delegated Identity API), if meshauth uses it.
    pub admin_socket_path: Option<PathBuf>,
    /// The trust bundle it bootstraps from.
    pub trust_bundle_path: PathBuf,
    /// SPIFFE IDs allowed on the Delegated Identity API (meshauth's).
    pub authorized_delegates: Vec<String>,
    /// The health check port.
    pub health_port: u16,
    /// How often the agent syncs its entries and SVIDs with the server
    /// (SPIRE's `experimental.sync_interval`; None: SPIRE's 5 s). Shorter
    /// means a new or removed entry reaches workloads sooner, at the cost
    /// of more calls to the server.
    pub sync_interval: Option<Duration>,
}

/// Everything rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The trust domain (`example.org`).
    pub trust_domain: String,
    /// How nodes and workloads are attested.
    pub deployment: Deployment,
    /// The server.
    pub server: ServerSettings,
    /// The agents.
    pub agent: AgentSettings,
}

/// The problems found, all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} invalid SPIRE setting(s):\n  {}", .0.len(), .0.join("\n  "))]
pub struct SettingsError(pub Vec<String>);

impl Settings {
    /// Defaults for `trust_domain` and `deployment`: the paths of SPIRE's
    /// own examples under `/run/spire` and `/var/lib/spire`, sqlite3, one
    /// server, CA 24 h, SVIDs 1 h.
    pub fn new(trust_domain: &str, deployment: Deployment) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            deployment: deployment.clone(),
            server: ServerSettings {
                bind_address: IpAddr::from([0, 0, 0, 0]),
                bind_port: 8081,
                socket_path: "/run/spire/server/private/api.sock".into(),
                data_dir: "/var/lib/spire/server".into(),
                replicas: 1,
                datastore: DataStore::Sqlite3 {
                    path: "/var/lib/spire/server/datastore.sqlite3".into(),
                },
                ca_ttl: Duration::from_secs(24 * 3600),
                svid_ttl: Duration::from_secs(3600),
                health_port: 8080,
                // Join-token agents cannot attest again: ride out a
                // 12-hour server outage. k8s_psat agents can: SPIRE's
                // default.
                agent_ttl: (deployment == Deployment::Standalone)
                    .then_some(Duration::from_secs(12 * 3600)),
                // Beside the agents' service account, as SPIRE's examples.
                bundle_config_map: match &deployment {
                    Deployment::Kubernetes {
                        agent_service_account,
                        ..
                    } => agent_service_account
                        .split_once(':')
                        .map(|(ns, _)| (ns.to_owned(), "spire-bundle".to_owned())),
                    Deployment::Standalone => None,
                },
            },
            agent: AgentSettings {
                server_address: "spire-server".into(),
                server_port: 8081,
                data_dir: "/var/lib/spire/agent".into(),
                socket_path: "/run/spire/sockets/agent.sock".into(),
                admin_socket_path: None,
                trust_bundle_path: "/run/spire/bundle/bundle.crt".into(),
                authorized_delegates: Vec::new(),
                health_port: 8082,
                sync_interval: None,
            },
        }
    }

    /// Every problem at once.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let mut errs = Vec::new();
        if !valid_trust_domain(&self.trust_domain) {
            errs.push(format!(
                "trust domain {:?}: want lowercase letters, digits, '.', '-' and '_' (e.g. example.org)",
                self.trust_domain
            ));
        }
        if let Deployment::Kubernetes {
            cluster,
            agent_service_account,
        } = &self.deployment
        {
            if cluster.is_empty() {
                errs.push("Kubernetes: the cluster name is empty".into());
            }
            if !matches!(agent_service_account.split_once(':'), Some((a, b)) if !a.is_empty() && !b.is_empty())
            {
                errs.push(format!(
                    "Kubernetes: agent service account {agent_service_account:?}: want namespace:name (e.g. spire:spire-agent)"
                ));
            }
        }
        let s = &self.server;
        if let Some((ns, name)) = &s.bundle_config_map
            && (ns.is_empty() || name.is_empty())
        {
            errs.push(format!(
                "bundle ConfigMap {ns:?}/{name:?}: want namespace/name (e.g. spire/spire-bundle)"
            ));
        }
        if s.replicas == 0 {
            errs.push("server replicas: at least 1".into());
        }
        match &s.datastore {
            DataStore::Sqlite3 { .. } if s.replicas > 1 => errs.push(format!(
                "datastore sqlite3 with {} server replicas: each replica would keep its own database and CA; use postgres (one database shared by every replica) or 1 replica",
                s.replicas
            )),
            DataStore::Postgres { connection_string } if connection_string.trim().is_empty() => {
                errs.push("datastore postgres: the connection string is empty".into());
            }
            DataStore::SqlFile { plugin_data_file } if !plugin_data_file.is_absolute() => {
                errs.push(format!(
                    "datastore plugin data file {}: want an absolute path",
                    plugin_data_file.display()
                ));
            }
            _ => {}
        }
        if s.svid_ttl.is_zero() || s.ca_ttl.is_zero() {
            errs.push("CA and SVID TTLs must be above zero".into());
        } else if s.svid_ttl >= s.ca_ttl {
            errs.push(format!(
                "SVID TTL {} is not below the CA TTL {}: SPIRE cannot issue SVIDs that outlive its CA",
                meshauth_duration::format_duration(s.svid_ttl),
                meshauth_duration::format_duration(s.ca_ttl)
            ));
        }
        if s.health_port == s.bind_port {
            errs.push(format!(
                "server health port {} is also its API port",
                s.health_port
            ));
        }
        let a = &self.agent;
        if a.sync_interval
            .is_some_and(|d| d < Duration::from_millis(100))
        {
            errs.push(
                "agent sync interval: at least 100ms (each sync is a call to the server)".into(),
            );
        }
        if let Some(admin) = &a.admin_socket_path {
            let wl_dir = a.socket_path.parent().unwrap_or(Path::new("/"));
            if admin.starts_with(wl_dir) {
                errs.push(format!(
                    "agent admin socket {} is under the Workload API socket's directory {}: every workload that can reach the Workload API could reach the admin API; put it elsewhere (e.g. /run/spire/admin/admin.sock)",
                    admin.display(),
                    wl_dir.display()
                ));
            }
            if a.authorized_delegates.is_empty() {
                errs.push(
                    "agent admin socket set but no authorized delegate: name meshauth's SPIFFE ID"
                        .into(),
                );
            }
        } else if !a.authorized_delegates.is_empty() {
            errs.push("authorized delegates given without an agent admin socket".into());
        }
        for d in &a.authorized_delegates {
            let ok = d
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split_once('/'))
                .is_some_and(|(td, path)| td == self.trust_domain && !path.is_empty());
            if !ok {
                errs.push(format!(
                    "authorized delegate {d:?}: want a SPIFFE ID in trust domain {} (spiffe://{}/…)",
                    self.trust_domain, self.trust_domain
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(SettingsError(errs))
        }
    }
}

impl Settings {
    /// What SPIRE would warn about but accept: an X.509-SVID TTL above a
    /// sixth of the CA TTL (SPIRE prepares the next CA at half of its
    /// lifetime and activates it at five sixths, so an SVID issued later
    /// than that is cut short by the CA's end; SPIRE's own threshold).
    pub fn warnings(&self) -> Vec<String> {
        let s = &self.server;
        let mut w = Vec::new();
        if !s.ca_ttl.is_zero() && s.svid_ttl > s.ca_ttl / 6 {
            w.push(format!(
                "SVID TTL {} is above a sixth of the CA TTL {}: SPIRE will issue some SVIDs with shorter lifetimes; \
                 set the SVID TTL to {} or less, or the CA TTL to {} or more",
                meshauth_duration::format_duration(s.svid_ttl),
                meshauth_duration::format_duration(s.ca_ttl),
                meshauth_duration::format_duration(s.ca_ttl / 6),
                meshauth_duration::format_duration(s.svid_ttl * 6),
            ));
        }
        let agent_ttl = s.agent_ttl.unwrap_or(s.svid_ttl);
        if self.deployment == Deployment::Standalone && agent_ttl <= s.svid_ttl {
            w.push(format!(
                "agent SVID TTL {} (agent_ttl{}) is not above the SVID TTL: a server outage longer than that \
                 strands every join-token agent (its SVID expires and a token cannot be used again); \
                 set agent_ttl longer than the longest outage to ride out",
                meshauth_duration::format_duration(agent_ttl),
                if s.agent_ttl.is_none() { ", SPIRE's default: the SVID TTL" } else { "" },
            ));
        }
        if s.agent_ttl.is_some_and(|t| t > s.ca_ttl) {
            w.push(format!(
                "agent SVID TTL {} is above the CA TTL {}: SPIRE cuts agent SVIDs at the CA's end",
                meshauth_duration::format_duration(agent_ttl),
                meshauth_duration::format_duration(s.ca_ttl),
            ));
        }
        w
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_in_both_deployments() {
        Settings::new("example.org", Deployment::Standalone)
            .validate()
            .unwrap();
        Settings::new(
            "example.org",
            Deployment::Kubernetes {
                cluster: "prod".into(),
                agent_service_account: "spire:spire-agent".into(),
            },
        )
        .validate()
        .unwrap();
    }

    #[test]
    fn an_svid_ttl_above_a_sixth_of_the_ca_ttl_is_warned_about_as_spire_does() {
        let mut s = Settings::new(
            "example.org",
            Deployment::Kubernetes {
                cluster: "c".into(),
                agent_service_account: "spire:spire-agent".into(),
            },
        );
        assert!(s.warnings().is_empty(), "defaults: 1h under 24h");
        s.server.ca_ttl = Duration::from_secs(60);
        s.server.svid_ttl = Duration::from_secs(10);
        assert!(s.warnings().is_empty(), "10s is exactly a sixth of 1m");
        s.server.svid_ttl = Duration::from_secs(11);
        let w = s.warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("10s or less") && w[0].contains("1m6s or more"),
            "{w:?}"
        );
        s.validate().unwrap();
    }

    #[test]
    fn join_token_agents_are_warned_when_an_outage_would_strand_them() {
        let mut s = Settings::new("example.org", Deployment::Standalone);
        assert_eq!(s.server.agent_ttl, Some(Duration::from_secs(12 * 3600)));
        assert!(s.warnings().is_empty(), "{:?}", s.warnings());
        s.server.agent_ttl = None;
        let w = s.warnings();
        assert!(
            w.len() == 1 && w[0].contains("strands every join-token agent"),
            "{w:?}"
        );
        s.server.agent_ttl = Some(Duration::from_secs(48 * 3600));
        let w = s.warnings();
        assert!(w.len() == 1 && w[0].contains("above the CA TTL"), "{w:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut s = Settings::new(
            "Example.ORG",
            Deployment::Kubernetes {
                cluster: String::new(),
                agent_service_account: "spire-agent".into(),
            },
        );
        s.server.replicas = 3;
        s.server.svid_ttl = Duration::from_secs(48 * 3600);
        s.agent.admin_socket_path = Some("/run/spire/sockets/admin.sock".into());
        s.agent.authorized_delegates = vec!["spiffe://other.org/meshauth".into()];
        let e = s.validate().unwrap_err();
        let text = e.to_string();
        for needle in [
            "trust domain \"Example.ORG\"",
            "cluster name is empty",
            "want namespace:name",
            "sqlite3 with 3 server replicas",
            "use postgres",
            "SVID TTL 48h is not below the CA TTL 24h",
            "is under the Workload API socket's directory /run/spire/sockets",
            "authorized delegate \"spiffe://other.org/meshauth\"",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(e.0.len(), 7, "{text}");
    }

    #[test]
    fn postgres_serves_several_replicas() {
        let mut s = Settings::new("example.org", Deployment::Standalone);
        s.server.replicas = 3;
        s.server.datastore = DataStore::Postgres {
            connection_string: "dbname=spire host=db".into(),
        };
        s.validate().unwrap();
        s.server.datastore = DataStore::Postgres {
            connection_string: " ".into(),
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("connection string is empty")
        );
    }
}
