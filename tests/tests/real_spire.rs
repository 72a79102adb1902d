//! Real SPIRE ⇄ svid-cache: SPIRE's own spire-server and spire-agent (built
//! by scripts/build-spire, version pinned in tools/spire/go.mod) issue an
//! X.509-SVID that meshauth's Workload API client puts in its cache, wired
//! as meshauth-agent wires it (auth-agent/src/app/sources.rs).
//!
//! Needs the SPIRE binaries (MESHAUTH_SPIRE_BIN, set by scripts/test);
//! fails, never skips, when they are missing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use meshauth_tests::real_spire::{
    SpireAgent, SpireServer, own_uid, settings, spire_bin, spire_tempdir, start_server,
};
use meshauth_tests::{TD, init_tracing, leaf};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use spire_config::entries::{Entry, Scope, Selection, Selector, Wanted, desired};
use spire_config::entry_api::{EntryClient, reconcile};
use spire_config::{DataStore, Deployment, Settings, render_agent, render_server};
use svid_cache::{
    CacheConfig, DelegatedIdentityConfig, SvidCache, TrustDomain, WorkloadApiConfig,
    spawn_delegated_identity, spawn_workload_api,
};
use tokio_util::sync::CancellationToken;

/// The identity the test registers: `spiffe://meshauth.local/identity/4242`,
/// the only SPIFFE ID shape svid-cache keeps.
const IDENTITY: u32 = 4242;
/// The configured `default_x509_svid_ttl`.
const SVID_TTL: Duration = Duration::from_secs(600);
/// How long the first SVID may take: the agent syncs entries every 5 s, the
/// source reconnects with backoff (at most 10 s) after "no identity issued".
const FIRST_SVID_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn svid_cache_gets_an_x509_svid_from_real_spire() -> anyhow::Result<()> {
    init_tracing();
    let bin = spire_bin();
    let dir = spire_tempdir();

    let server = start_server(&bin, dir.path(), TD)?;
    println!("spire-server healthy after {:?}", server.started_in);

    let token = server.join_token(&format!("spiffe://{TD}/node/n1"))?;
    let agent = SpireAgent::start(&bin, &server, server.settings(), &token)?;
    println!("spire-agent healthy after {:?}", agent.started_in);

    // One entry svid-cache keeps, one it must ignore (not an /identity/<N> path).
    let uid = own_uid();
    let selector = format!("unix:uid:{uid}");
    let parent = server.join_token_agent_id(&token);
    let spiffe_id = format!("spiffe://{TD}/identity/{IDENTITY}");
    let entry_start = Instant::now();
    server.create_entry(&parent, &spiffe_id, &[&selector])?;
    server.create_entry(
        &parent,
        &format!("spiffe://{TD}/ns/default/sa/test"),
        &[&selector],
    )?;

    // Exactly as meshauth-agent starts its Workload API source.
    let cache = SvidCache::new(CacheConfig {
        trust_domain: TrustDomain::new(TD).unwrap_or_else(|e| panic!("trust domain {TD}: {e}")),
        ..CacheConfig::default()
    });
    let token_stop = CancellationToken::new();
    let expiry = cache.spawn_expiry(token_stop.clone());
    let source = spawn_workload_api(
        WorkloadApiConfig::new(agent.workload_socket()),
        cache.clone(),
        token_stop.clone(),
    );
    let mut generation = cache.watch_generation();
    let got = tokio::time::timeout(FIRST_SVID_TIMEOUT, async {
        loop {
            if let Some(svid) = cache.get(IDENTITY) {
                return svid;
            }
            generation
                .changed()
                .await
                .unwrap_or_else(|e| panic!("cache generation watch closed: {e}"));
        }
    })
    .await;
    let svid = got.unwrap_or_else(|_| {
        panic!(
            "no SVID for {spiffe_id} in the cache within {FIRST_SVID_TIMEOUT:?} \
             (selector {selector}, parent {parent}); source status {:?}\nagent log:\n{}",
            source.status(),
            agent.log()
        )
    });
    let first_svid = entry_start.elapsed();
    println!("first SVID in the cache {first_svid:?} after the entry was created");

    // The SVID: SPIRE's certificate for that SPIFFE ID, ~10 minutes left.
    let l = leaf(&svid);
    assert_eq!(l.spiffe_id, spiffe_id, "URI SAN of the SVID SPIRE issued");
    assert_eq!(cache.trust_domain().as_str(), TD);
    let left = svid
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_else(|e| panic!("SVID already expired: {e}"));
    assert!(
        left > SVID_TTL - Duration::from_secs(60) && left <= SVID_TTL + Duration::from_secs(5),
        "NotAfter {:?} is {left:?} ahead; expected about {SVID_TTL:?} (default_x509_svid_ttl)",
        svid.not_after()
    );
    assert_eq!(
        cache.identities(),
        [IDENTITY],
        "the cache keeps /identity/<N> only, not /ns/default/sa/test"
    );

    // The bundle: exactly the server's CA certificates.
    let bundle = cache.bundle().expect("a trust bundle with the first SVID");
    assert_eq!(bundle.trust_domain().as_str(), TD);
    let pem = server.bundle_pem()?;
    let want: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap_or_else(|e| panic!("`spire-server bundle show` PEM: {e}\n{pem}")))
        .map(|c| c.to_vec())
        .collect();
    let got: Vec<Vec<u8>> = bundle.authorities().iter().map(|c| c.to_vec()).collect();
    assert!(!want.is_empty(), "empty bundle from spire-server: {pem}");
    assert_eq!(got, want, "cache bundle = `spire-server bundle show`");

    let status = source.status();
    assert!(
        status.is_connected(),
        "source after the first SVID: {status:?}"
    );
    println!(
        "timings: server {:?}, agent {:?}, first SVID {first_svid:?}",
        server.started_in, agent.started_in
    );

    token_stop.cancel();
    source.join().await;
    expiry.await.unwrap_or_else(|e| panic!("expiry task: {e}"));
    Ok(())
}

