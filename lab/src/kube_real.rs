//! A real Kubernetes API server for tests: `etcd` and `kube-apiserver`
//! (built from the Go module proxy by scripts/build-k8s-tools) on loopback
//! with free ports, under a directory of their own.
//!
//! - TLS everywhere it matters: a CA of the harness's own (rcgen) signs the
//!   serving certificate and an admin client certificate (`system:masters`);
//!   ServiceAccount tokens are signed with a P-256 key.
//! - Authorization is `Node,RBAC`, so a ServiceAccount token can do exactly
//!   what its bindings allow; admission is the API server's default set.
//! - There is no kubelet, scheduler or controller-manager: tests create Nodes
//!   and Pods themselves and set what a kubelet would (pod IPs) through the
//!   status subresource, and create the ServiceAccounts they use.
//! - [`KubeApiServer::restart`] SIGKILLs the API server and starts it again
//!   on the same etcd, address and keys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::spire_real::{Proc, SpireError, free_port, mkdir, run, write_private};

/// The harness's errors (the same process, command and file errors as the
/// SPIRE harness's).
pub type KubeError = SpireError;

/// How long etcd and the API server get to come up.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Audit policy: writes to Leases, Events and the policy kinds (and their
/// status), at Metadata level (who, what, answer); nothing else.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete]
    resources:
      - group: coordination.k8s.io
        resources: [leases]
      - group: ""
        resources: [events]
      - group: meshauth.io
        resources: [meshauthpolicies, meshauthpolicies/status, clustermeshauthpolicies, clustermeshauthpolicies/status]
      - group: cilium.io
        resources: [ciliumnetworkpolicies, ciliumnetworkpolicies/status, ciliumclusterwidenetworkpolicies, ciliumclusterwidenetworkpolicies/status]
  - level: None
"#;

/// The directory holding `kube-apiserver`, `etcd`, `helm` and `promtool`:
/// `MESHAUTH_K8S_TOOLS_BIN`, else the stable path scripts/build-k8s-tools
/// maintains (`${MESHAUTH_TOOLS_CACHE:-/var/cache/meshauth-tools}/k8s-tools-current/bin`).
/// An error naming the fix when they are missing.
pub fn k8s_tools_bin() -> Result<PathBuf, KubeError> {
    let dir = match std::env::var_os("MESHAUTH_K8S_TOOLS_BIN") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("MESHAUTH_TOOLS_CACHE")
            .map_or_else(|| PathBuf::from("/var/cache/meshauth-tools"), PathBuf::from)
            .join("k8s-tools-current/bin"),
    };
    for name in ["kube-apiserver", "etcd"] {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(SpireError::Binaries(format!(
                "{} is missing: run scripts/build-k8s-tools (scripts/install-test-deps runs it) \
                 and pass the directory it prints as MESHAUTH_K8S_TOOLS_BIN",
                p.display()
            )));
        }
    }
    Ok(dir)
}

/// etcd and a kube-apiserver on it.
#[derive(Debug)]
pub struct KubeApiServer {
    bin: PathBuf,
    dir: PathBuf,
    etcd_url: String,
    port: u16,
    etcd: Proc,
    apiserver: Proc,
    /// From the last start of the API server to its first ready answer.
    pub started_in: Duration,
}

struct Pki {
    ca_cert: String,
    ca_key: rcgen::KeyPair,
    ca: rcgen::Certificate,
}

fn pem_err(what: &str, e: impl std::fmt::Display) -> KubeError {
    SpireError::Unexpected(format!("making {what}: {e}"))
}

