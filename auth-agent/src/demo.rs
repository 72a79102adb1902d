//! `meshauth demo`: what exists so far, on this machine, narrated.
//!
//! Today that is the identity supply: spire-dev stands in for a SPIRE server
//! with one agent per node; each node's svid-cache pulls only that node's
//! SVIDs; the two nodes complete a mutual TLS 1.3 handshake with their
//! workloads' SVIDs; SVIDs rotate; a SPIRE server outage keeps them in use
//! until they really expire, and fresh ones arrive when the server returns.
//! Every step checks what it shows; the demo exits non-zero if any did not
//! hold. It needs no privileges and installs nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use spire_dev::{DevConfig, EntrySpec, SpiffeId, SpireDev};
use svid_cache::{
    CacheConfig, CacheEvent, RemovalReason, ServerCertResolver, SourceHandle, SpiffeClientVerifier,
    SvidCache, VerifyError, WorkloadApiConfig, spawn_workload_api,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// SVID lifetime; short, so rotation and expiry happen while you watch.
    pub ttl: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(8),
        }
    }
}

/// One workload of the demo cluster.
struct Workload {
    identity: u32,
    name: &'static str,
    node: &'static str,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        identity: 256,
        name: "production/order-service",
        node: "node-a",
    },
    Workload {
        identity: 257,
        name: "production/payment-service",
        node: "node-b",
    },
    Workload {
        identity: 258,
        name: "production/inventory",
        node: "node-a",
    },
];
const NODES: &[&str] = &["node-a", "node-b"];

/// The node agent's view: its cache and its source.
struct Node {
    name: &'static str,
    cache: SvidCache,
    source: SourceHandle,
}

/// What each step showed; the summary and the exit code come from it.
#[derive(Default)]
struct Checks(Vec<(String, bool)>);

impl Checks {
    fn check(&mut self, what: impl Into<String>, held: bool) {
        let what = what.into();
        println!("    {} {what}", if held { "✓" } else { "✗" });
        self.0.push((what, held));
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn serial_of(svid: &svid_cache::Svid) -> String {
    x509_parser::parse_x509_certificate(svid.leaf().as_ref())
        .map(|(_, c)| c.tbs_certificate.raw_serial_as_string().replace(':', ""))
        .unwrap_or_else(|_| "?".into())
}

fn secs_left(t: SystemTime) -> String {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => format!("expires in {:.1}s", d.as_secs_f64()),
        Err(_) => "expired".into(),
    }
}

fn print_node(node: &Node) {
    let ids = node.cache.identities();
    println!("    {} holds {} SVID(s):", node.name, ids.len());
    for id in ids {
        if let Some(s) = node.cache.get(id) {
            let name = WORKLOADS
                .iter()
                .find(|w| w.identity == id)
                .map_or("?", |w| w.name);
            println!(
                "      identity {id:<4} {:<28} spiffe://meshauth.local/identity/{id}  serial {}  {}",
                name,
                serial_of(&s).chars().take(12).collect::<String>(),
                secs_left(s.not_after())
            );
        }
    }
}

/// Waits until `pred` holds for the cache, or the deadline passes.
async fn wait_cache(
    cache: &SvidCache,
    within: Duration,
    pred: impl Fn(&SvidCache) -> bool,
) -> bool {
    let mut generation = cache.watch_generation();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if pred(cache) {
            return true;
        }
        match tokio::time::timeout_at(deadline, generation.changed()).await {
            Ok(Ok(())) => {}
            _ => return pred(cache),
        }
    }
}

/// Runs the demo; `Ok(true)` when every expectation held.
pub async fn run(opts: DemoOptions) -> Result<bool> {
    let dir = tempfile::Builder::new()
        .prefix("meshauth-demo-")
        .tempdir()
        .context("creating the demo directory")?;
    let shutdown = CancellationToken::new();
    let result = tokio::select! {
        r = run_in(&opts, dir.path(), shutdown.clone()) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: cleaning up");
            Ok(false)
        }
    };
    shutdown.cancel();
    result
}

