//! Settings → `server.conf` and `agent.conf`, built as HCL structures and
//! written by an HCL serializer (no string templates).

use hcl::{Block, Body, Expression, Object, ObjectKey};
use meshauth_duration::format_duration;

use crate::settings::{DataStore, Deployment, Settings, SettingsError};

fn s(v: impl ToString) -> Expression {
    Expression::String(v.to_string())
}

fn plugin(kind: &str, name: &str, data: Vec<(&str, Expression)>) -> Block {
    let mut b = Block::builder("plugin_data");
    for (k, v) in data {
        b = b.add_attribute((k, v));
    }
    Block::builder(kind)
        .add_label(name)
        .add_block(b.build())
        .build()
}

fn health(port: u16) -> Block {
    Block::builder("health_checks")
        .add_attribute(("listener_enabled", true))
        .add_attribute(("bind_address", "0.0.0.0"))
        .add_attribute(("bind_port", s(port)))
        .add_attribute(("live_path", "/live"))
        .add_attribute(("ready_path", "/ready"))
        .build()
}

fn to_text(body: &Body) -> String {
    // Serialising a Body built here cannot fail: every key is an identifier
    // and every value a string, number, bool, array or object.
    hcl::to_string(body).unwrap_or_default()
}

/// The SPIRE server's configuration file.
pub fn render_server(settings: &Settings) -> Result<String, SettingsError> {
    settings.validate()?;
    let sv = &settings.server;
    let server = Block::builder("server")
        .add_attribute(("bind_address", s(sv.bind_address)))
        .add_attribute(("bind_port", s(sv.bind_port)))
        .add_attribute(("socket_path", s(sv.socket_path.display())))
        .add_attribute(("trust_domain", s(&settings.trust_domain)))
        .add_attribute(("data_dir", s(sv.data_dir.display())))
        .add_attribute(("log_level", "INFO"))
        .add_attribute(("ca_ttl", s(format_duration(sv.ca_ttl))))
        .add_attribute(("default_x509_svid_ttl", s(format_duration(sv.svid_ttl))));
    let server = match sv.agent_ttl {
        Some(t) => server.add_attribute(("agent_ttl", s(format_duration(t)))),
        None => server,
    }
    .build();
    let datastore = match &sv.datastore {
        DataStore::Sqlite3 { path } => plugin(
            "DataStore",
            "sql",
            vec![
                ("database_type", s("sqlite3")),
                ("connection_string", s(path.display())),
            ],
        ),
        DataStore::Postgres { connection_string } => plugin(
            "DataStore",
            "sql",
            vec![
                ("database_type", s("postgres")),
                ("connection_string", s(connection_string)),
            ],
        ),
        DataStore::SqlFile { plugin_data_file } => Block::builder("DataStore")
            .add_label("sql")
            .add_attribute(("plugin_data_file", s(plugin_data_file.display())))
            .build(),
    };
    let node_attestor = match &settings.deployment {
        Deployment::Standalone => plugin("NodeAttestor", "join_token", vec![]),
        Deployment::Kubernetes {
            cluster,
            agent_service_account,
        } => {
            let mut inner = Object::new();
            inner.insert(
                ObjectKey::from("service_account_allow_list"),
                Expression::Array(vec![s(agent_service_account)]),
            );
            let mut clusters = Object::new();
            clusters.insert(ObjectKey::from(s(cluster)), Expression::Object(inner));
            plugin(
                "NodeAttestor",
                "k8s_psat",
                vec![("clusters", Expression::Object(clusters))],
            )
        }
    };
    let mut plugins = Block::builder("plugins")
        .add_block(datastore)
        .add_block(node_attestor)
        .add_block(plugin(
            "KeyManager",
            "disk",
            vec![("keys_path", s(sv.data_dir.join("keys.json").display()))],
        ));
    if let Some((ns, name)) = &sv.bundle_config_map {
        plugins = plugins.add_block(plugin(
            "Notifier",
            "k8sbundle",
            vec![("namespace", s(ns)), ("config_map", s(name))],
        ));
    }
    let plugins = plugins.build();
    let body = Body::builder()
        .add_block(server)
        .add_block(plugins)
        .add_block(health(sv.health_port))
        .build();
    Ok(to_text(&body))
}