/// Identities × nodes for the reconciler test: 220 identities on three
/// nodes, a quarter on all three and the rest on two — 495 entries in all,
/// three batches of at most 200 and, at 100 per page, five pages.
fn placements() -> (
    BTreeMap<u32, BTreeSet<String>>,
    BTreeMap<u32, BTreeSet<String>>,
) {
    let mut identities = BTreeMap::new();
    let mut placements = BTreeMap::new();
    for n in 0..220u32 {
        let id = 256 + n;
        identities.insert(id, BTreeSet::from([format!("k8s:app=svc-{n}")]));
        let nodes: BTreeSet<String> = match n % 4 {
            0 => ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect(),
            1 => ["a", "b"].iter().map(|s| (*s).to_owned()).collect(),
            2 => ["b", "c"].iter().map(|s| (*s).to_owned()).collect(),
            _ => ["c", "a"].iter().map(|s| (*s).to_owned()).collect(),
        };
        placements.insert(id, nodes);
    }
    (identities, placements)
}

/// The registration reconciler against SPIRE's own Entry API: creates in
/// batches, reads every page, is idempotent, puts back entries deleted or
/// widened by hand, deletes what nobody wants, and never touches an entry
/// it did not create.
#[tokio::test]
async fn the_reconciler_keeps_real_spire_entries_as_meshauth_wants_them() -> anyhow::Result<()> {
    init_tracing();
    let bin = spire_bin();
    let dir = spire_tempdir();
    let server = start_server(&bin, dir.path(), TD)?;

    // Someone else's entry, made with SPIRE's own CLI.
    let foreign = server.create_entry(
        &format!("spiffe://{TD}/meshauth/node/a"),
        &format!("spiffe://{TD}/ops/backup"),
        &["unix:uid:1234"],
    )?;

    let (identities, placements) = placements();
    let agent_ids: BTreeMap<String, String> = ["a", "b", "c"]
        .iter()
        .map(|n| ((*n).to_owned(), format!("spiffe://{TD}/meshauth/node/{n}")))
        .collect();
    let scope = Scope::PerNode { agent_ids };
    let selection = Selection::Agent(BTreeSet::from([
        Selector::new("unix", "uid:0"),
        Selector::new("unix", "path:/usr/local/bin/meshauth-agent"),
    ]));
    let wanted = |placements: &BTreeMap<u32, BTreeSet<String>>| {
        desired(&Wanted {
            trust_domain: TD,
            identities: &identities,
            placements,
            scope: &scope,
            selection: &selection,
            x509_svid_ttl: 300,
        })
    };
    let want = wanted(&placements);
    assert_eq!(want.len(), 495);

    let mut client = EntryClient::connect(server.socket(), Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .with_page_size(100);
    let first = reconcile(&mut client, &want)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("first: {first}");
    assert!(first.is_clean(), "{:?}", first.failed);
    assert_eq!((first.created, first.foreign, first.batches), (495, 1, 3));

    // What SPIRE holds now, through its own CLI: ours under our IDs.
    let shown = server.cli(&["entry", "show"], &[])?;
    let ours = shown.matches("Entry ID         : meshauth-").count();
    assert_eq!(ours, 495, "`spire-server entry show` lists our 495 entries");
    let some = want
        .values()
        .next()
        .unwrap_or_else(|| panic!("no entry wanted"));
    let one = server.cli(&["entry", "show"], &["-entryID", &some.id])?;
    assert!(
        one.contains(&some.spiffe_id)
            && one.contains(&some.parent_id)
            && one.contains("unix:uid:0")
            && one.contains("X509-SVID TTL    : 300"),
        "entry {} as SPIRE shows it:\n{one}",
        some.id
    );

    let second = reconcile(&mut client, &want)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("second: {second}");
    assert!(
        !second.changed() && second.is_clean(),
        "idempotent: {second}"
    );
    // Five pages of entries, then the empty page SPIRE ends every listing
    // with (it hands out a next-page token until a page comes back empty).
    assert_eq!((second.listed, second.pages), (496, 6));

    // Drift by hand: one of ours deleted, one widened to admin + downstream
    // with an extra DNS name, one given another selector.
    let mut ids = want.keys();
    let (deleted, widened, reselected) = (
        ids.next().cloned().unwrap_or_default(),
        ids.next().cloned().unwrap_or_default(),
        ids.next().cloned().unwrap_or_default(),
    );
    server.cli(&["entry", "delete"], &["-entryID", &deleted])?;
    let w = &want[&widened];
    server.cli(
        &["entry", "update"],
        &[
            "-entryID",
            &widened,
            "-parentID",
            &w.parent_id,
            "-spiffeID",
            &w.spiffe_id,
            "-selector",
            "unix:uid:0",
            "-selector",
            "unix:path:/usr/local/bin/meshauth-agent",
            "-admin",
            "-downstream",
            "-dns",
            "evil.example",
        ],
    )?;
    let r = &want[&reselected];
    server.cli(
        &["entry", "update"],
        &[
            "-entryID",
            &reselected,
            "-parentID",
            &r.parent_id,
            "-spiffeID",
            &r.spiffe_id,
            "-selector",
            "unix:uid:1000",
            "-x509SVIDTTL",
            "300",
        ],
    )?;
    let repaired = reconcile(&mut client, &want)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("after drift: {repaired}");
    assert!(repaired.is_clean(), "{:?}", repaired.failed);
    assert_eq!(
        (repaired.created, repaired.updated, repaired.deleted),
        (1, 2, 0)
    );
    let back = server.cli(&["entry", "show"], &["-entryID", &widened])?;
    assert!(
        !back.contains("Admin") && !back.contains("Downstream") && !back.contains("evil.example"),
        "the widened entry is put back:\n{back}"
    );
    let again = reconcile(&mut client, &want)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!again.changed(), "converged after the repair: {again}");

    // Node c runs nothing any more: its entries go, the others and the
    // foreign entry stay.
    let mut moved = placements.clone();
    for nodes in moved.values_mut() {
        nodes.remove("c");
    }
    let fewer = wanted(&moved);
    let removed = reconcile(&mut client, &fewer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("node c emptied: {removed}");
    assert_eq!(removed.deleted, want.len() - fewer.len());
    assert_eq!((removed.created, removed.updated), (0, 0));
    let left = server.cli(&["entry", "show"], &[])?;
    assert_eq!(
        left.matches("Entry ID         : meshauth-").count(),
        fewer.len()
    );
    assert!(
        !left.contains(&format!("spiffe://{TD}/meshauth/node/c")),
        "no entry is parented to node c any more"
    );
    let kept = server.cli(&["entry", "show"], &["-entryID", &foreign])?;
    assert!(
        kept.contains("ops/backup"),
        "the foreign entry stays:\n{kept}"
    );

    // The same entry under someone else's ID: SPIRE answers ALREADY_EXISTS,
    // which is not a failure; an entry SPIRE refuses is reported with its
    // message and does not stop the others.
    let mut extra = fewer.clone();
    let twin_of = extra
        .values()
        .next()
        .cloned()
        .unwrap_or_else(|| panic!("no entry wanted"));
    server.cli(&["entry", "delete"], &["-entryID", &twin_of.id])?;
    let mut twin_args = vec![
        "-parentID".to_owned(),
        twin_of.parent_id.clone(),
        "-spiffeID".to_owned(),
        twin_of.spiffe_id.clone(),
        "-x509SVIDTTL".to_owned(),
        "300".to_owned(),
    ];
    for s in &twin_of.selectors {
        twin_args.push("-selector".into());
        twin_args.push(format!("{}:{}", s.kind, s.value));
    }
    let twin_args: Vec<&str> = twin_args.iter().map(String::as_str).collect();
    server.cli(&["entry", "create"], &twin_args)?;
    let bad = Entry {
        id: "meshauth-badbadbadbadbad0".into(),
        spiffe_id: format!("spiffe://{TD}/identity/9999"),
        parent_id: format!("spiffe://{TD}/meshauth/node/a"),
        selectors: BTreeSet::new(),
        x509_svid_ttl: 0,
        extras: BTreeSet::new(),
    };
    extra.insert(bad.id.clone(), bad);
    let mixed = reconcile(&mut client, &extra)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("twin and refused: {mixed}");
    assert_eq!(mixed.already_existed, 1, "{mixed}");
    assert_eq!(mixed.failed.len(), 1, "{:?}", mixed.failed);
    assert!(
        mixed.failed[0].contains("meshauth-badbadbadbadbad0")
            && mixed.failed[0].contains("selector"),
        "the refusal names the entry and SPIRE's reason: {:?}",
        mixed.failed
    );
    Ok(())
}

/// What `meshauth spire render` writes for Kubernetes (k8s_psat, the k8s
/// workload attestor, postgres for three replicas, the admin socket with
/// meshauth as delegate) passes SPIRE's own `validate` without a warning
/// (SPIRE warns, for one, when the SVID TTL leaves too little room under
/// the CA TTL). The standalone files are validated and run by every start
/// of the harness. SPIRE's `validate` reads the HCL and the core settings
/// but not the plugins' data (it accepts `database_type = "sqlite9"`):
/// the k8s plugins' settings meet a real start only with a real API
/// server.
#[test]
fn rendered_kubernetes_configs_pass_spire_validate() {
    let bin = spire_bin();
    let dir = spire_tempdir();
    let mut st = Settings::new(
        "prod.example",
        Deployment::Kubernetes {
            cluster: "prod-eu".into(),
            agent_service_account: "spire:spire-agent".into(),
        },
    );
    st.server.replicas = 3;
    st.server.datastore = DataStore::Postgres {
        connection_string: "dbname=spire host=db.invalid user=spire".into(),
    };
    st.agent.admin_socket_path = Some("/run/spire/admin/admin.sock".into());
    st.agent.authorized_delegates = vec!["spiffe://prod.example/meshauth/agent".into()];
    for (name, text, tool) in [
        ("server.conf", render_server(&st), "spire-server"),
        ("agent.conf", render_agent(&st), "spire-agent"),
    ] {
        let text = text.unwrap_or_else(|e| panic!("rendering {name}: {e}"));
        let path = dir.path().join(name);
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        let out = std::process::Command::new(bin.join(tool))
            .args(["validate", "-config"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("running {tool} validate: {e}"));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !said.contains("level=warning"),
            "{tool} validate refused or warned about {name}:\n{said}\n--- {name} ---\n{text}"
        );
    }
    // And SPIRE's validate is no rubber stamp: a broken file is refused.
    let broken = dir.path().join("broken.conf");
    std::fs::write(&broken, "server { trust_domain = \"x\" \n")
        .unwrap_or_else(|e| panic!("writing broken.conf: {e}"));
    let out = std::process::Command::new(bin.join("spire-server"))
        .args(["validate", "-config"])
        .arg(&broken)
        .output()
        .unwrap_or_else(|e| panic!("running spire-server validate: {e}"));
    assert!(
        !out.status.success(),
        "spire-server validate accepted a broken file"
    );
}

/// SPIRE's Delegated Identity API, meshauth's second SVID mode, against a
/// real agent: the agent's admin socket (rendered by spire-config, outside
/// the Workload API socket's directory) refuses a caller that is not an
/// authorized delegate, and serves an authorized one exactly the SVIDs of
/// the entries whose selectors it asks for.
#[tokio::test]
async fn delegated_identity_serves_a_pods_svids_only_to_an_authorized_delegate()
-> anyhow::Result<()> {
    init_tracing();
    let bin = spire_bin();
    let dir = spire_tempdir();
    let delegate = format!("spiffe://{TD}/meshauth/agent");
    let mut st = settings(dir.path(), TD)?;
    st.agent.admin_socket_path = Some(dir.path().join("admin").join("admin.sock"));
    st.agent.authorized_delegates = vec![delegate.clone()];
    st.agent.sync_interval = Some(Duration::from_millis(500));
    let server = SpireServer::start(&bin, &st)?;
    let alias = format!("spiffe://{TD}/meshauth/node/n1");
    let token = server.join_token(&alias)?;
    let agent = SpireAgent::start(&bin, &server, &st, &token)?;
    // Two "pods", told apart by uid.
    server.create_entry(
        &alias,
        &format!("spiffe://{TD}/identity/500"),
        &["unix:uid:4001"],
    )?;
    server.create_entry(
        &alias,
        &format!("spiffe://{TD}/identity/501"),
        &["unix:uid:4002"],
    )?;

    // This process has an identity, but not the delegate's.
    server.create_entry(
        &alias,
        &format!("spiffe://{TD}/ops/not-a-delegate"),
        &[&format!("unix:uid:{}", own_uid())],
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.served()?.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the agent did not serve this process its ID in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let cache = SvidCache::new(CacheConfig {
        trust_domain: TrustDomain::new(TD)?,
        ..CacheConfig::default()
    });
    let stop = CancellationToken::new();
    let admin = st
        .agent
        .admin_socket_path
        .clone()
        .unwrap_or_else(|| panic!("no admin socket"));
    let source = spawn_delegated_identity(
        DelegatedIdentityConfig::new(admin, vec![("unix".into(), "uid:4001".into())]),
        cache.clone(),
        stop.clone(),
    );

    // Not a delegate (its only ID is not in authorized_delegates): SPIRE
    // refuses, and the cache stays empty.
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        if let Some((_, e)) = source.status().last_error {
            break e.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no answer from the admin socket in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("not yet a delegate: {refusal}");
    assert!(
        refusal.contains("PermissionDenied") && refusal.contains("authorized delegate"),
        "SPIRE refuses an unauthorized caller: {refusal}"
    );
    assert!(cache.identities().is_empty());

    // This process becomes the delegate: the source (reconnecting with
    // backoff) gets identity 500, whose selectors it asked for, and not 501.
    server.create_entry(&alias, &delegate, &[&format!("unix:uid:{}", own_uid())])?;
    let mut generation = cache.watch_generation();
    tokio::time::timeout(Duration::from_secs(60), async {
        while cache.get(500).is_none() {
            generation.changed().await.unwrap_or_else(|e| panic!("{e}"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no SVID for identity 500 in 60 s: {:?}", source.status()));
    let svid = cache.get(500).unwrap_or_else(|| panic!("identity 500"));
    assert_eq!(leaf(&svid).spiffe_id, format!("spiffe://{TD}/identity/500"));
    assert_eq!(
        cache.identities(),
        [500],
        "only the asked-for selectors' SVIDs"
    );
    stop.cancel();
    source.join().await;
    Ok(())
}

/// The datastore's settings in a file of their own (SPIRE's
/// `plugin_data_file`, what the chart mounts from a Secret so the
/// ConfigMap holds no password): a real server starts on it and serves —
/// sqlite3 here, the same file format as postgres's.
#[test]
fn the_server_starts_with_its_datastore_settings_in_a_file() {
    let bin = spire_bin();
    let dir = spire_tempdir();
    let mut st = settings(dir.path(), TD).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.path().join("datastore.hcl");
    let db = dir.path().join("from-file.sqlite3");
    std::fs::write(
        &file,
        spire_config::render_sql_plugin_data("sqlite3", &db.display().to_string()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    st.server.datastore = DataStore::SqlFile {
        plugin_data_file: file.clone(),
    };
    let conf = render_server(&st).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        conf.contains(&format!("plugin_data_file = \"{}\"", file.display())),
        "{conf}"
    );
    assert!(!conf.contains("connection_string"), "{conf}");
    let server = SpireServer::start(&bin, &st).unwrap_or_else(|e| panic!("{e}"));
    let id = server
        .create_entry(
            &format!("spiffe://{TD}/meshauth/node/n1"),
            &format!("spiffe://{TD}/identity/300"),
            &["unix:uid:1"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!id.is_empty());
    assert!(
        std::fs::metadata(&db).is_ok_and(|m| m.len() > 0),
        "the server keeps its entries in the database the file names"
    );
}
