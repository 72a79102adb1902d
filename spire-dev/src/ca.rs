//! The trust domain's certificate authority: an ECDSA P-256 self-signed root
//! from rcgen that signs X.509-SVIDs, with rotation (the bundle keeps previous
//! roots until pruned).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::entries::SpiffeId;

/// How far before issuance an SVID's NotBefore is set, for peers whose clocks
/// run a little behind (SPIRE backdates by the same amount).
pub const SVID_BACKDATE: Duration = Duration::from_secs(10);

/// The earliest an SVID is renewed after its issuance (see
/// [`Svid::renew_at`]).
pub const MIN_RENEWAL_AGE: Duration = Duration::from_secs(1);
/// Lifetime of a CA certificate.
pub const CA_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Errors of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// `KeyPair::generate_for(ECDSA P-256)` failed for `purpose`.
    #[error("KeyPair::generate_for(ECDSA P-256) for {purpose}: {source}")]
    KeyGen {
        /// What the key was for (`CA of <td>`, `SVID <id>`).
        purpose: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// `CertificateParams::self_signed` failed for the CA of `trust_domain`.
    #[error("CertificateParams::self_signed(CA of {trust_domain}): {source}")]
    SelfSign {
        /// The trust domain.
        trust_domain: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// `CertificateParams::signed_by` failed for the SVID of `spiffe_id`.
    #[error("CertificateParams::signed_by(SVID {spiffe_id}): {source}")]
    Sign {
        /// The SPIFFE ID being issued.
        spiffe_id: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// The SPIFFE ID `spiffe_id` could not be encoded as a URI SAN.
    #[error("URI SAN for {spiffe_id:?}: {source}")]
    Uri {
        /// The offending SPIFFE ID.
        spiffe_id: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
}

/// An issued X.509-SVID with its private key.
#[derive(Clone)]
pub struct Svid {
    /// The SPIFFE ID in the leaf's only URI SAN.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first (spire-dev signs leaves straight from the root,
    /// so the chain is the leaf alone).
    pub cert_chain: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub private_key_pkcs8: Vec<u8>,
    /// The leaf's serial number, lowercase hex without leading zeros.
    pub serial: String,
    /// When the server signed it.
    pub issued_at: SystemTime,
    /// NotBefore (issued_at minus [`SVID_BACKDATE`], whole seconds).
    pub not_before: SystemTime,
    /// NotAfter (issued_at + TTL, whole seconds).
    pub not_after: SystemTime,
    /// Which CA generation signed it (see [`CertificateAuthority::generation`]).
    pub ca_generation: u64,
}

impl Svid {
    /// The time the agent renews it, as SPIRE's agent does: when less than
    /// half of the certificate's validity (NotBefore to NotAfter, the
    /// backdate included) is left — but not sooner than
    /// [`MIN_RENEWAL_AGE`] after issuance (SPIRE renews at its syncs, so a
    /// TTL at or under the backdate makes both renew at every chance
    /// rather than in a tight loop).
    pub fn renew_at(&self) -> SystemTime {
        let validity = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        let half_left = self
            .not_after
            .checked_sub(validity / 2)
            .unwrap_or(self.issued_at);
        half_left.max(self.issued_at + MIN_RENEWAL_AGE)
    }

    /// Whether NotAfter has passed at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// The chain as concatenated DER (the Workload API's `x509_svid` field).
    pub fn chain_der(&self) -> Vec<u8> {
        self.cert_chain.concat()
    }

    /// NotAfter as Unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        unix_secs(self.not_after)
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after_unix())
            .field("ca_generation", &self.ca_generation)
            .field("private_key_pkcs8", &"<redacted>")
            .finish()
    }
}

/// One root of the trust domain.
struct Root {
    generation: u64,
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
}

/// The certificate authority of one trust domain.
pub struct CertificateAuthority {
    trust_domain: String,
    current: Root,
    /// Previous roots still in the bundle, newest first.
    previous: Vec<Root>,
    /// A prepared root: in the bundle, not signing yet (SPIRE's "X509 CA
    /// prepared", activated later).
    next: Option<Root>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("generation", &self.current.generation)
            .field("previous", &self.previous.len())
            .finish()
    }
}