async fn run_in(
    opts: &DemoOptions,
    dir: &std::path::Path,
    shutdown: CancellationToken,
) -> Result<bool> {
    let mut checks = Checks::default();
    println!("meshauth demo: the identity supply (spire-dev as SPIRE, svid-cache per node)");
    println!(
        "SVID lifetime {}s (renewed by the SPIRE agent at half-life)",
        opts.ttl.as_secs()
    );

    step(
        1,
        "Start spire-dev: one server, one agent per node, one registration entry per workload, parented to the node that runs it",
    );
    let mut cfg = DevConfig::new(dir);
    cfg.default_ttl = opts.ttl;
    cfg.nodes = NODES.iter().map(|n| (*n).to_string()).collect();
    cfg.entries = WORKLOADS
        .iter()
        .map(|w| {
            SpiffeId::parse(&format!("spiffe://meshauth.local/identity/{}", w.identity))
                .map(|id| EntrySpec::new(w.node, id))
        })
        .collect::<Result<_, _>>()
        .context("building entries")?;
    let dev = SpireDev::start(cfg).await.context("starting spire-dev")?;
    for n in NODES {
        println!(
            "    agent {n}: {}",
            dev.agent(n)?.workload_socket().display()
        );
    }

    step(
        2,
        "Each node's svid-cache connects to its own SPIRE agent (SPIFFE Workload API)",
    );
    let mut nodes = Vec::new();
    for &name in NODES {
        let cache = SvidCache::new(CacheConfig::default());
        let _expiry = cache.spawn_expiry(shutdown.clone());
        let source = spawn_workload_api(
            WorkloadApiConfig::new(dev.agent(name)?.workload_socket()),
            cache.clone(),
            shutdown.clone(),
        );
        nodes.push(Node {
            name,
            cache,
            source,
        });
    }
    for node in &nodes {
        let want: Vec<u32> = WORKLOADS
            .iter()
            .filter(|w| w.node == node.name)
            .map(|w| w.identity)
            .collect();
        let got = wait_cache(&node.cache, Duration::from_secs(10), |c| {
            c.identities() == want
        })
        .await;
        print_node(node);
        checks.check(
            format!(
                "{} holds exactly its own workloads' SVIDs {want:?} and no other node's",
                node.name
            ),
            got,
        );
    }
    let (a, b) = (&nodes[0], &nodes[1]);

    step(
        3,
        "Mutual TLS 1.3 between nodes: order-service (256, node-a) dials payment-service (257, node-b) with SNI 257.meshauth.local",
    );
    let hs = handshake(&a.cache, &b.cache, 256, 257, false).await;
    match &hs {
        Ok(peer) => println!(
            "    handshake done; server saw client {peer}; client verified spiffe://meshauth.local/identity/257"
        ),
        Err(e) => println!("    handshake failed: {e:#}"),
    }
    checks.check(
        "both sides verified each other's SVID (chain to the bundle, one URI SAN, not a CA)",
        hs.is_ok(),
    );
    let wrong = handshake(&a.cache, &b.cache, 256, 258, true).await;
    let refused_right =
        matches!(&wrong, Err(e) if format!("{e:#}").contains("[unexpected_identity]"));
    match &wrong {
        Ok(_) => println!("    an impostor answering for 258 with 257's SVID: accepted (wrong!)"),
        Err(e) => println!("    an impostor answering for 258 with 257's SVID: refused ({e:#})"),
    }
    checks.check(
        "a client refuses a valid SVID of another identity than the one it dialled",
        refused_right,
    );

    step(
        4,
        "Rotation: the SPIRE agent renews every SVID at half-life; the caches see Rotated and keep serving",
    );
    let mut events = a.cache.subscribe();
    let before = a.cache.get(256).map(|s| serial_of(&s));
    let rotated = tokio::time::timeout(opts.ttl, async {
        loop {
            let Ok(changes) = events.recv().await else {
                return false;
            };
            if changes
                .events
                .iter()
                .any(|e| matches!(e, CacheEvent::Rotated { identity: 256, .. }))
            {
                return true;
            }
        }
    })
    .await
    .unwrap_or(false);
    let after = a.cache.get(256).map(|s| serial_of(&s));
    let short = |s: &Option<String>| {
        s.as_deref()
            .map_or("-".to_string(), |s| s.chars().take(12).collect())
    };
    println!(
        "    identity 256: serial {} -> {}",
        short(&before),
        short(&after)
    );
    checks.check(
        "identity 256 rotated to a new certificate before it expired",
        rotated && before != after,
    );

    step(
        5,
        "SPIRE server outage: agents keep what they hold, nothing is renewed",
    );
    dev.set_outage(true);
    let last = a.cache.get(256).map(|s| s.not_after());
    let t0 = Instant::now();
    if let Some(t) = last {
        println!("    node-a's SVID for 256 {}", secs_left(t));
    }
    let usable_midway = {
        tokio::time::sleep(opts.ttl / 4).await;
        a.cache.get(256).is_some()
    };
    checks.check(
        "during the outage the still-valid SVID keeps being used",
        usable_midway,
    );
    let mut events = a.cache.subscribe();
    let expired = tokio::time::timeout(opts.ttl + Duration::from_secs(2), async {
        loop {
            let Ok(changes) = events.recv().await else {
                return false;
            };
            if changes.events.iter().any(|e| {
                matches!(
                    e,
                    CacheEvent::Removed {
                        identity: 256,
                        reason: RemovalReason::Expired
                    }
                )
            }) {
                return true;
            }
        }
    })
    .await
    .unwrap_or(false);
    println!(
        "    after {:.1}s: node-a holds {:?} (the agent still serves the expired SVID; the cache refuses it)",
        t0.elapsed().as_secs_f64(),
        a.cache.identities()
    );
    checks.check(
        "at NotAfter the cache drops the SVID and hands out nothing for 256",
        expired && a.cache.get(256).is_none(),
    );
    let connected = matches!(
        a.source.status().state,
        svid_cache::SourceState::Connected { .. }
    );
    checks.check(
        "the source stayed connected through the outage (SPIRE agent up, server down)",
        connected,
    );

    step(
        6,
        "SPIRE server back: fresh SVIDs arrive on the same stream, nothing restarted",
    );
    dev.set_outage(false);
    let back_a = wait_cache(&a.cache, Duration::from_secs(10), |c| {
        c.get(256).is_some() && c.get(258).is_some()
    })
    .await;
    let back_b = wait_cache(&b.cache, Duration::from_secs(10), |c| c.get(257).is_some()).await;
    print_node(a);
    print_node(b);
    checks.check(
        "both nodes hold fresh SVIDs for all their workloads again",
        back_a && back_b,
    );
    let hs = handshake(&a.cache, &b.cache, 256, 257, false).await;
    if let Err(e) = &hs {
        println!("    handshake failed: {e:#}");
    }
    checks.check("and the mutual TLS handshake works again", hs.is_ok());

    println!("\nSummary:");
    let failed: Vec<_> = checks.0.iter().filter(|(_, ok)| !ok).collect();
    println!(
        "    {} of {} expectations held{}",
        checks.0.len() - failed.len(),
        checks.0.len(),
        if failed.is_empty() { "" } else { "; failed:" }
    );
    for (what, _) in &failed {
        println!("      ✗ {what}");
    }
    shutdown.cancel();
    for n in nodes {
        n.source.join().await;
    }
    dev.shutdown().await;
    Ok(failed.is_empty())
}

