//! SPIFFE peer verification as a pure function: certificate chain, trust bundle,
//! time and expectation in; the verified identity or the precise reason out.
//!
//! The rustls verifiers in [`crate::tls`] call [`verify_peer`]; the cache runs the
//! same structural checks on every SVID it stores.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter, KeyUsage};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::bundle::TrustBundle;
use crate::identity::{TrustDomain, split_spiffe_id};

/// Why a peer's certificate chain was rejected. Each case has its own variant so
/// callers can label metrics; inside rustls it travels as
/// `CertificateError::Other(OtherError(Arc<VerifyError>))` (see [`VerifyError::from_rustls`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// No trust bundle is known yet, so nothing can be verified.
    #[error(
        "no trust bundle for {trust_domain} yet; cannot verify peers before the first bundle arrives"
    )]
    NoTrustBundle {
        /// The configured trust domain.
        trust_domain: String,
    },
    /// A certificate of the chain is not DER X.509.
    #[error("certificate #{index} of the chain does not parse as X.509: {reason}")]
    Malformed {
        /// Position in the chain (0 = leaf).
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// The leaf has no URI SAN; an X.509-SVID has exactly one.
    #[error("leaf has no URI SAN; an X.509-SVID carries exactly one spiffe:// URI")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("leaf has {count} URI SANs ({uris:?}); an X.509-SVID carries exactly one")]
    MultipleUriSans {
        /// How many there are.
        count: usize,
        /// The URIs.
        uris: Vec<String>,
    },
    /// The leaf's URI SAN is not a SPIFFE ID.
    #[error("leaf URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    InvalidSpiffeId {
        /// The URI SAN.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The leaf is a CA certificate (basicConstraints cA=true).
    #[error(
        "leaf {spiffe_id} is a CA certificate (basicConstraints cA=true); an X.509-SVID leaf must not be"
    )]
    LeafIsCa {
        /// The leaf's SPIFFE ID.
        spiffe_id: String,
    },
    /// The SPIFFE ID belongs to another trust domain.
    #[error("SPIFFE ID {spiffe_id} is not in trust domain {expected}")]
    ForeignTrustDomain {
        /// The leaf's SPIFFE ID.
        spiffe_id: String,
        /// The configured trust domain.
        expected: String,
    },
    /// The SPIFFE ID's path is not `/identity/<u32>`.
    #[error(
        "SPIFFE ID {spiffe_id} is not an identity path; expected spiffe://{trust_domain}/identity/<N>"
    )]
    NotIdentityPath {
        /// The leaf's SPIFFE ID.
        spiffe_id: String,
        /// The configured trust domain.
        trust_domain: String,
    },
    /// The leaf's NotAfter has passed.
    #[error("leaf {spiffe_id} expired at {} (now {})", unix(*.not_after), unix(*.now))]
    Expired {
        /// The leaf's SPIFFE ID.
        spiffe_id: String,
        /// The leaf's NotAfter.
        not_after: SystemTime,
        /// The time it was checked at.
        now: SystemTime,
    },
    /// The leaf's NotBefore is still ahead.
    #[error("leaf {spiffe_id} is not valid before {} (now {})", unix(*.not_before), unix(*.now))]
    NotYetValid {
        /// The leaf's SPIFFE ID.
        spiffe_id: String,
        /// The leaf's NotBefore.
        not_before: SystemTime,
        /// The time it was checked at.
        now: SystemTime,
    },
    /// The leaf's key usage breaks the X.509-SVID rules (digitalSignature
    /// required; keyCertSign and cRLSign forbidden).
    #[error(
        "leaf {spiffe_id} key usage: {reason}; an X.509-SVID leaf must set digitalSignature and must not set keyCertSign or cRLSign"
    )]
    LeafKeyUsage {
        /// The leaf's SPIFFE ID.
        spiffe_id: String,
        /// What is wrong.
        reason: String,
    },
    /// A CA certificate of the chain lacks the keyCertSign key usage.
    #[error(
        "certificate #{index} of the chain is a CA without keyCertSign key usage; a SPIFFE signing certificate must set it"
    )]
    CaKeyUsage {
        /// Position in the chain.
        index: usize,
    },
    /// A certificate after the leaf is past its NotAfter.
    #[error("certificate #{index} of the chain expired at {} (now {})", unix(*.not_after), unix(*.now))]
    IntermediateExpired {
        /// Position in the chain.
        index: usize,
        /// Its NotAfter.
        not_after: SystemTime,
        /// The time it was checked at.
        now: SystemTime,
    },
    /// A certificate after the leaf is before its NotBefore.
    #[error("certificate #{index} of the chain is not valid before {} (now {})", unix(*.not_before), unix(*.now))]
    IntermediateNotYetValid {
        /// Position in the chain.
        index: usize,
        /// Its NotBefore.
        not_before: SystemTime,
        /// The time it was checked at.
        now: SystemTime,
    },
    /// A certificate after the leaf is not a CA: a substituted or padded chain.
    #[error(
        "certificate #{index} of the chain is not a CA; every certificate after the leaf must be (certificate substitution?)"
    )]
    NonCaInChain {
        /// Position in the chain.
        index: usize,
    },
    /// webpki found no valid path from the leaf to the trust bundle.
    #[error("chain of {spiffe_id} does not end at the trust bundle of {trust_domain}: {reason}")]
    UntrustedChain {
        /// The leaf's SPIFFE ID.
        spiffe_id: String,
        /// The bundle's trust domain.
        trust_domain: String,
        /// webpki's reason.
        reason: String,
    },
    /// The peer is a valid identity, but not the one expected.
    #[error("peer is identity {actual}, expected identity {expected}")]
    UnexpectedIdentity {
        /// The identity required.
        expected: u32,
        /// The identity presented.
        actual: u32,
    },
    /// The peer is a valid identity that the caller does not know.
    #[error("peer identity {identity} is not a known identity")]
    UnknownIdentity {
        /// The identity presented.
        identity: u32,
    },
}

