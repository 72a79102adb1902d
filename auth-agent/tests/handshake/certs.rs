//! Certificates for the handshake tests: real CAs and SVIDs from rcgen, good
//! and bad (mirrors svid-cache's test builder).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use svid_cache::SvidInput;

pub const TD: &str = "meshauth.local";
pub const HOUR: Duration = Duration::from_secs(3600);

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
        .expect("after 1970")
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).expect("valid timestamp")
}

/// A certificate authority (a self-signed root).
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a leaf should look like.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub uris: Vec<String>,
    pub is_ca: bool,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LeafSpec {
    /// A normal SVID of `identity` in `td`, valid `[now - 1 min, now + life]`.
    pub fn identity(td: &str, identity: u32, now: SystemTime, life: Duration) -> Self {
        Self {
            uris: vec![format!("spiffe://{td}/identity/{identity}")],
            is_ca: false,
            not_before: now - Duration::from_secs(60),
            not_after: now + life,
        }
    }
}

/// An issued leaf: chain (leaf first) and PKCS#8 key.
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

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

impl Leaf {
    pub fn input(&self) -> SvidInput {
        SvidInput {
            spiffe_id: self.spiffe_id.clone(),
            cert_chain: self.chain.clone(),
            private_key: PrivatePkcs8KeyDer::from(self.key.clone()),
        }
    }

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

impl Ca {
    pub fn root(name: &str) -> Self {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        p.not_before = odt(now - 24 * HOUR);
        p.not_after = odt(now + 24 * 365 * HOUR);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(p, key).expect("self-signed CA"),
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    pub fn issue(&self, spec: &LeafSpec) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, "SPIRE");
        p.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().expect("URI SAN")))
            .collect();
        p.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = if spec.is_ca {
            vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ]
        } else {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyAgreement,
            ]
        };
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = odt(spec.not_before);
        p.not_after = odt(spec.not_after);
        let cert = p.signed_by(&key, &self.issuer).expect("signing the leaf");
        Leaf {
            spiffe_id: spec.uris.first().cloned().unwrap_or_default(),
            chain: vec![cert.der().clone()],
            key: key.serialize_der(),
        }
    }

    /// A normal SVID of `identity` in meshauth.local, valid for `life`.
    pub fn svid(&self, identity: u32, life: Duration) -> Leaf {
        self.issue(&LeafSpec::identity(TD, identity, base_time(), life))
    }
}
