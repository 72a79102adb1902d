//! spire-dev integration tests: real unix sockets in tempdirs, real
//! certificates, the tonic client from spire-proto, py-spiffe, openssl and the
//! binary. One test binary so it links once.

mod binary;
mod delegated;
mod garbage;
mod openssl;
mod py_spiffe;
mod spiffe_crate;
mod support;
mod svid;
mod switches;
mod workload_api;