fn unix(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!("unix {}", d.as_secs()),
        Err(e) => format!("unix -{}", e.duration().as_secs()),
    }
}

impl VerifyError {
    /// Finds the `VerifyError` inside a rustls error produced by this crate's verifiers.
    pub fn from_rustls(err: &rustls::Error) -> Option<&VerifyError> {
        match err {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<VerifyError>()
            }
            _ => None,
        }
    }

    /// Wraps this error for rustls.
    pub fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(self),
        )))
    }

    /// A short stable label for metrics (`"expired"`, `"unexpected_identity"`, …).
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::NoTrustBundle { .. } => "no_trust_bundle",
            Self::Malformed { .. } => "malformed",
            Self::NoUriSan => "no_uri_san",
            Self::MultipleUriSans { .. } => "multiple_uri_sans",
            Self::InvalidSpiffeId { .. } => "invalid_spiffe_id",
            Self::LeafIsCa { .. } => "leaf_is_ca",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::NotIdentityPath { .. } => "not_identity_path",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::LeafKeyUsage { .. } => "leaf_key_usage",
            Self::CaKeyUsage { .. } => "ca_key_usage",
            Self::IntermediateExpired { .. } => "intermediate_expired",
            Self::IntermediateNotYetValid { .. } => "intermediate_not_yet_valid",
            Self::NonCaInChain { .. } => "non_ca_in_chain",
            Self::UntrustedChain { .. } => "untrusted_chain",
            Self::UnexpectedIdentity { .. } => "unexpected_identity",
            Self::UnknownIdentity { .. } => "unknown_identity",
        }
    }
}

/// Which side of the handshake the peer is; selects the extended key usage
/// required if the leaf has an EKU extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is the TLS server (EKU serverAuth if present).
    Server,
    /// The peer is the TLS client (EKU clientAuth if present).
    Client,
}

/// Which identities are acceptable.
#[derive(Clone)]
pub enum ExpectedIdentity {
    /// Exactly this identity.
    Exact(u32),
    /// Any identity for which the predicate returns true.
    Known(Arc<dyn Fn(u32) -> bool + Send + Sync>),
}

impl fmt::Debug for ExpectedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(n) => f.debug_tuple("Exact").field(n).finish(),
            Self::Known(_) => f.write_str("Known(..)"),
        }
    }
}

/// What a peer must be.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// The peer's role in the handshake.
    pub role: PeerRole,
    /// The identities accepted.
    pub identity: ExpectedIdentity,
}

