//! Signatures over application messages with an SVID's key, and their
//! verification against a peer's leaf certificate.
//!
//! The handshake's pair proofs (`meshauth/2`) sign a message bound to a TLS
//! session with the key of an identity's SVID, as TLS 1.3's CertificateVerify
//! does inside the handshake (RFC 9261's exported authenticators are the
//! model). Only TLS 1.3 signature schemes are used, and the key never leaves
//! its [`CertifiedKey`]: signing goes through rustls' `SigningKey`.

use rustls::SignatureScheme;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

/// Why a proof could not be signed or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The key supports none of the TLS 1.3 signature schemes.
    #[error("the SVID's key supports no TLS 1.3 signature scheme")]
    NoScheme,
    /// Signing failed.
    #[error("signing with the SVID's key: {0}")]
    Sign(String),
    /// The peer named a scheme that is not a TLS 1.3 scheme this build verifies.
    #[error("signature scheme {scheme:#06x} is not a TLS 1.3 scheme this agent verifies")]
    UnsupportedScheme {
        /// The scheme's code point.
        scheme: u16,
    },
    /// The leaf does not parse as an end-entity certificate.
    #[error("the signer's certificate does not parse: {0}")]
    Certificate(String),
    /// The signature is not the leaf key's signature over the message.
    #[error("the signature does not verify with the certificate's key ({scheme:?})")]
    BadSignature {
        /// The scheme the peer named.
        scheme: SignatureScheme,
    },
}

/// Whether `scheme` may sign in TLS 1.3 (RFC 8446 §4.2.3: no PKCS#1 v1.5, no SHA-1).
fn tls13(scheme: SignatureScheme) -> bool {
    use SignatureScheme as S;
    matches!(
        scheme,
        S::ECDSA_NISTP256_SHA256
            | S::ECDSA_NISTP384_SHA384
            | S::ECDSA_NISTP521_SHA512
            | S::RSA_PSS_SHA256
            | S::RSA_PSS_SHA384
            | S::RSA_PSS_SHA512
            | S::ED25519
            | S::ED448
    )
}

/// The TLS 1.3 signature schemes this crate's provider verifies, in order of preference.
fn tls13_schemes() -> Vec<SignatureScheme> {
    crate::tls::provider()
        .signature_verification_algorithms
        .supported_schemes()
        .into_iter()
        .filter(|s| tls13(*s))
        .collect()
}

/// Signs `message` with `key`'s private key; returns the scheme used and the signature.
pub fn sign(key: &CertifiedKey, message: &[u8]) -> Result<(SignatureScheme, Vec<u8>), ProofError> {
    let signer = key
        .key
        .choose_scheme(&tls13_schemes())
        .ok_or(ProofError::NoScheme)?;
    let signature = signer
        .sign(message)
        .map_err(|e| ProofError::Sign(e.to_string()))?;
    Ok((signer.scheme(), signature))
}

/// Verifies that `signature` is `leaf`'s key's signature over `message` by `scheme`
/// (a TLS 1.3 scheme). The leaf's chain is not checked here: verify it first.
pub fn verify(
    leaf: &CertificateDer<'_>,
    scheme: SignatureScheme,
    message: &[u8],
    signature: &[u8],
) -> Result<(), ProofError> {
    let unsupported = ProofError::UnsupportedScheme {
        scheme: u16::from(scheme),
    };
    if !tls13(scheme) {
        return Err(unsupported);
    }
    let algorithms = crate::tls::provider().signature_verification_algorithms;
    let alg = algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .and_then(|(_, algs)| algs.first())
        .ok_or(unsupported)?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| ProofError::Certificate(format!("{e:?}")))?;
    cert.verify_signature(*alg, message, signature)
        .map_err(|_| ProofError::BadSignature { scheme })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_and_leaf() -> (CertifiedKey, CertificateDer<'static>) {
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let der = cert.der().clone();
        let key = rustls::crypto::ring::sign::any_supported_type(
            &rustls_pki_types::PrivateKeyDer::Pkcs8(kp.serialize_der().into()),
        )
        .unwrap();
        (CertifiedKey::new(vec![der.clone()], key), der)
    }

    #[test]
    fn a_signature_verifies_only_for_its_message_key_and_scheme() {
        let (key, leaf) = key_and_leaf();
        let (other, other_leaf) = key_and_leaf();
        let (scheme, sig) = sign(&key, b"message").unwrap();
        assert_eq!(scheme, SignatureScheme::ECDSA_NISTP256_SHA256);
        verify(&leaf, scheme, b"message", &sig).unwrap();
        assert_eq!(
            verify(&leaf, scheme, b"messagE", &sig),
            Err(ProofError::BadSignature { scheme })
        );
        assert_eq!(
            verify(&other_leaf, scheme, b"message", &sig),
            Err(ProofError::BadSignature { scheme })
        );
        let mut flipped = sig.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(verify(&leaf, scheme, b"message", &flipped).is_err());
        let (_, sig2) = sign(&other, b"message").unwrap();
        assert!(verify(&leaf, scheme, b"message", &sig2).is_err());
    }

    #[test]
    fn tls12_only_and_unknown_schemes_are_refused() {
        let (key, leaf) = key_and_leaf();
        let (_, sig) = sign(&key, b"m").unwrap();
        for scheme in [
            SignatureScheme::RSA_PKCS1_SHA256,
            SignatureScheme::ECDSA_SHA1_Legacy,
            SignatureScheme::Unknown(0xfefe),
        ] {
            assert!(
                matches!(
                    verify(&leaf, scheme, b"m", &sig),
                    Err(ProofError::UnsupportedScheme { .. })
                ),
                "{scheme:?}"
            );
        }
        assert!(matches!(
            verify(
                &CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]),
                SignatureScheme::ECDSA_NISTP256_SHA256,
                b"m",
                &sig
            ),
            Err(ProofError::Certificate(_))
        ));
    }
}
