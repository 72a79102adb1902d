//! The rustls pieces: certificate resolvers backed by the cache and SPIFFE peer
//! verifiers backed by its trust bundle. TLS 1.3 only, ring provider.

use std::fmt;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::cache::SvidCache;
use crate::verify::{Expectation, ExpectedIdentity, PeerRole, VerifiedPeer, VerifyError};

/// Errors from building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the protocol version selection.
    #[error("{call}: {source}")]
    Config {
        /// The builder call that failed.
        call: &'static str,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
}

/// The ring provider all of this crate's TLS uses.
pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// Built once: every handshake verifies signatures with it.
static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> =
    std::sync::LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

fn algorithms() -> WebPkiSupportedAlgorithms {
    PROVIDER.signature_verification_algorithms
}

/// Presents the SVID of a fixed local identity as the client certificate;
/// presents nothing while that SVID is missing or expired.
#[derive(Debug, Clone)]
pub struct ClientCertResolver {
    cache: SvidCache,
    local: u32,
}

impl ClientCertResolver {
    /// A resolver presenting identity `local`'s SVID.
    pub fn new(cache: SvidCache, local: u32) -> Self {
        Self { cache, local }
    }
}

impl ResolvesClientCert for ClientCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let key = self.cache.certified_key(self.local);
        if key.is_none() {
            tracing::warn!(
                identity = self.local,
                "no valid SVID for the local identity; presenting no client certificate"
            );
        }
        key
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Presents the SVID of the identity named by the SNI `<N>.<td>`.
#[derive(Clone)]
pub struct ServerCertResolver {
    cache: SvidCache,
    serve: Option<Arc<dyn Fn(u32) -> bool + Send + Sync>>,
}

impl ServerCertResolver {
    /// A resolver serving any identity whose SVID the cache holds.
    pub fn new(cache: SvidCache) -> Self {
        Self { cache, serve: None }
    }

    /// Serves only identities for which `serve` is true (e.g. "has a local endpoint").
    pub fn with_filter(mut self, serve: impl Fn(u32) -> bool + Send + Sync + 'static) -> Self {
        self.serve = Some(Arc::new(serve));
        self
    }
}

impl fmt::Debug for ServerCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCertResolver")
            .field("cache", &self.cache)
            .field("filtered", &self.serve.is_some())
            .finish()
    }
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = client_hello.server_name() else {
            tracing::debug!("client sent no SNI; no certificate to serve");
            return None;
        };
        let Some(identity) = self.cache.trust_domain().parse_server_name(name) else {
            tracing::debug!(sni = name, trust_domain = %self.cache.trust_domain(), "SNI is not <N>.<trust domain>");
            return None;
        };
        if let Some(serve) = &self.serve
            && !serve(identity)
        {
            tracing::debug!(identity, "SNI names an identity not served here");
            return None;
        }
        let key = self.cache.certified_key(identity);
        if key.is_none() {
            tracing::debug!(identity, "no valid SVID for the requested identity");
        }
        key
    }
}

/// Verifies that the server is exactly SPIFFE identity `expected`, chained to the
/// cache's current trust bundle. The TLS server name is not used (the SPIFFE ID
/// in the URI SAN is what is checked).
#[derive(Debug, Clone)]
pub struct SpiffeServerVerifier {
    cache: SvidCache,
    expected: u32,
}

impl SpiffeServerVerifier {
    /// Expects the server to be `expected`.
    pub fn new(cache: SvidCache, expected: u32) -> Self {
        Self { cache, expected }
    }

    /// The verification itself, as a [`VerifyError`] rather than a rustls error.
    pub fn verify(&self, chain: &[CertificateDer<'_>]) -> Result<VerifiedPeer, VerifyError> {
        verify_with_cache(
            &self.cache,
            chain,
            &Expectation {
                role: PeerRole::Server,
                identity: ExpectedIdentity::Exact(self.expected),
            },
        )
    }
}

fn verify_with_cache(
    cache: &SvidCache,
    chain: &[CertificateDer<'_>],
    expect: &Expectation,
) -> Result<VerifiedPeer, VerifyError> {
    let bundle = cache.bundle().ok_or_else(|| VerifyError::NoTrustBundle {
        trust_domain: cache.trust_domain().to_string(),
    })?;
    let result = cache
        .path_cache()
        .verify(chain, &bundle, cache.clock().now(), expect);
    if let Err(e) = &result {
        tracing::info!(reason = e.label(), error = %e, "peer certificate rejected");
    }
    result
}

fn full_chain<'a>(
    end_entity: &CertificateDer<'a>,
    intermediates: &[CertificateDer<'a>],
) -> Vec<CertificateDer<'a>> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    chain
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(&full_chain(end_entity, intermediates))
            .map(|_| ServerCertVerified::assertion())
            .map_err(VerifyError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs built here are TLS 1.3 only; this serves callers that allow 1.2.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Verifies that the client is an acceptable SPIFFE identity, chained to the
/// cache's current trust bundle. Client authentication is mandatory.
#[derive(Clone)]
pub struct SpiffeClientVerifier {
    cache: SvidCache,
    expected: ExpectedIdentity,
}

impl SpiffeClientVerifier {
    /// Accepts exactly identity `expected`.
    pub fn exact(cache: SvidCache, expected: u32) -> Self {
        Self {
            cache,
            expected: ExpectedIdentity::Exact(expected),
        }
    }

    /// Accepts any identity for which `known` is true.
    pub fn known(cache: SvidCache, known: impl Fn(u32) -> bool + Send + Sync + 'static) -> Self {
        Self {
            cache,
            expected: ExpectedIdentity::Known(Arc::new(known)),
        }
    }

    /// The verification itself, as a [`VerifyError`] rather than a rustls error.
    pub fn verify(&self, chain: &[CertificateDer<'_>]) -> Result<VerifiedPeer, VerifyError> {
        verify_with_cache(
            &self.cache,
            chain,
            &Expectation {
                role: PeerRole::Client,
                identity: self.expected.clone(),
            },
        )
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("cache", &self.cache)
            .field("expected", &self.expected)
            .finish()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(&full_chain(end_entity, intermediates))
            .map(|_| ClientCertVerified::assertion())
            .map_err(VerifyError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs built here are TLS 1.3 only; this serves callers that allow 1.2.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// A TLS 1.3 client config presenting `local`'s SVID and requiring the server to
/// be exactly `remote`. Connect with server name [`crate::TrustDomain::server_name`]`(remote)`.
pub fn client_config(cache: &SvidCache, local: u32, remote: u32) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            call: "ClientConfig::with_protocol_versions(TLS13)",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            cache.clone(),
            remote,
        )))
        .with_client_cert_resolver(Arc::new(ClientCertResolver::new(cache.clone(), local))))
}

/// A TLS 1.3 server config serving SVIDs by SNI and requiring a client
/// certificate accepted by `client_verifier`.
pub fn server_config(
    resolver: ServerCertResolver,
    client_verifier: SpiffeClientVerifier,
) -> Result<ServerConfig, TlsError> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            call: "ServerConfig::with_protocol_versions(TLS13)",
            source,
        })?
        .with_client_cert_verifier(Arc::new(client_verifier))
        .with_cert_resolver(Arc::new(resolver)))
}