/// A peer that passed [`verify_peer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer {
    /// The peer's numeric identity.
    pub identity: u32,
    /// The peer's SPIFFE ID.
    pub spiffe_id: String,
    /// The leaf's NotAfter.
    pub not_after: SystemTime,
}

/// Verifies a peer's chain (leaf first) against `bundle` at time `now`.
///
/// Checks, in order: a certificate is present and each parses; the leaf has exactly
/// one URI SAN, a SPIFFE ID of the bundle's trust domain with an identity path; the
/// leaf is not a CA and its key usage has digitalSignature (and neither keyCertSign
/// nor cRLSign); it is valid at `now`; every certificate after the leaf is a CA with
/// keyCertSign, valid at `now`; webpki builds a path to the bundle's authorities (signatures, validity of the
/// intermediates, EKU of the role if present); the identity is the expected one.
pub fn verify_peer(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    expect: &Expectation,
) -> Result<VerifiedPeer, VerifyError> {
    let usage = match expect.role {
        PeerRole::Server => KeyUsage::server_auth(),
        PeerRole::Client => KeyUsage::client_auth(),
    };
    let leaf = check_chain(
        chain,
        bundle.trust_domain(),
        Some(bundle),
        now,
        TimePolicy::Strict,
        usage,
    )?;
    match &expect.identity {
        ExpectedIdentity::Exact(n) if *n != leaf.identity => {
            return Err(VerifyError::UnexpectedIdentity {
                expected: *n,
                actual: leaf.identity,
            });
        }
        ExpectedIdentity::Known(known) if !known(leaf.identity) => {
            return Err(VerifyError::UnknownIdentity {
                identity: leaf.identity,
            });
        }
        _ => {}
    }
    Ok(VerifiedPeer {
        identity: leaf.identity,
        spiffe_id: leaf.spiffe_id,
        not_after: leaf.not_after,
    })
}

/// What [`check_chain`] learned about the leaf.
#[derive(Debug)]
pub(crate) struct LeafInfo {
    pub identity: u32,
    pub spiffe_id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The latest NotBefore and earliest NotAfter over the whole chain,
    /// leaf included: when every certificate is within its period.
    pub chain_not_before: SystemTime,
    pub chain_not_after: SystemTime,
}

/// How [`check_chain`] treats the leaf's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimePolicy {
    /// Reject a leaf that is expired or not yet valid at `now`.
    Strict,
    /// Storing an SVID: don't check the leaf's period (the caller decides), and
    /// build the path at `max(now, NotBefore)` so a freshly issued SVID from a
    /// slightly fast CA clock is accepted.
    Insert,
}

/// Accepts any extended key usage (used when storing our own SVIDs; peers check
/// the EKU for their role).
pub(crate) struct AnyEku;

impl ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, _iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

