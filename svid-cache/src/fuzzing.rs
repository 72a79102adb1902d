//! Entry points for the fuzz targets (`fuzz/`, `fuzz-targets/`): one wire
//! message as SPIRE would send it, decoded and taken exactly as the sources
//! take it — the structural checks of the conversion, then the cache's
//! checks of every certificate, key and chain. Each returns the error text
//! (or "applied"), never panics on any input.

use std::path::Path;

use prost::Message as _;
use spire_proto::delegatedidentity::{
    SubscribeToX509BundlesResponse, SubscribeToX509sviDsResponse,
};
use spire_proto::workload::X509svidResponse;

use crate::cache::{CacheConfig, SvidCache, Update};
use crate::identity::TrustDomain;

fn cache() -> SvidCache {
    SvidCache::new(CacheConfig {
        trust_domain: TrustDomain::new("meshauth.local").unwrap_or_default(),
        ..CacheConfig::default()
    })
}

fn apply(update: Update) -> String {
    match cache().apply(update) {
        Ok(_) => "applied".into(),
        Err(e) => e.to_string(),
    }
}

/// A Workload API `X509SVIDResponse`.
pub fn workload_response(bytes: &[u8]) -> String {
    let m = match X509svidResponse::decode(bytes) {
        Ok(m) => m,
        Err(e) => return e.to_string(),
    };
    let td = TrustDomain::new("meshauth.local").unwrap_or_default();
    match super::source::workload::update_from_response(m, &td, Path::new("/fuzz")) {
        Ok(u) => apply(u),
        Err(e) => e.to_string(),
    }
}

/// A Delegated Identity API `SubscribeToX509SVIDsResponse` (with an empty
/// bundle) when `bundle` is false, else a `SubscribeToX509BundlesResponse`.
pub fn delegated_response(bytes: &[u8], bundle: bool) -> String {
    let td = TrustDomain::new("meshauth.local").unwrap_or_default();
    let path = Path::new("/fuzz");
    if bundle {
        let m = match SubscribeToX509BundlesResponse::decode(bytes) {
            Ok(m) => m,
            Err(e) => return e.to_string(),
        };
        return match super::source::delegated::parse_bundle(m, &td, path) {
            Ok(b) => apply(Update {
                svids: None,
                bundle: b,
            }),
            Err(e) => e.to_string(),
        };
    }
    let m = match SubscribeToX509sviDsResponse::decode(bytes) {
        Ok(m) => m,
        Err(e) => return e.to_string(),
    };
    match super::source::delegated::parse_svids(m, path) {
        Ok(svids) => apply(Update {
            svids: Some(svids),
            bundle: None,
        }),
        Err(e) => e.to_string(),
    }
}
