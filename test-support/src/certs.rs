//! Certificates for tests: real CAs and SVIDs generated with rcgen, good and
//! bad. A [`LeafSpec`] says what a leaf looks like; tests change its fields
//! to make the bad ones (two URI SANs, a CA leaf, a foreign trust domain,
//! expired, not yet valid, missing key usages).

use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
pub use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use svid_cache::{CacheConfig, SvidCache, SvidInput, TrustBundle, TrustDomain, Update};

/// The trust domain of the tests (meshauth's default).
pub const TD: &str = "meshauth.local";
pub const HOUR: Duration = Duration::from_secs(3600);
pub const MINUTE: Duration = Duration::from_secs(60);

/// A whole-second time near now (certificates carry seconds).
pub fn base_time() -> SystemTime {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn odt(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_else(|e| panic!("certificate time {t:?} before 1970: {e}"))
        .as_secs();
    let secs = i64::try_from(secs).expect("certificate time fits i64 seconds");
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap_or_else(|e| panic!("certificate time {secs}s after 1970: {e}"))
}

/// The trust domain [`TD`].
pub fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap_or_else(|e| panic!("trust domain {TD}: {e}"))
}

/// A bundle of [`TD`] holding `cas`.
pub fn bundle(cas: &[&Ca]) -> TrustBundle {
    TrustBundle::new(td(), cas.iter().map(|c| c.der()).collect())
        .unwrap_or_else(|e| panic!("bundle of {} CAs: {e}", cas.len()))
}

/// A cache (default config, system clock) trusting `ca` and holding
/// `leaves`, applied directly (no source).
pub fn cache_with(ca: &Ca, leaves: &[&Leaf]) -> SvidCache {
    let cache = SvidCache::new(CacheConfig::default());
    cache
        .apply(Update {
            svids: Some(leaves.iter().map(|l| l.input()).collect()),
            bundle: Some(bundle(&[ca])),
        })
        .unwrap_or_else(|e| panic!("applying test SVIDs: {e}"));
    cache
}

/// A certificate authority: a root or an intermediate.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// For an intermediate: itself, then its intermediate parents (not the root).
    parents: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("intermediates", &self.parents.len())
            .finish_non_exhaustive()
    }
}

/// What a leaf should look like.
#[derive(Clone, Debug)]
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

    /// A normal SVID with the one URI SAN `uri`, valid `[now - 1 min, now + life]`.
    pub fn uri(uri: &str, now: SystemTime, life: Duration) -> Self {
        Self {
            uris: vec![uri.to_owned()],
            is_ca: false,
            not_before: now - MINUTE,
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

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Leaf {
    /// The leaf as svid-cache takes it from a source.
    pub fn input(&self) -> SvidInput {
        SvidInput {
            spiffe_id: self.spiffe_id.clone(),
            cert_chain: self.chain.clone(),
            private_key: PrivatePkcs8KeyDer::from(self.key.clone()),
        }
    }

    /// The key as rustls takes it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }

    /// The same leaf followed by `extra` (a substituted / padded chain).
    pub fn with_extra(&self, extra: CertificateDer<'static>) -> Leaf {
        let mut l = self.clone();
        l.chain.push(extra);
        l
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
    /// A self-signed root (ECDSA P-256, rcgen's default key).
    pub fn root(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(ca_params(name), key)
            .unwrap_or_else(|e| panic!("self-signing CA {name}: {e}"));
        Self {
            issuer,
            parents: Vec::new(),
        }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> Self {
        self.signed(name, ca_params(name))
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
        let mut p = ca_params(name);
        p.not_before = odt(not_before);
        p.not_after = odt(not_after);
        p.key_usages = key_usages;
        self.signed(name, p)
    }

    fn signed(&self, name: &str, p: CertificateParams) -> Self {
        let key = KeyPair::generate().expect("intermediate CA key");
        let issuer = CertifiedIssuer::signed_by(p, key, &self.issuer)
            .unwrap_or_else(|e| panic!("signing intermediate CA {name}: {e}"));
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
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, "SPIRE");
        p.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| {
                SanType::URI(
                    u.as_str()
                        .try_into()
                        .unwrap_or_else(|e| panic!("URI SAN {u}: {e}")),
                )
            })
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
        let cert = p
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("signing leaf {:?}: {e}", spec.uris));
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain());
        Leaf {
            spiffe_id: spec.uris.first().cloned().unwrap_or_default(),
            chain,
            key: key.serialize_der(),
        }
    }

    /// A normal SVID of `identity` in [`TD`], valid `[now - 1 min, now + life]`.
    pub fn svid(&self, identity: u32, now: SystemTime, life: Duration) -> Leaf {
        self.issue(&LeafSpec::identity(TD, identity, now, life))
    }
}