pub(crate) fn check_chain(
    chain: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
    bundle: Option<&TrustBundle>,
    now: SystemTime,
    time: TimePolicy,
    usage: impl ExtendedKeyUsageValidator,
) -> Result<LeafInfo, VerifyError> {
    let Some(leaf_der) = chain.first() else {
        return Err(VerifyError::NoCertificate);
    };
    let leaf = parse(leaf_der, 0)?;
    let spiffe_id = single_uri_san(&leaf)?;
    let identity =
        match split_spiffe_id(&spiffe_id) {
            Err(e) => {
                return Err(VerifyError::InvalidSpiffeId {
                    uri: spiffe_id,
                    reason: match e {
                        crate::identity::IdentityError::InvalidSpiffeId { reason, .. } => {
                            reason.to_owned()
                        }
                        other => other.to_string(),
                    },
                });
            }
            Ok((td, _)) if td != trust_domain.as_str() => {
                return Err(VerifyError::ForeignTrustDomain {
                    spiffe_id,
                    expected: trust_domain.to_string(),
                });
            }
            Ok(_) => trust_domain.parse_spiffe_id(&spiffe_id).map_err(|_| {
                VerifyError::NotIdentityPath {
                    spiffe_id: spiffe_id.clone(),
                    trust_domain: trust_domain.to_string(),
                }
            })?,
        };
    if leaf.is_ca() {
        return Err(VerifyError::LeafIsCa { spiffe_id });
    }
    if let Some(reason) = leaf_key_usage_problem(&leaf) {
        return Err(VerifyError::LeafKeyUsage { spiffe_id, reason });
    }
    let validity = leaf.validity();
    let not_before = to_system_time(validity.not_before.timestamp());
    let not_after = to_system_time(validity.not_after.timestamp());
    if time == TimePolicy::Strict {
        if now < not_before {
            return Err(VerifyError::NotYetValid {
                spiffe_id,
                not_before,
                now,
            });
        }
        if now >= not_after {
            return Err(VerifyError::Expired {
                spiffe_id,
                not_after,
                now,
            });
        }
    }
    let mut chain_not_before = not_before;
    let mut chain_not_after = not_after;
    for (index, der) in chain.iter().enumerate().skip(1) {
        let cert = parse(der, index)?;
        if !cert.is_ca() {
            return Err(VerifyError::NonCaInChain { index });
        }
        let signs = matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
        if !signs {
            return Err(VerifyError::CaKeyUsage { index });
        }
        let v = cert.validity();
        let (nb, na) = (
            to_system_time(v.not_before.timestamp()),
            to_system_time(v.not_after.timestamp()),
        );
        if time == TimePolicy::Strict {
            if now < nb {
                return Err(VerifyError::IntermediateNotYetValid {
                    index,
                    not_before: nb,
                    now,
                });
            }
            if now >= na {
                return Err(VerifyError::IntermediateExpired {
                    index,
                    not_after: na,
                    now,
                });
            }
        }
        chain_not_before = chain_not_before.max(nb);
        chain_not_after = chain_not_after.min(na);
    }
    if let Some(bundle) = bundle {
        let path_time = match time {
            TimePolicy::Strict => now,
            // An expired leaf is still checked for its path; the caller drops it.
            TimePolicy::Insert => now.max(not_before).min(not_after),
        };
        let untrusted = |reason: String| VerifyError::UntrustedChain {
            spiffe_id: spiffe_id.clone(),
            trust_domain: bundle.trust_domain().to_string(),
            reason,
        };
        let ee = EndEntityCert::try_from(leaf_der).map_err(|e| untrusted(format!("{e:?}")))?;
        let since_epoch = path_time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            bundle.anchors(),
            &chain[1..],
            UnixTime::since_unix_epoch(since_epoch),
            usage,
            None,
            None,
        )
        .map_err(|e| untrusted(webpki_reason(&e)))?;
    }
    Ok(LeafInfo {
        identity,
        spiffe_id,
        not_before,
        not_after,
        chain_not_before,
        chain_not_after,
    })
}

/// What is wrong with a leaf's key usage for an X.509-SVID, if anything.
fn leaf_key_usage_problem(leaf: &X509Certificate<'_>) -> Option<String> {
    match leaf.key_usage() {
        Err(e) => Some(format!("keyUsage does not parse: {e}")),
        Ok(None) => Some("no keyUsage extension".to_owned()),
        Ok(Some(ku)) => {
            let ku = ku.value;
            if !ku.digital_signature() {
                Some(format!("digitalSignature missing ({ku})"))
            } else if ku.key_cert_sign() || ku.crl_sign() {
                Some(format!("keyCertSign or cRLSign set ({ku})"))
            } else {
                None
            }
        }
    }
}

fn webpki_reason(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => {
            "UnknownIssuer: no path to any authority of the bundle".to_owned()
        }
        other => format!("{other:?}"),
    }
}

fn parse<'a>(
    der: &'a CertificateDer<'_>,
    index: usize,
) -> Result<X509Certificate<'a>, VerifyError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(VerifyError::Malformed {
            index,
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        }),
        Err(e) => Err(VerifyError::Malformed {
            index,
            reason: e.to_string(),
        }),
    }
}

fn single_uri_san(cert: &X509Certificate<'_>) -> Result<String, VerifyError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| VerifyError::Malformed {
            index: 0,
            reason: format!("subjectAltName: {e}"),
        })?;
    let mut uris: Vec<String> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.len() {
        0 => Err(VerifyError::NoUriSan),
        1 => Ok(uris.pop().unwrap_or_default()),
        count => Err(VerifyError::MultipleUriSans { count, uris }),
    }
}

