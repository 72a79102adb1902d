//! One stored X.509-SVID, with what TLS needs built once when it arrives.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::bundle::TrustBundle;
use crate::identity::TrustDomain;
use crate::verify::{AnyEku, TimePolicy, VerifyError, check_chain};

/// An SVID as a source delivers it: SPIFFE ID, chain (leaf first) and PKCS#8 key.
pub struct SvidInput {
    /// The SPIFFE ID the source says this SVID is for.
    pub spiffe_id: String,
    /// The certificate chain, leaf first, one DER certificate each.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key, PKCS#8 DER.
    pub private_key: PrivatePkcs8KeyDer<'static>,
}

impl Clone for SvidInput {
    fn clone(&self) -> Self {
        Self {
            spiffe_id: self.spiffe_id.clone(),
            cert_chain: self.cert_chain.clone(),
            private_key: self.private_key.clone_key(),
        }
    }
}

impl std::fmt::Debug for SvidInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidInput")
            .field("spiffe_id", &self.spiffe_id)
            .field("certs", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

/// Why one SVID of an update could not be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The certificate chain failed a structural or trust check.
    #[error("SVID {spiffe_id}: {source}")]
    Chain {
        /// The SPIFFE ID the source gave.
        spiffe_id: String,
        /// What was wrong with the chain.
        #[source]
        source: VerifyError,
    },
    /// The leaf's URI SAN is not the SPIFFE ID the source gave.
    #[error("SVID {claimed}: leaf certificate is for {in_certificate}")]
    SpiffeIdMismatch {
        /// The SPIFFE ID the source gave.
        claimed: String,
        /// The SPIFFE ID in the leaf.
        in_certificate: String,
    },
    /// The private key is not a PKCS#8 key ring can sign with.
    #[error(
        "SVID {spiffe_id}: private key ({len} bytes) is not a usable PKCS#8 ECDSA/Ed25519/RSA key: {reason}"
    )]
    PrivateKey {
        /// The SPIFFE ID the source gave.
        spiffe_id: String,
        /// Length of the key bytes.
        len: usize,
        /// What rustls/ring said.
        reason: String,
    },
    /// The private key does not belong to the leaf's public key.
    #[error("SVID {spiffe_id}: private key does not match the leaf certificate's public key")]
    KeyMismatch {
        /// The SPIFFE ID the source gave.
        spiffe_id: String,
    },
}

/// A stored X.509-SVID for one numeric identity.
///
/// The rustls [`CertifiedKey`] (chain + ring signing key) is built once, when the
/// SVID is stored, and shared by every handshake.
pub struct Svid {
    identity: u32,
    certified_key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Svid {
    /// Validates `input` and builds the signing key.
    ///
    /// Checks the chain as [`crate::verify`] does (except the leaf's validity
    /// period, which the cache handles) against `bundle` when given, that the leaf
    /// names `input.spiffe_id`, and that the key matches the leaf.
    pub fn build(
        input: &SvidInput,
        trust_domain: &TrustDomain,
        bundle: Option<&TrustBundle>,
        now: SystemTime,
    ) -> Result<Self, SvidError> {
        let leaf = check_chain(
            &input.cert_chain,
            trust_domain,
            bundle,
            now,
            TimePolicy::Insert,
            AnyEku,
        )
        .map_err(|source| SvidError::Chain {
            spiffe_id: input.spiffe_id.clone(),
            source,
        })?;
        if leaf.spiffe_id != input.spiffe_id {
            return Err(SvidError::SpiffeIdMismatch {
                claimed: input.spiffe_id.clone(),
                in_certificate: leaf.spiffe_id,
            });
        }
        let key_der = PrivateKeyDer::Pkcs8(input.private_key.clone_key());
        let key = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
            SvidError::PrivateKey {
                spiffe_id: input.spiffe_id.clone(),
                len: input.private_key.secret_pkcs8_der().len(),
                reason: e.to_string(),
            }
        })?;
        let certified_key = CertifiedKey::new(input.cert_chain.clone(), key);
        match certified_key.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(SvidError::KeyMismatch {
                    spiffe_id: input.spiffe_id.clone(),
                });
            }
        }
        Ok(Self {
            identity: leaf.identity,
            certified_key: Arc::new(certified_key),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }

    /// The numeric identity.
    pub fn identity(&self) -> u32 {
        self.identity
    }

    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.certified_key.cert
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified_key.cert[0]
    }

    /// The chain and signing key, ready for rustls.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The leaf's NotBefore.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The leaf's NotAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether the SVID may be used at `now` (before NotAfter).
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now < self.not_after
    }

    /// Whether `chain` is exactly this SVID's chain.
    pub(crate) fn same_chain(&self, chain: &[CertificateDer<'_>]) -> bool {
        self.certified_key.cert.len() == chain.len()
            && self
                .certified_key
                .cert
                .iter()
                .zip(chain)
                .all(|(a, b)| a.as_ref() == b.as_ref())
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("identity", &self.identity)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("certs", &self.certified_key.cert.len())
            .finish_non_exhaustive()
    }
}
