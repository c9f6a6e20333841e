//! The signed formats (grants, revocations, removals), their signing by the authority that
//! holds the cluster CA key, and their checking against the CA certificate.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;
use crate::record::NodeId;

/// What the authority grants one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub cluster: [u8; 16],
    pub node: [u8; 16],
    pub read: Vec<Scope>,
    pub write: Vec<Scope>,
    /// When it was issued (ms since the Unix epoch, the authority's clock): the latest counts.
    pub issued_ms: u64,
}

/// The authority's word that a node's changes stop counting past a cut-off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub cluster: [u8; 16],
    pub node: [u8; 16],
    /// Per writer of the node (the origin of its log): the last place in that log that still
    /// counts.
    pub cut_off: Vec<([u8; 16], u64)>,
    pub issued_ms: u64,
}

/// The authority's word that a node left the cluster for good: its changes all count, but it
/// no longer holds back what every replica is said to hold (see [`crate::sync::stability`]),
/// and its connections are refused, so it can never bring back changes the others did not
/// wait for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    pub cluster: [u8; 16],
    pub node: [u8; 16],
    pub issued_ms: u64,
}

/// A body and the authority's signature over its bytes (ECDSA P-256 with SHA-256, ASN.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub version: u16,
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

impl Signed {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a signed body encodes")
    }

    /// `item` signed by `sign` (over its encoded bytes): the authority's key, or the
    /// simulator's deterministic one.
    pub fn sign_with(
        item: &Verified,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, ScopeError>,
    ) -> Result<Self, ScopeError> {
        let body = postcard::to_stdvec(item).expect("a body encodes");
        let signature = sign(&body)?;
        let signed = Self {
            version: SCOPE_FORMAT_VERSION,
            body,
            signature,
        };
        assert!(signed.to_bytes().len() <= SIGNED_BYTES_MAX);
        Ok(signed)
    }

    /// The item, once `check` accepts the signature over the body and the item names
    /// `cluster`.
    pub fn open_with(
        &self,
        cluster: [u8; 16],
        check: impl FnOnce(&[u8], &[u8]) -> Result<(), ScopeError>,
    ) -> Result<Verified, ScopeError> {
        if self.version != SCOPE_FORMAT_VERSION {
            return Err(ScopeError::UnknownVersion(self.version));
        }
        check(&self.body, &self.signature)?;
        let item: Verified = postcard::from_bytes(&self.body)
            .map_err(|error| ScopeError::Malformed(error.to_string()))?;
        let named = match &item {
            Verified::Grant(grant) => grant.cluster,
            Verified::Revocation(revocation) => revocation.cluster,
            Verified::Removal(removal) => removal.cluster,
        };
        if named != cluster {
            return Err(ScopeError::OtherCluster(hex::encode(named)));
        }
        Ok(item)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ScopeError> {
        if bytes.len() > SIGNED_BYTES_MAX {
            return Err(ScopeError::Malformed(format!(
                "{} bytes, over {SIGNED_BYTES_MAX}",
                bytes.len()
            )));
        }
        postcard::from_bytes(bytes).map_err(|error| ScopeError::Malformed(error.to_string()))
    }
}

/// Signs with the cluster CA key in `ca_dir`.
pub struct Authority {
    key: ring::signature::EcdsaKeyPair,
    cluster: [u8; 16],
}

impl Authority {
    pub fn open(ca_dir: &Path) -> Result<Self, ScopeError> {
        let cluster = crate::net::tls::read_cluster_id(ca_dir)
            .map_err(|error| ScopeError::Authority(error.to_string()))?;
        let path = ca_dir.join(crate::net::tls::CA_KEY_FILE);
        let pem = std::fs::read_to_string(&path)
            .map_err(|error| ScopeError::Authority(format!("{}: {error}", path.display())))?;
        let key = rcgen::KeyPair::from_pem(&pem)
            .map_err(|error| ScopeError::Authority(format!("{}: {error}", path.display())))?;
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &key.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|error| ScopeError::Authority(format!("{}: {error}", path.display())))?;
        Ok(Self { key, cluster })
    }

    pub fn cluster(&self) -> [u8; 16] {
        self.cluster
    }

    /// The grant of `read` and `write` to `node`, signed.
    pub fn grant(
        &self,
        node: NodeId,
        read: Vec<Scope>,
        write: Vec<Scope>,
        issued_ms: u64,
    ) -> Result<Signed, ScopeError> {
        if read.len() > SCOPES_PER_GRANT_MAX || write.len() > SCOPES_PER_GRANT_MAX {
            return Err(ScopeError::TooManyScopes);
        }
        self.sign(&Verified::Grant(Grant {
            cluster: self.cluster,
            node: node.0,
            read,
            write,
            issued_ms,
        }))
    }

    /// The revocation of `node`, its changes counting up to `cut_off` per writer, signed.
    pub fn revoke(
        &self,
        node: NodeId,
        cut_off: BTreeMap<NodeId, u64>,
        issued_ms: u64,
    ) -> Result<Signed, ScopeError> {
        if cut_off.len() > CUT_OFFS_MAX {
            return Err(ScopeError::TooManyCutOffs);
        }
        self.sign(&Verified::Revocation(Revocation {
            cluster: self.cluster,
            node: node.0,
            cut_off: cut_off
                .into_iter()
                .map(|(writer, place)| (writer.0, place))
                .collect(),
            issued_ms,
        }))
    }

    /// The removal of `node` from the cluster, signed.
    pub fn remove(&self, node: NodeId, issued_ms: u64) -> Result<Signed, ScopeError> {
        self.sign(&Verified::Removal(Removal {
            cluster: self.cluster,
            node: node.0,
            issued_ms,
        }))
    }

    fn sign(&self, item: &Verified) -> Result<Signed, ScopeError> {
        Signed::sign_with(item, |body| {
            let signature = self
                .key
                .sign(&ring::rand::SystemRandom::new(), body)
                .map_err(|error| ScopeError::Authority(error.to_string()))?;
            Ok(signature.as_ref().to_vec())
        })
    }
}

/// Checks signatures against the cluster CA certificate a node holds.
pub struct Verifier {
    public_key: Vec<u8>,
    cluster: [u8; 16],
}

/// What a signed body holds (its encoding is the body's bytes); once its signature checked,
/// what verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verified {
    Grant(Grant),
    Revocation(Revocation),
    Removal(Removal),
}

impl Verifier {
    /// From the cluster CA certificate (PEM) and the cluster id.
    pub fn new(ca_cert_pem: &str, cluster: [u8; 16]) -> Result<Self, ScopeError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca_cert_pem.as_bytes())
            .map_err(|error| ScopeError::Authority(error.to_string()))?;
        let certificate = pem
            .parse_x509()
            .map_err(|error| ScopeError::Authority(error.to_string()))?;
        Ok(Self {
            public_key: certificate.public_key().subject_public_key.data.to_vec(),
            cluster,
        })
    }

    pub fn verify(&self, signed: &Signed) -> Result<Verified, ScopeError> {
        signed.open_with(self.cluster, |body, signature| {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                &self.public_key,
            )
            .verify(body, signature)
            .map_err(|_| ScopeError::BadSignature)
        })
    }
}