impl CertificateAuthority {
    /// Creates the first root (generation 1) for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Self, CaError> {
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            current: new_root(trust_domain, 1)?,
            previous: Vec::new(),
            next: None,
        })
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The generation of the signing root (1, 2, ... one more per rotation).
    pub fn generation(&self) -> u64 {
        self.current.generation
    }

    /// The bundle: DER roots, the signing one first, then previous ones
    /// newest first, then a prepared one.
    pub fn bundle(&self) -> Vec<Vec<u8>> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .chain(&self.next)
            .map(|r| r.der.clone())
            .collect()
    }

    /// Prepares the next root, as SPIRE does ahead of a rotation: it joins
    /// the bundle at once and signs nothing until [`Self::activate`], so
    /// every peer trusts it before any SVID under it exists. Returns its
    /// generation (a root already prepared is kept).
    pub fn prepare(&mut self) -> Result<u64, CaError> {
        if self.next.is_none() {
            self.next = Some(new_root(&self.trust_domain, self.current.generation + 1)?);
        }
        Ok(self.current.generation + 1)
    }

    /// Makes the prepared root (prepared now if none was) the signing one;
    /// the old root stays in the bundle. Returns the new generation.
    pub fn activate(&mut self) -> Result<u64, CaError> {
        let next = match self.next.take() {
            Some(n) => n,
            None => new_root(&self.trust_domain, self.current.generation + 1)?,
        };
        let old = std::mem::replace(&mut self.current, next);
        self.previous.insert(0, old);
        Ok(self.current.generation)
    }

    /// Prepare and activate at once: a new root signs from now on; the old
    /// root stays in the bundle.
    pub fn rotate(&mut self) -> Result<u64, CaError> {
        self.activate()
    }

    /// Drops every previous root from the bundle; returns how many were dropped.
    pub fn prune(&mut self) -> usize {
        std::mem::take(&mut self.previous).len()
    }

    /// Signs a new SVID for `spiffe_id` with a fresh P-256 key, valid for `ttl`
    /// from now: one URI SAN, KeyUsage digitalSignature, not a CA, EKU
    /// serverAuth + clientAuth.
    pub fn issue(&self, spiffe_id: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        let id = spiffe_id.to_string();
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::KeyGen {
                purpose: format!("SVID {id}"),
                source,
            })?;
        let issued_at = whole_seconds(SystemTime::now());
        let not_before = issued_at - SVID_BACKDATE;
        let not_after = issued_at + ttl;
        let (serial, serial_hex) = random_serial();

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CountryName, "US");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "SPIRE");
        params.subject_alt_names = vec![SanType::URI(id.clone().try_into().map_err(|source| {
            CaError::Uri {
                spiffe_id: id.clone(),
                source,
            }
        })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.current.issuer)
            .map_err(|source| CaError::Sign {
                spiffe_id: id,
                source,
            })?;
        Ok(Svid {
            spiffe_id: spiffe_id.clone(),
            cert_chain: vec![cert.der().to_vec()],
            private_key_pkcs8: key.serialize_der(),
            serial: serial_hex,
            issued_at,
            not_before,
            not_after,
            ca_generation: self.current.generation,
        })
    }
}

fn new_root(trust_domain: &str, generation: u64) -> Result<Root, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::KeyGen {
        purpose: format!("CA of {trust_domain}"),
        source,
    })?;
    let now = whole_seconds(SystemTime::now());
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CountryName, "US");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "SPIFFE");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("spire-dev CA {trust_domain} #{generation}"),
    );
    let td_id = format!("spiffe://{trust_domain}");
    params.subject_alt_names = vec![SanType::URI(td_id.clone().try_into().map_err(
        |source| CaError::Uri {
            spiffe_id: td_id,
            source,
        },
    )?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::from(now - SVID_BACKDATE);
    params.not_after = OffsetDateTime::from(now + CA_TTL);
    params.serial_number = Some(random_serial().0);
    let cert = params
        .self_signed(&key)
        .map_err(|source| CaError::SelfSign {
            trust_domain: trust_domain.to_owned(),
            source,
        })?;
    Ok(Root {
        generation,
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    })
}

/// A random positive 128-bit serial whose hex form has no leading zero.
fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes[0] = 0x10 + bytes[0] % 0x70;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
}

/// Seconds since the Unix epoch (negative before it).
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_and_prune_bundle() {
        let mut ca = CertificateAuthority::new("meshauth.local").expect("ca");
        let first = ca.bundle();
        assert_eq!(first.len(), 1);
        assert_eq!(ca.rotate().expect("rotate"), 2);
        let b = ca.bundle();
        assert_eq!(b.len(), 2);
        assert_ne!(b[0], first[0]);
        assert_eq!(b[1], first[0]);
        assert_eq!(ca.prune(), 1);
        assert_eq!(ca.bundle(), vec![b[0].clone()]);
    }

    #[test]
    fn a_prepared_root_joins_the_bundle_before_it_signs() {
        let mut ca = CertificateAuthority::new("meshauth.local").expect("ca");
        let first = ca.bundle();
        assert_eq!(ca.prepare().expect("prepare"), 2);
        assert_eq!(
            ca.prepare().expect("prepare again"),
            2,
            "kept, not replaced"
        );
        let prepared = ca.bundle();
        assert_eq!(prepared.len(), 2);
        assert_eq!(prepared[0], first[0], "the old root still signs");
        assert_eq!(ca.generation(), 1);
        assert_eq!(ca.activate().expect("activate"), 2);
        let active = ca.bundle();
        assert_eq!(active.len(), 2);
        assert_eq!(active[0], prepared[1], "the prepared root signs now");
        assert_eq!(active[1], first[0], "the old one stays in the bundle");
    }

    #[test]
    fn svid_times_and_serial() {
        let ca = CertificateAuthority::new("meshauth.local").expect("ca");
        let id = SpiffeId::parse("spiffe://meshauth.local/identity/1").expect("id");
        let a = ca.issue(&id, Duration::from_secs(4)).expect("issue");
        let b = ca.issue(&id, Duration::from_secs(4)).expect("issue");
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.private_key_pkcs8, b.private_key_pkcs8);
        assert_eq!(
            a.not_after.duration_since(a.issued_at).expect("order"),
            Duration::from_secs(4)
        );
        // 4 s TTL, 10 s backdate: half of the 14 s validity is left before
        // issuance, so renewal comes at the floor.
        assert_eq!(a.renew_at(), a.issued_at + MIN_RENEWAL_AGE);
        let long = ca.issue(&id, Duration::from_secs(3600)).expect("issue");
        assert_eq!(
            long.renew_at(),
            long.not_after - (Duration::from_secs(3600) + SVID_BACKDATE) / 2,
            "half of NotBefore..NotAfter left, as SPIRE's agent"
        );
        assert_eq!(
            a.issued_at.duration_since(a.not_before).expect("order"),
            SVID_BACKDATE
        );
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.private_key_pkcs8)));
    }
}
