//! Certificates for tests: real CAs and SVIDs generated with rcgen, good and bad.
#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use svid_cache::SvidInput;

pub const TD: &str = "meshauth.local";
pub const HOUR: Duration = Duration::from_secs(3600);
pub const MINUTE: Duration = Duration::from_secs(60);

/// A whole-second time near now (certificates carry seconds).
pub fn base_time() -> SystemTime {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn odt(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
}

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// For an intermediate: itself, then its intermediate parents (not the root).
    parents: Vec<CertificateDer<'static>>,
}

/// What a leaf should look like.
#[derive(Clone)]
pub struct LeafSpec {
    pub uris: Vec<String>,
    pub is_ca: bool,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub eku: Vec<ExtendedKeyUsagePurpose>,
    /// Key usages; `None` = the usual ones for a leaf or CA.
    pub key_usages: Option<Vec<KeyUsagePurpose>>,
}

impl LeafSpec {
    /// A normal SVID of `identity` in trust domain `td`, valid `[now - 1 min, now + life]`.
    pub fn identity(td: &str, identity: u32, now: SystemTime, life: Duration) -> Self {
        Self::uri(&format!("spiffe://{td}/identity/{identity}"), now, life)
    }

    pub fn uri(uri: &str, now: SystemTime, life: Duration) -> Self {
        Self {
            uris: vec![uri.to_owned()],
            is_ca: false,
            not_before: now - Duration::from_secs(60),
            not_after: now + life,
            eku: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            key_usages: None,
        }
    }
}

/// An issued leaf: chain (leaf first, then intermediates) and PKCS#8 key.
#[derive(Clone)]
pub struct Leaf {
    pub spiffe_id: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Vec<u8>,
}

impl Leaf {
    pub fn input(&self) -> SvidInput {
        SvidInput {
            spiffe_id: self.spiffe_id.clone(),
            cert_chain: self.chain.clone(),
            private_key: PrivatePkcs8KeyDer::from(self.key.clone()),
        }
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "meshauth tests");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = odt(now - 24 * HOUR);
    p.not_after = odt(now + 24 * 365 * HOUR);
    p
}

impl Ca {
    /// A self-signed root.
    pub fn root(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let issuer = CertifiedIssuer::self_signed(ca_params(name), key).unwrap();
        Self {
            issuer,
            parents: Vec::new(),
        }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let issuer = CertifiedIssuer::signed_by(ca_params(name), key, &self.issuer).unwrap();
        let mut parents = vec![issuer.der().clone()];
        parents.extend(self.parents.iter().cloned());
        Self { issuer, parents }
    }

    /// An intermediate CA signed by this one, valid `[not_before, not_after]`
    /// with `key_usages`.
    pub fn intermediate_with(
        &self,
        name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
        key_usages: Vec<KeyUsagePurpose>,
    ) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = ca_params(name);
        p.not_before = odt(not_before);
        p.not_after = odt(not_after);
        p.key_usages = key_usages;
        let issuer = CertifiedIssuer::signed_by(p, key, &self.issuer).unwrap();
        let mut parents = vec![issuer.der().clone()];
        parents.extend(self.parents.iter().cloned());
        Self { issuer, parents }
    }

    /// This CA's certificate.
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Certificates to send after a leaf this CA signed: itself (if not a root) and its
    /// intermediate parents.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.parents.clone()
    }

    /// Issues a leaf per `spec`.
    pub fn issue(&self, spec: &LeafSpec) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, "SPIRE");
        p.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().unwrap()))
            .collect();
        p.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = if let Some(ku) = &spec.key_usages {
            ku.clone()
        } else if spec.is_ca {
            vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ]
        } else {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::KeyAgreement,
            ]
        };
        p.extended_key_usages = spec.eku.clone();
        p.not_before = odt(spec.not_before);
        p.not_after = odt(spec.not_after);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain());
        Leaf {
            spiffe_id: spec.uris.first().cloned().unwrap_or_default(),
            chain,
            key: key.serialize_der(),
        }
    }

    /// A normal SVID for `identity` of the default trust domain.
    pub fn svid(&self, identity: u32, now: SystemTime, life: Duration) -> Leaf {
        self.issue(&LeafSpec::identity(TD, identity, now, life))
    }
}

/// The trust domain used by tests.
pub fn td() -> svid_cache::TrustDomain {
    svid_cache::TrustDomain::new(TD).unwrap()
}

/// A bundle holding `cas`.
pub fn bundle(cas: &[&Ca]) -> svid_cache::TrustBundle {
    svid_cache::TrustBundle::new(td(), cas.iter().map(|c| c.der()).collect()).unwrap()
}

/// A wall clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<SystemTime>);

impl ManualClock {
    pub fn new(at: SystemTime) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self(std::sync::Mutex::new(at)))
    }

    pub fn set(&self, at: SystemTime) {
        *self.0.lock().unwrap() = at;
    }
}

impl svid_cache::Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// A cache trusting `cas`, holding no SVIDs, reading time from `clock`.
pub fn verifier_cache(cas: &[&Ca], clock: std::sync::Arc<ManualClock>) -> svid_cache::SvidCache {
    let cache = svid_cache::SvidCache::with_clock(svid_cache::CacheConfig::default(), clock);
    cache
        .apply(svid_cache::Update {
            svids: Some(Vec::new()),
            bundle: Some(bundle(cas)),
        })
        .unwrap();
    cache
}

/// Verifies `chain` the way the handshake does: through the rustls verifier
/// of the peer's role (server: `SpiffeServerVerifier`, exact identity;
/// client: `SpiffeClientVerifier`) backed by `cache`, its remembered chains
/// and its clock. The error is the `VerifyError` carried inside rustls'.
pub fn production_verify(
    cache: &svid_cache::SvidCache,
    chain: &[CertificateDer<'static>],
    expect: &svid_cache::Expectation,
) -> Result<(), svid_cache::VerifyError> {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::server::danger::ClientCertVerifier as _;
    use svid_cache::{ExpectedIdentity, PeerRole, SpiffeClientVerifier, SpiffeServerVerifier};

    let Some((leaf, rest)) = chain.split_first() else {
        return Err(svid_cache::VerifyError::NoCertificate);
    };
    let unix = rustls_pki_types::UnixTime::now();
    let r = match (&expect.role, &expect.identity) {
        (PeerRole::Server, ExpectedIdentity::Exact(n)) => {
            let name = rustls_pki_types::ServerName::try_from(format!("{n}.{TD}")).unwrap();
            SpiffeServerVerifier::new(cache.clone(), *n)
                .verify_server_cert(leaf, rest, &name, &[], unix)
                .map(|_| ())
        }
        (PeerRole::Server, ExpectedIdentity::Known(_)) => {
            panic!("the handshake's server verifier expects one exact identity")
        }
        (PeerRole::Client, ExpectedIdentity::Exact(n)) => {
            SpiffeClientVerifier::exact(cache.clone(), *n)
                .verify_client_cert(leaf, rest, unix)
                .map(|_| ())
        }
        (PeerRole::Client, ExpectedIdentity::Known(f)) => {
            let f = f.clone();
            SpiffeClientVerifier::known(cache.clone(), move |n| f(n))
                .verify_client_cert(leaf, rest, unix)
                .map(|_| ())
        }
    };
    r.map_err(|e| {
        svid_cache::VerifyError::from_rustls(&e)
            .unwrap_or_else(|| panic!("non-SPIFFE rustls error: {e:?}"))
            .clone()
    })
}
