//! `meshauth/2` pair proofs: what each side signs, and the checks on what
//! the other side sent.
//!
//! A session is one mutual TLS 1.3 connection between two nodes' agents,
//! opened exactly like a `meshauth/1` handshake (which authenticates its
//! first pair). Every further pair `(L, R)` is proved over it: the initiator
//! signs, with `L`'s SVID key, the [`transcript`] of the request; the
//! responder checks it and signs, with `R`'s SVID key, the transcript of the
//! answer, which includes the initiator's signature. Each transcript holds:
//!
//! - a context string naming the protocol and the signer's role, unlike any
//!   TLS 1.3 CertificateVerify context, so a proof is never a TLS signature
//!   nor the other role's proof;
//! - 32 bytes exported from the session (RFC 8446 §7.5, label
//!   [`EXPORTER_LABEL`]): both ends of one TLS session derive the same
//!   value, no other session does, so a proof made in one session means
//!   nothing in another (a relay between two sessions cannot forward it);
//! - the request number (strictly increasing in the session: a proof cannot
//!   be replayed inside it either), both identities in the order
//!   initiator → responder, both node names, the signer's stated WireGuard
//!   key and the signer's leaf certificate.
//!
//! The chain is verified exactly as TLS would have: SPIFFE verifier against
//! the current bundle, client role for the initiator's, server role and
//! exactly `R` for the responder's. ARCHITECTURE.md ("Pair proofs") gives the
//! security argument.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::SignatureScheme;
use rustls::pki_types::CertificateDer;
use svid_cache::Svid;

use super::HandshakeError;
use super::protocol::Proof;

/// The TLS exporter label of `meshauth/2` sessions.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshauth/2-pair-proof";

/// Most certificates in a proof's chain.
pub const MAX_CHAIN: usize = 4;

/// The session's exported value ([`EXPORTER_LABEL`], 32 bytes), the same
/// on both ends of one TLS session.
pub fn exporter<Data>(conn: &rustls::ConnectionCommon<Data>) -> Result<[u8; 32], HandshakeError> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|source| HandshakeError::Tls {
            stage: "exporting the session's proof value",
            source,
        })
}

/// Which side signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// The side that asked (its identity is `L`).
    Initiator,
    /// The side that answers (its identity is `R`).
    Responder,
}

impl Signer {
    fn context(self) -> &'static [u8] {
        match self {
            Self::Initiator => b"meshauth/2 pair proof, initiator\0",
            Self::Responder => b"meshauth/2 pair proof, responder\0",
        }
    }
}

/// What a proof is about, besides the signer's own certificate and key.
#[derive(Debug, Clone, Copy)]
pub struct Statement<'a> {
    /// The session's exported value.
    pub exporter: &'a [u8; 32],
    /// The request number.
    pub id: u64,
    /// The initiator's identity `L`.
    pub initiator: u32,
    /// The responder's identity `R`.
    pub responder: u32,
    /// The initiator's node name.
    pub initiator_node: &'a str,
    /// The responder's node name.
    pub responder_node: &'a str,
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The bytes `signer` signs: see the module documentation.
pub fn transcript(
    signer: Signer,
    s: &Statement<'_>,
    wireguard_key: Option<&str>,
    leaf: &[u8],
    initiator_signature: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + leaf.len());
    out.extend_from_slice(signer.context());
    out.extend_from_slice(s.exporter);
    out.extend_from_slice(&s.id.to_be_bytes());
    out.extend_from_slice(&s.initiator.to_be_bytes());
    out.extend_from_slice(&s.responder.to_be_bytes());
    put(&mut out, s.initiator_node.as_bytes());
    put(&mut out, s.responder_node.as_bytes());
    put(&mut out, wireguard_key.unwrap_or_default().as_bytes());
    put(&mut out, leaf);
    if let Some(sig) = initiator_signature {
        put(&mut out, sig);
    }
    out
}

/// Builds `signer`'s proof with `svid` (the signer's own SVID); returns it
/// and the raw signature.
pub fn make(
    signer: Signer,
    s: &Statement<'_>,
    svid: &Svid,
    wireguard_key: Option<String>,
    initiator_signature: Option<&[u8]>,
) -> Result<(Proof, Vec<u8>), HandshakeError> {
    let message = transcript(
        signer,
        s,
        wireguard_key.as_deref(),
        svid.leaf().as_ref(),
        initiator_signature,
    );
    let (scheme, signature) =
        svid_cache::proof::sign(svid.certified_key(), &message).map_err(HandshakeError::Proof)?;
    let (node, local, remote) = match signer {
        Signer::Initiator => (s.initiator_node, s.initiator, s.responder),
        Signer::Responder => (s.responder_node, s.responder, s.initiator),
    };
    let proof = Proof {
        id: s.id,
        node: node.to_owned(),
        local,
        remote,
        wireguard_key,
        chain: svid.cert_chain().iter().map(|c| B64.encode(c)).collect(),
        scheme: u16::from(scheme),
        signature: B64.encode(&signature),
    };
    Ok((proof, signature))
}

/// A proof's chain and signature, decoded.
#[derive(Debug)]
pub struct Decoded {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The signature.
    pub signature: Vec<u8>,
}

/// Decodes the chain and signature; refuses an empty or over-long chain and
/// anything that is not base64.
pub fn decode(proof: &Proof) -> Result<Decoded, HandshakeError> {
    let malformed = |reason: String| HandshakeError::ProofMalformed { reason };
    if proof.chain.is_empty() || proof.chain.len() > MAX_CHAIN {
        return Err(malformed(format!(
            "{} certificates in the chain; 1 to {MAX_CHAIN} are accepted",
            proof.chain.len()
        )));
    }
    let chain = proof
        .chain
        .iter()
        .enumerate()
        .map(|(i, c)| {
            B64.decode(c)
                .map(CertificateDer::from)
                .map_err(|e| malformed(format!("certificate {i} is not base64: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let signature = B64
        .decode(&proof.signature)
        .map_err(|e| malformed(format!("the signature is not base64: {e}")))?;
    Ok(Decoded { chain, signature })
}

/// Checks the statement fields of `proof` from `signer` against what the
/// session expects, then its signature over the transcript with its leaf
/// (whose chain the caller has verified).
pub fn check(
    signer: Signer,
    s: &Statement<'_>,
    proof: &Proof,
    decoded: &Decoded,
    initiator_signature: Option<&[u8]>,
) -> Result<(), HandshakeError> {
    let (node, local, remote) = match signer {
        Signer::Initiator => (s.initiator_node, s.initiator, s.responder),
        Signer::Responder => (s.responder_node, s.responder, s.initiator),
    };
    if proof.id != s.id {
        return Err(HandshakeError::ProofMalformed {
            reason: format!("answer to request {} carries id {}", s.id, proof.id),
        });
    }
    for (field, stated, expected) in [
        ("local", proof.local, local),
        ("remote", proof.remote, remote),
    ] {
        if stated != expected {
            return Err(HandshakeError::IdentityMismatch {
                field,
                stated,
                expected,
            });
        }
    }
    if proof.node != node {
        return Err(HandshakeError::NodeMismatch {
            expected: node.to_owned(),
            stated: proof.node.clone(),
        });
    }
    let leaf = &decoded.chain[0];
    let message = transcript(
        signer,
        s,
        proof.wireguard_key.as_deref(),
        leaf.as_ref(),
        initiator_signature,
    );
    svid_cache::proof::verify(
        leaf,
        SignatureScheme::from(proof.scheme),
        &message,
        &decoded.signature,
    )
    .map_err(HandshakeError::Proof)
}