/// The plugin data file of [`DataStore::SqlFile`]: what SPIRE's sql plugin
/// reads from it (keep it in a Secret).
pub fn render_sql_plugin_data(database_type: &str, connection_string: &str) -> String {
    let body = Body::builder()
        .add_attribute(("database_type", s(database_type)))
        .add_attribute(("connection_string", s(connection_string)))
        .build();
    to_text(&body)
}

/// The SPIRE agent's configuration file.
pub fn render_agent(settings: &Settings) -> Result<String, SettingsError> {
    settings.validate()?;
    let a = &settings.agent;
    let mut agent = Block::builder("agent")
        .add_attribute(("data_dir", s(a.data_dir.display())))
        .add_attribute(("log_level", "INFO"))
        .add_attribute(("server_address", s(&a.server_address)))
        .add_attribute(("server_port", s(a.server_port)))
        .add_attribute(("socket_path", s(a.socket_path.display())))
        .add_attribute(("trust_bundle_path", s(a.trust_bundle_path.display())))
        .add_attribute(("trust_domain", s(&settings.trust_domain)));
    if let Some(admin) = &a.admin_socket_path {
        agent = agent
            .add_attribute(("admin_socket_path", s(admin.display())))
            .add_attribute((
                "authorized_delegates",
                Expression::Array(a.authorized_delegates.iter().map(s).collect()),
            ));
    }
    if let Some(every) = a.sync_interval {
        agent = agent.add_block(
            Block::builder("experimental")
                .add_attribute(("sync_interval", s(format_duration(every))))
                .build(),
        );
    }
    let (node_attestor, workload_attestor) = match &settings.deployment {
        Deployment::Standalone => (
            plugin("NodeAttestor", "join_token", vec![]),
            plugin(
                "WorkloadAttestor",
                "unix",
                vec![("discover_workload_path", Expression::Bool(true))],
            ),
        ),
        Deployment::Kubernetes { cluster, .. } => (
            plugin("NodeAttestor", "k8s_psat", vec![("cluster", s(cluster))]),
            plugin(
                "WorkloadAttestor",
                "k8s",
                vec![("node_name_env", s("MY_NODE_NAME"))],
            ),
        ),
    };
    let plugins = Block::builder("plugins")
        .add_block(node_attestor)
        .add_block(plugin(
            "KeyManager",
            "disk",
            vec![("directory", s(a.data_dir.display()))],
        ))
        .add_block(workload_attestor)
        .build();
    let body = Body::builder()
        .add_block(agent.build())
        .add_block(plugins)
        .add_block(health(a.health_port))
        .build();
    Ok(to_text(&body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Deployment;

    /// The rendered text parsed back by the HCL parser: attribute `key` of
    /// the first block named `block` (with `label`, if given).
    fn attr(text: &str, path: &[&str]) -> hcl::Value {
        let v: hcl::Value = hcl::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut cur = &v;
        for p in path {
            cur = match cur {
                hcl::Value::Object(o) => o.get(*p).unwrap_or_else(|| panic!("no {p} in {cur:?}")),
                hcl::Value::Array(a) => match a.first() {
                    Some(hcl::Value::Object(o)) => {
                        o.get(*p).unwrap_or_else(|| panic!("no {p} in {cur:?}"))
                    }
                    _ => panic!("no {p} in {cur:?}"),
                },
                other => panic!("{p}: not an object: {other:?}"),
            };
        }
        cur.clone()
    }

    fn str_of(v: hcl::Value) -> String {
        match v {
            hcl::Value::String(s) => s,
            other => panic!("not a string: {other:?}"),
        }
    }

    #[test]
    fn standalone_server_and_agent_parse_back() {
        let mut st = Settings::new("meshauth.local", Deployment::Standalone);
        st.server.ca_ttl = std::time::Duration::from_secs(60);
        st.server.svid_ttl = std::time::Duration::from_secs(10);
        st.agent.admin_socket_path = Some("/run/spire/admin/admin.sock".into());
        st.agent.authorized_delegates = vec!["spiffe://meshauth.local/meshauth-agent".into()];
        let server = render_server(&st).unwrap();
        assert_eq!(
            str_of(attr(&server, &["server", "trust_domain"])),
            "meshauth.local"
        );
        assert_eq!(str_of(attr(&server, &["server", "ca_ttl"])), "1m");
        assert_eq!(
            str_of(attr(&server, &["server", "default_x509_svid_ttl"])),
            "10s"
        );
        assert_eq!(str_of(attr(&server, &["server", "bind_port"])), "8081");
        assert_eq!(str_of(attr(&server, &["server", "agent_ttl"])), "12h");
        assert_eq!(
            str_of(attr(
                &server,
                &[
                    "plugins",
                    "DataStore",
                    "sql",
                    "plugin_data",
                    "database_type"
                ]
            )),
            "sqlite3"
        );
        attr(&server, &["plugins", "NodeAttestor", "join_token"]);
        assert_eq!(
            attr(&server, &["health_checks", "listener_enabled"]),
            hcl::Value::Bool(true)
        );
        let agent = render_agent(&st).unwrap();
        assert_eq!(
            str_of(attr(&agent, &["agent", "socket_path"])),
            "/run/spire/sockets/agent.sock"
        );
        assert_eq!(
            str_of(attr(&agent, &["agent", "admin_socket_path"])),
            "/run/spire/admin/admin.sock"
        );
        assert_eq!(
            attr(&agent, &["agent", "authorized_delegates"]),
            hcl::Value::Array(vec![hcl::Value::String(
                "spiffe://meshauth.local/meshauth-agent".into()
            )])
        );
        attr(&agent, &["plugins", "WorkloadAttestor", "unix"]);
        assert!(
            !agent.contains("experimental"),
            "no experimental block unless asked"
        );
        st.agent.sync_interval = Some(std::time::Duration::from_millis(500));
        let agent = render_agent(&st).unwrap();
        assert_eq!(
            str_of(attr(&agent, &["agent", "experimental", "sync_interval"])),
            "500ms"
        );
        attr(&agent, &["plugins", "NodeAttestor", "join_token"]);
    }

    #[test]
    fn kubernetes_uses_psat_and_the_k8s_attestor_and_postgres_for_replicas() {
        let mut st = Settings::new(
            "prod.example",
            Deployment::Kubernetes {
                cluster: "prod-eu".into(),
                agent_service_account: "spire:spire-agent".into(),
            },
        );
        st.server.replicas = 3;
        st.server.datastore = DataStore::Postgres {
            connection_string: "dbname=spire host=db password=\"s3cr\\et\"".into(),
        };
        let server = render_server(&st).unwrap();
        assert_eq!(
            attr(
                &server,
                &[
                    "plugins",
                    "NodeAttestor",
                    "k8s_psat",
                    "plugin_data",
                    "clusters",
                    "prod-eu",
                    "service_account_allow_list"
                ]
            ),
            hcl::Value::Array(vec![hcl::Value::String("spire:spire-agent".into())])
        );
        assert_eq!(
            str_of(attr(
                &server,
                &[
                    "plugins",
                    "DataStore",
                    "sql",
                    "plugin_data",
                    "connection_string"
                ]
            )),
            "dbname=spire host=db password=\"s3cr\\et\"",
            "quotes and backslashes survive the round trip"
        );
        let agent = render_agent(&st).unwrap();
        assert_eq!(
            str_of(attr(
                &agent,
                &[
                    "plugins",
                    "NodeAttestor",
                    "k8s_psat",
                    "plugin_data",
                    "cluster"
                ]
            )),
            "prod-eu"
        );
        attr(&agent, &["plugins", "WorkloadAttestor", "k8s"]);
        // The trust bundle goes to the ConfigMap the agents bootstrap from,
        // beside the agents' service account.
        for (key, want) in [("namespace", "spire"), ("config_map", "spire-bundle")] {
            assert_eq!(
                str_of(attr(
                    &server,
                    &["plugins", "Notifier", "k8sbundle", "plugin_data", key]
                )),
                want
            );
        }
        let standalone = render_server(&Settings::new("x.org", Deployment::Standalone)).unwrap();
        assert!(!standalone.contains("Notifier"), "{standalone}");
    }

    #[test]
    fn invalid_settings_render_nothing() {
        let mut st = Settings::new("meshauth.local", Deployment::Standalone);
        st.server.replicas = 2;
        let e = render_server(&st).unwrap_err();
        assert!(
            e.to_string().contains("sqlite3 with 2 server replicas"),
            "{e}"
        );
        assert!(render_agent(&st).is_err());
    }
}