pub(crate) fn to_system_time(unix_secs: i64) -> SystemTime {
    if unix_secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix_secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(unix_secs.unsigned_abs())
    }
}

/// Remembers chains that passed [`check_chain`] against a bundle, so a
/// handshake with a peer whose SVID was already verified skips the chain's
/// signature checks (two of the four ECDSA verifications in a mutual
/// handshake).
///
/// A hit must enforce everything the full check does. Keyed by the SHA-256
/// of the exact chain bytes and the peer role, so every check that depends
/// only on the bytes and the role (SAN, SPIFFE ID, CA flags, key usages,
/// EKU, signatures) holds for a hit as it did when the entry was made. What
/// depends on anything else is checked on every hit:
/// - time: `now` within the period of every certificate of the chain
///   (leaf and intermediates) and of every bundle authority;
/// - the bundle: the entry counts only for the exact bundle instance it was
///   verified against (the entry holds that `Arc`, so its address cannot be
///   reused by a newer bundle); any other bundle takes the full check;
/// - the expected identity.
///
/// Anything else (expiry, a new bundle, another chain) takes the full check,
/// which also produces the precise error.
#[derive(Debug, Default)]
pub(crate) struct PathCache {
    entries: std::sync::Mutex<std::collections::HashMap<([u8; 32], bool), CachedPath>>,
}

#[derive(Debug)]
struct CachedPath {
    bundle: std::sync::Arc<TrustBundle>,
    leaf: LeafInfo,
    /// The latest NotBefore among the chain's certificates.
    valid_from: SystemTime,
    /// The earliest NotAfter among the chain's certificates and the
    /// bundle's authorities.
    valid_until: SystemTime,
}

/// Most chains remembered; the cache starts afresh when full.
const PATH_CACHE_MAX: usize = 4096;

impl PathCache {
    /// [`verify_peer`] with the signature checks of a known chain skipped.
    pub(crate) fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        bundle: &std::sync::Arc<TrustBundle>,
        now: SystemTime,
        expect: &Expectation,
    ) -> Result<VerifiedPeer, VerifyError> {
        let key = (chain_digest(chain), expect.role == PeerRole::Server);
        let hit = {
            let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            map.get(&key).and_then(|c| {
                (std::sync::Arc::ptr_eq(&c.bundle, bundle)
                    && now >= c.valid_from
                    && now < c.valid_until)
                    .then(|| (c.leaf.identity, c.leaf.spiffe_id.clone(), c.leaf.not_after))
            })
        };
        let (identity, spiffe_id, not_after) = match hit {
            Some(h) => h,
            None => {
                let usage = match expect.role {
                    PeerRole::Server => KeyUsage::server_auth(),
                    PeerRole::Client => KeyUsage::client_auth(),
                };
                let leaf = check_chain(
                    chain,
                    bundle.trust_domain(),
                    Some(bundle),
                    now,
                    TimePolicy::Strict,
                    usage,
                )?;
                let out = (leaf.identity, leaf.spiffe_id.clone(), leaf.not_after);
                let valid_until = bundle
                    .authorities()
                    .iter()
                    .filter_map(|a| x509_parser::parse_x509_certificate(a.as_ref()).ok())
                    .map(|(_, c)| to_system_time(c.validity().not_after.timestamp()))
                    .fold(leaf.chain_not_after, std::cmp::min);
                let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() >= PATH_CACHE_MAX {
                    map.clear();
                }
                map.insert(
                    key,
                    CachedPath {
                        bundle: bundle.clone(),
                        valid_from: leaf.chain_not_before,
                        valid_until,
                        leaf,
                    },
                );
                out
            }
        };
        match &expect.identity {
            ExpectedIdentity::Exact(n) if *n != identity => {
                return Err(VerifyError::UnexpectedIdentity {
                    expected: *n,
                    actual: identity,
                });
            }
            ExpectedIdentity::Known(known) if !known(identity) => {
                return Err(VerifyError::UnknownIdentity { identity });
            }
            _ => {}
        }
        Ok(VerifiedPeer {
            identity,
            spiffe_id,
            not_after,
        })
    }
}

fn chain_digest(chain: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for c in chain {
        ctx.update(&(c.as_ref().len() as u64).to_be_bytes());
        ctx.update(c.as_ref());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
