//! The cluster CA, node certificates, and mutual-TLS configs for QUIC.
//!
//! A cluster CA (`concord ca init`) signs every node's certificate; the node id is in the
//! certificate as the DNS name `<node id hex>.node.concord`. Both sides of a connection verify
//! the other's chain against the cluster CA (TLS 1.3, the ring provider only) and read the
//! peer's node id from its certificate: that id, not anything the peer says, is who it is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::record::NodeId;

/// The DNS suffix that carries a node id in a certificate.
pub const NODE_NAME_SUFFIX: &str = ".node.concord";
/// ALPN protocol id of Concord's QUIC connections.
pub const ALPN: &[u8] = b"concord/1";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const CLUSTER_ID_FILE: &str = "cluster.id";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0} already holds a cluster CA")]
    CaExists(PathBuf),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls: {0}")]
    Verifier(String),
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|error| TlsError::Io {
        path: path.to_owned(),
        error,
    })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    let io = |error| TlsError::Io {
        path: path.to_owned(),
        error,
    };
    if private {
        crate::files::write_private(path, contents.as_bytes()).map_err(io)
    } else {
        std::fs::write(path, contents).map_err(io)
    }
}

/// The one crypto provider used everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Creates a cluster CA in `dir`: its certificate, its key and a fresh cluster id.
pub fn create_ca(dir: &Path) -> Result<[u8; 16], TlsError> {
    if dir.join(CA_CERT_FILE).exists() {
        return Err(TlsError::CaExists(dir.to_owned()));
    }
    crate::files::create_private_dir(dir).map_err(|error| TlsError::Io {
        path: dir.to_owned(),
        error,
    })?;
    let mut cluster = [0u8; 16];
    getrandom::fill(&mut cluster).map_err(|error| TlsError::Verifier(error.to_string()))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        format!("Concord cluster {}", hex::encode(cluster)),
    );
    params.distinguished_name = name;
    let cert = params.self_signed(&key)?;
    write(&dir.join(CA_KEY_FILE), &key.serialize_pem(), true)?;
    write(
        &dir.join(CLUSTER_ID_FILE),
        &format!("{}\n", hex::encode(cluster)),
        false,
    )?;
    // The certificate last: its presence marks a complete CA dir.
    write(&dir.join(CA_CERT_FILE), &cert.pem(), false)?;
    Ok(cluster)
}

/// Reads a CA dir's cluster id.
pub fn read_cluster_id(ca_dir: &Path) -> Result<[u8; 16], TlsError> {
    let path = ca_dir.join(CLUSTER_ID_FILE);
    let text = read(&path)?;
    hex::decode(text.trim())
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| TlsError::Invalid {
            path,
            message: "not 16 bytes of hex".to_owned(),
        })
}

/// Issues a certificate for `node`, signed by the CA in `ca_dir`, into `tls_dir` (with a copy
/// of the CA certificate, so the node can verify peers without the CA key).
pub fn issue_node_certificate(
    ca_dir: &Path,
    node: &NodeId,
    tls_dir: &Path,
) -> Result<(), TlsError> {
    let ca_cert_pem = read(&ca_dir.join(CA_CERT_FILE))?;
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|error| TlsError::Invalid {
        path: ca_key_path,
        message: error.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![format!("{node}{NODE_NAME_SUFFIX}")])?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("Concord node {node}"));
    params.distinguished_name = name;
    let cert = params.signed_by(&key, &issuer)?;
    crate::files::create_private_dir(tls_dir).map_err(|error| TlsError::Io {
        path: tls_dir.to_owned(),
        error,
    })?;
    write(&tls_dir.join(NODE_KEY_FILE), &key.serialize_pem(), true)?;
    write(&tls_dir.join(CA_CERT_FILE), &ca_cert_pem, false)?;
    write(&tls_dir.join(NODE_CERT_FILE), &cert.pem(), false)?;
    Ok(())
}

/// The node id a certificate was issued for.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let names = parsed.subject_alternative_name().ok()??;
    names
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => {
                dns.strip_suffix(NODE_NAME_SUFFIX)?.parse::<NodeId>().ok()
            }
            _ => None,
        })
}

/// A node's TLS identity: its certificate chain and key, and the cluster CA to verify peers.
pub struct NodeTls {
    pub node: NodeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    let certs: Vec<_> = rustls::pki_types::pem::PemObject::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::Invalid {
            path: path.to_owned(),
            message: format!("{error:?}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            message: "no certificate".to_owned(),
        });
    }
    Ok(certs)
}

impl NodeTls {
    /// Loads `tls_dir` (made by [`issue_node_certificate`]) and checks it was issued for `node`.
    pub fn load(tls_dir: &Path, node: NodeId) -> Result<Self, TlsError> {
        let cert_path = tls_dir.join(NODE_CERT_FILE);
        let chain = pem_certs(&cert_path)?;
        if node_id_of(&chain[0]) != Some(node) {
            return Err(TlsError::Invalid {
                path: cert_path,
                message: format!("not issued for node {node}"),
            });
        }
        let key_path = tls_dir.join(NODE_KEY_FILE);
        let key = rustls::pki_types::pem::PemObject::from_pem_slice(read(&key_path)?.as_bytes())
            .map_err(|error| TlsError::Invalid {
                path: key_path,
                message: format!("{error:?}"),
            })?;
        let mut roots = RootCertStore::empty();
        for ca in pem_certs(&tls_dir.join(CA_CERT_FILE))? {
            roots.add(ca)?;
        }
        Ok(Self {
            node,
            chain,
            key,
            roots: Arc::new(roots),
        })
    }

    /// Server side: TLS 1.3, a client certificate from the cluster CA required.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|error| TlsError::Verifier(error.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side: TLS 1.3, the server's chain verified against the cluster CA for the node
    /// name in its own certificate, and this node's certificate presented.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|error| TlsError::Verifier(error.to_string()))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeVerifier { inner }))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Verifies a server the way WebPKI does, for the node name its certificate carries: a dialer
/// knows an address, not the node id behind it, and learns the id from the verified certificate.
#[derive(Debug)]
struct NodeVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let node = node_id_of(end_entity).ok_or_else(|| {
            rustls::Error::General("certificate carries no Concord node id".to_owned())
        })?;
        let name = ServerName::try_from(format!("{node}{NODE_NAME_SUFFIX}"))
            .map_err(|error| rustls::Error::General(error.to_string()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
