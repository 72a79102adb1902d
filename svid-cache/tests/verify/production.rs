//! Verification the way the handshake does it: svid-cache's rustls
//! verifiers over a cache with a clock the test sets.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use meshauth_test_support::certs::{Ca, TD, bundle};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::server::danger::ClientCertVerifier as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use svid_cache::{
    CacheConfig, Clock, Expectation, ExpectedIdentity, PeerRole, SpiffeClientVerifier,
    SpiffeServerVerifier, SvidCache, Update, VerifyError,
};

/// A wall clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(at: SystemTime) -> Arc<Self> {
        Arc::new(Self(Mutex::new(at)))
    }

    pub fn set(&self, at: SystemTime) {
        *self.0.lock().expect("clock lock") = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().expect("clock lock")
    }
}

/// A cache trusting `cas`, holding no SVIDs, reading time from `clock`.
pub fn verifier_cache(cas: &[&Ca], clock: Arc<ManualClock>) -> SvidCache {
    let cache = SvidCache::with_clock(CacheConfig::default(), clock);
    cache
        .apply(Update {
            svids: Some(Vec::new()),
            bundle: Some(bundle(cas)),
        })
        .unwrap_or_else(|e| panic!("applying the bundle: {e}"));
    cache
}

/// Verifies `chain` the way the handshake does: through the rustls verifier
/// of the peer's role (server: `SpiffeServerVerifier`, exact identity;
/// client: `SpiffeClientVerifier`) backed by `cache`, its remembered chains
/// and its clock. The error is the `VerifyError` carried inside rustls'.
pub fn production_verify(
    cache: &SvidCache,
    chain: &[CertificateDer<'static>],
    expect: &Expectation,
) -> Result<(), VerifyError> {
    let Some((leaf, rest)) = chain.split_first() else {
        return Err(VerifyError::NoCertificate);
    };
    let unix = UnixTime::now();
    let r = match (&expect.role, &expect.identity) {
        (PeerRole::Server, ExpectedIdentity::Exact(n)) => {
            let name = ServerName::try_from(format!("{n}.{TD}")).expect("SNI of an identity");
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
        VerifyError::from_rustls(&e)
            .unwrap_or_else(|| panic!("non-SPIFFE rustls error: {e:?}"))
            .clone()
    })
}