/// Serves one fixed identity's SVID whatever SNI asks for: an impostor.
#[derive(Debug)]
struct Impostor(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Impostor {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// One meshauth/1-style mutual TLS 1.3 handshake over loopback: `local` on
/// the client's node dials `remote` on the server's node. Returns the
/// client identity the server verified. With `impostor`, the server answers
/// every SNI with the first SVID it holds.
async fn handshake(
    client: &SvidCache,
    server: &SvidCache,
    local: u32,
    remote: u32,
    impostor: bool,
) -> Result<String> {
    let known: BTreeMap<u32, ()> = WORKLOADS.iter().map(|w| (w.identity, ())).collect();
    let mut server_cfg = svid_cache::tls::server_config(
        ServerCertResolver::new(server.clone()),
        SpiffeClientVerifier::known(server.clone(), move |id| known.contains_key(&id)),
    )?;
    if impostor {
        let id = *server
            .identities()
            .first()
            .context("server node holds no SVID")?;
        let key = server.certified_key(id).context("no certified key")?;
        server_cfg.cert_resolver = Arc::new(Impostor(key));
    }
    let client_cfg = svid_cache::tls::client_config(client, local, remote)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"hello").await?;
        tls.shutdown().await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| {
                x509_parser::parse_x509_certificate(c.as_ref())
                    .ok()
                    .map(|(_, x)| x)
            })
            .and_then(|x| {
                x.subject_alternative_name().ok().flatten().and_then(|san| {
                    san.value.general_names.iter().find_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_string()),
                        _ => None,
                    })
                })
            })
            .unwrap_or_default();
        anyhow::Ok(peer)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let name = rustls::pki_types::ServerName::try_from(client.trust_domain().server_name(remote))?;
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector.connect(name, tcp).await?;
        if tls.get_ref().1.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            bail!(
                "negotiated {:?}, not TLS 1.3",
                tls.get_ref().1.protocol_version()
            );
        }
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        anyhow::Ok(())
    };
    let client_result = tokio::time::timeout(Duration::from_secs(5), client_side).await;
    let client_result = match client_result {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("handshake timed out")),
    };
    if let Err(e) = client_result {
        server_task.abort();
        let label = e
            .chain()
            .find_map(|c| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .and_then(VerifyError::from_rustls)
                    .map(|v| v.label())
            })
            .unwrap_or("other");
        bail!("{e} [{label}]");
    }
    server_task.await?
}
