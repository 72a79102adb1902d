//! The X.509 trust bundle of the configured trust domain, pre-parsed into webpki
//! trust anchors.

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::identity::TrustDomain;

/// Errors from building a trust bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The bundle holds no certificate.
    #[error(
        "trust bundle of {trust_domain}: no X.509 authority; a bundle needs at least one CA certificate"
    )]
    Empty {
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// A certificate of the bundle could not be parsed.
    #[error(
        "trust bundle of {trust_domain}: authority #{index} is not a DER X.509 certificate: {reason}"
    )]
    Malformed {
        /// The bundle's trust domain.
        trust_domain: String,
        /// Position of the certificate in the bundle.
        index: usize,
        /// What the parser said.
        reason: String,
    },
}

/// The trust bundle of one trust domain: its X.509 authorities, as DER and as
/// webpki trust anchors (parsed once, when the bundle arrives).
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from its authorities (one DER certificate each).
    pub fn new(
        trust_domain: TrustDomain,
        authorities: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        if authorities.is_empty() {
            return Err(BundleError::Empty {
                trust_domain: trust_domain.to_string(),
            });
        }
        let mut anchors = Vec::with_capacity(authorities.len());
        for (index, der) in authorities.iter().enumerate() {
            let malformed = |reason: String| BundleError::Malformed {
                trust_domain: trust_domain.to_string(),
                index,
                reason,
            };
            match x509_parser::parse_x509_certificate(der) {
                Ok(([], _)) => {}
                Ok((rest, _)) => {
                    return Err(malformed(format!("{} trailing bytes", rest.len())));
                }
                Err(e) => return Err(malformed(e.to_string())),
            }
            let anchor =
                webpki::anchor_from_trusted_cert(der).map_err(|e| malformed(format!("{e:?}")))?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self {
            trust_domain,
            authorities,
            anchors,
        })
    }

    /// Builds a bundle from concatenated DER certificates (the Workload API and
    /// Delegated Identity API encoding).
    pub fn from_concatenated_der(
        trust_domain: TrustDomain,
        mut der: &[u8],
    ) -> Result<Self, BundleError> {
        let mut authorities = Vec::new();
        while !der.is_empty() {
            match x509_parser::parse_x509_certificate(der) {
                Ok((rest, _)) => {
                    let len = der.len() - rest.len();
                    authorities.push(CertificateDer::from(der[..len].to_vec()));
                    der = rest;
                }
                Err(e) => {
                    return Err(BundleError::Malformed {
                        trust_domain: trust_domain.to_string(),
                        index: authorities.len(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        Self::new(trust_domain, authorities)
    }

    /// The trust domain whose authorities these are.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The authorities, DER.
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// The authorities as webpki trust anchors.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// Whether both bundles hold the same authorities in the same order.
    pub fn same_authorities(&self, other: &TrustBundle) -> bool {
        self.trust_domain == other.trust_domain && self.authorities == other.authorities
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("authorities", &self.authorities.len())
            .finish()
    }
}