impl Pki {
    fn new() -> Result<Self, KubeError> {
        let ca_key = rcgen::KeyPair::generate().map_err(|e| pem_err("the CA key", e))?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| pem_err("the CA", e))?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "meshauth test kubernetes CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key).map_err(|e| pem_err("the CA", e))?;
        Ok(Self {
            ca_cert: ca.pem(),
            ca_key,
            ca,
        })
    }

    /// A certificate for `cn` (organisations `orgs`, DNS/IP `sans`) signed
    /// by the CA: (certificate PEM, key PEM).
    fn issue(&self, cn: &str, orgs: &[&str], sans: &[&str]) -> Result<(String, String), KubeError> {
        let key = rcgen::KeyPair::generate().map_err(|e| pem_err(cn, e))?;
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .map_err(|e| pem_err(cn, e))?;
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        for o in orgs {
            p.distinguished_name
                .push(rcgen::DnType::OrganizationName, *o);
        }
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::from_ca_cert_der(self.ca.der(), &self.ca_key)
            .map_err(|e| pem_err(cn, e))?;
        let cert = p.signed_by(&key, &issuer).map_err(|e| pem_err(cn, e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl KubeApiServer {
    /// Starts etcd and the API server from `bin` under `dir` (created), and
    /// waits until the API server is ready (`/readyz`).
    pub async fn start(bin: &Path, dir: &Path) -> Result<Self, KubeError> {
        mkdir(dir)?;
        let pki = Pki::new()?;
        let (serving, serving_key) = pki.issue(
            "kube-apiserver",
            &[],
            &["127.0.0.1", "localhost", "kubernetes.default.svc"],
        )?;
        let (admin, admin_key) = pki.issue("meshauth-test-admin", &["system:masters"], &[])?;
        let sa_key = rcgen::KeyPair::generate().map_err(|e| pem_err("the SA key", e))?;
        for (name, text) in [
            ("ca.crt", pki.ca_cert.clone()),
            ("apiserver.crt", serving),
            ("apiserver.key", serving_key),
            ("admin.crt", admin),
            ("admin.key", admin_key),
            ("sa.key", sa_key.serialize_pem()),
            ("sa.pub", sa_key.public_key_pem()),
        ] {
            write_private(&dir.join(name), &text)?;
        }
        write_private(&dir.join("audit-policy.yaml"), AUDIT_POLICY)?;
        let (client, peer, port) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut etcd = Proc::spawn(
            "etcd",
            Command::new(bin.join("etcd"))
                .args(["--name", "default", "--data-dir"])
                .arg(dir.join("etcd"))
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                .args(["--log-level", "warn"]),
            &dir.join("etcd.log"),
        )?;
        etcd.wait_until("listening", START_TIMEOUT, || {
            std::net::TcpStream::connect(("127.0.0.1", client)).is_ok()
        })?;
        let apiserver = Self::spawn_apiserver(bin, dir, &etcd_url, port)?;
        let mut me = Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            etcd_url,
            port,
            etcd,
            apiserver,
            started_in: Duration::ZERO,
        };
        me.write_kubeconfig(
            &me.admin_kubeconfig(),
            Some(("admin.crt", "admin.key")),
            None,
        )?;
        me.started_in = me.wait_ready().await?;
        Ok(me)
    }

    fn spawn_apiserver(bin: &Path, dir: &Path, etcd: &str, port: u16) -> Result<Proc, KubeError> {
        let p = |f: &str| dir.join(f).display().to_string();
        Proc::spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver"))
                .args(["--etcd-servers", etcd])
                .args([
                    "--bind-address",
                    "127.0.0.1",
                    "--advertise-address",
                    "127.0.0.1",
                ])
                .args(["--secure-port", &port.to_string()])
                .args(["--tls-cert-file", &p("apiserver.crt")])
                .args(["--tls-private-key-file", &p("apiserver.key")])
                .args(["--client-ca-file", &p("ca.crt")])
                .args(["--service-account-issuer", "https://kubernetes.default.svc"])
                .args(["--service-account-key-file", &p("sa.pub")])
                .args(["--service-account-signing-key-file", &p("sa.key")])
                .args(["--authorization-mode", "Node,RBAC"])
                .args(["--service-cluster-ip-range", "10.96.0.0/16"])
                .args(["--cert-dir", &p("certs")])
                // No Service endpoints for a loopback address (there are
                // no other masters to reconcile with).
                .arg("--endpoint-reconciler-type=none")
                .arg("--allow-privileged=true")
                // Who wrote what (tests count the writers of status,
                // Events and Leases).
                .args(["--audit-policy-file", &p("audit-policy.yaml")])
                .args(["--audit-log-path", &p("audit.log")])
                .arg("--audit-log-format=json"),
            &dir.join("kube-apiserver.log"),
        )
    }

    /// Waits for `/readyz` with the admin credentials.
    async fn wait_ready(&mut self) -> Result<Duration, KubeError> {
        let start = std::time::Instant::now();
        let client = self.admin_client().await?;
        loop {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| SpireError::Unexpected(e.to_string()))?;
            if let Ok(text) = client.request_text(req).await
                && text.trim() == "ok"
            {
                return Ok(start.elapsed());
            }
            self.apiserver.check_running("ready")?;
            if start.elapsed() > START_TIMEOUT {
                return Err(SpireError::Unexpected(format!(
                    "kube-apiserver not ready within {START_TIMEOUT:?}; its log:\n{}",
                    self.apiserver.log_text()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA certificate file clients trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A kubeconfig for the cluster admin (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A kube client for the cluster admin.
    pub async fn admin_client(&self) -> Result<kube::Client, KubeError> {
        client_from(&self.admin_kubeconfig()).await
    }

    /// Writes a kubeconfig at `path` authenticating with a bearer `token`
    /// (0600: it holds the token).
    pub fn token_kubeconfig(&self, path: &Path, token: &str) -> Result<(), KubeError> {
        self.write_kubeconfig(path, None, Some(token))
    }

    fn write_kubeconfig(
        &self,
        path: &Path,
        cert: Option<(&str, &str)>,
        token: Option<&str>,
    ) -> Result<(), KubeError> {
        let user = match (cert, token) {
            (Some((c, k)), _) => format!(
                "    client-certificate: {}\n    client-key: {}\n",
                self.dir.join(c).display(),
                self.dir.join(k).display()
            ),
            (None, Some(t)) => format!("    token: {t}\n"),
            (None, None) => String::new(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n{user}contexts:\n- name: test\n  context:\n    cluster: test\n    user: user\ncurrent-context: test\n",
            self.url(),
            self.ca_file().display()
        );
        write_private(path, &text)
    }

    /// SIGKILLs the API server (etcd stays).
    pub fn kill_apiserver(&mut self) {
        self.apiserver.kill();
    }

    /// Starts the API server again (after [`Self::kill_apiserver`], or
    /// killing it now) on the same etcd, port and keys; waits until ready.
    pub async fn restart(&mut self) -> Result<Duration, KubeError> {
        self.apiserver.kill();
        self.apiserver = Self::spawn_apiserver(&self.bin, &self.dir, &self.etcd_url, self.port)?;
        self.started_in = self.wait_ready().await?;
        Ok(self.started_in)
    }

    /// The audit log so far: one JSON object (audit.k8s.io/v1 Event, level
    /// Metadata) per write to a Lease, an Event, a policy or its status.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The API server's log so far.
    pub fn log(&self) -> String {
        self.apiserver.log_text()
    }

    /// `kube-apiserver --version`.
    pub fn version(&self) -> Result<String, KubeError> {
        let out = run(Command::new(self.bin.join("kube-apiserver")).arg("--version"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// An error with etcd's log if it has exited.
    pub fn check_etcd(&mut self) -> Result<(), KubeError> {
        self.etcd.check_running("serving")
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client, KubeError> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| SpireError::Unexpected(format!("reading {}: {e}", kubeconfig.display())))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| SpireError::Unexpected(format!("{}: {e}", kubeconfig.display())))?;
    kube::Client::try_from(cfg).map_err(|e| SpireError::Unexpected(e.to_string()))
}
