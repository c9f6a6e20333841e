//! `concord.toml`: a node's configuration.
//!
//! Owns parsing and checking the file. Unknown keys and out-of-range values are refused with
//! an error naming the file and the key, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::{CACHE_DOCUMENTS_MAX, COMPACT_AFTER_CHANGES_MAX};

/// The config file's name inside a data dir.
pub const CONFIG_FILE: &str = "concord.toml";
/// Longest node name, in bytes.
pub const NODE_NAME_BYTES_MAX: usize = 64;
/// Largest sled page cache one may configure, in MiB.
pub const PAGE_CACHE_MIB_MAX: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    /// Present once the node was given a certificate (`concord init --ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSection>,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub store: StoreSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The cluster id (32 hex digits), from the CA that issued this node's certificate.
    pub id: String,
}

impl ClusterSection {
    pub fn id_bytes(&self) -> Option<[u8; 16]> {
        hex::decode(&self.id).ok()?.try_into().ok()
    }
}

/// Most peers one node may list.
pub const PEERS_MAX: usize = 256;
/// The QUIC address a node listens on unless the config says otherwise.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7400";
/// The HTTP API address unless the config says otherwise.
pub const API_DEFAULT: &str = "127.0.0.1:7480";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// QUIC address for peers, `host:port`.
    pub listen: String,
    /// HTTP API address, `host:port`.
    pub api: String,
    /// Peers to dial, `host:port` each.
    pub peers: Vec<String>,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            listen: LISTEN_DEFAULT.to_owned(),
            api: API_DEFAULT.to_owned(),
            peers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// A readable name for the node, shown in history and status.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Documents kept loaded in memory (~20 KB each).
    pub cache_documents: usize,
    /// sled's page cache, in MiB.
    pub page_cache_mib: u64,
    /// Appended changes per document before they are compacted into a snapshot.
    pub compact_after_changes: u32,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            cache_documents: crate::store::CACHE_DOCUMENTS_DEFAULT,
            page_cache_mib: crate::store::PAGE_CACHE_BYTES_DEFAULT / (1024 * 1024),
            compact_after_changes: crate::store::COMPACT_AFTER_CHANGES_DEFAULT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn new(name: &str) -> Self {
        Self {
            node: NodeSection {
                name: name.to_owned(),
            },
            cluster: None,
            network: NetworkSection::default(),
            store: StoreSection::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses and checks the text of a config file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|error| error.message().to_owned())?;
        config.check()?;
        Ok(config)
    }

    pub fn check(&self) -> Result<(), String> {
        let name = &self.node.name;
        if name.is_empty() || name.len() > NODE_NAME_BYTES_MAX || name.chars().any(char::is_control)
        {
            return Err(format!(
                "node.name {name:?} must be 1-{NODE_NAME_BYTES_MAX} bytes without control characters"
            ));
        }
        if let Some(cluster) = &self.cluster {
            if cluster.id_bytes().is_none() {
                return Err(format!("cluster.id {:?} must be 32 hex digits", cluster.id));
            }
        }
        for (key, address) in [
            ("network.listen", &self.network.listen),
            ("network.api", &self.network.api),
        ] {
            check_address(key, address)?;
        }
        if self.network.peers.len() > PEERS_MAX {
            return Err(format!(
                "network.peers lists {} peers; the most is {PEERS_MAX}",
                self.network.peers.len()
            ));
        }
        for peer in &self.network.peers {
            check_address("network.peers", peer)?;
        }
        let store = &self.store;
        if store.cache_documents == 0 || store.cache_documents > CACHE_DOCUMENTS_MAX {
            return Err(format!(
                "store.cache_documents = {} must be between 1 and {CACHE_DOCUMENTS_MAX}",
                store.cache_documents
            ));
        }
        if store.page_cache_mib == 0 || store.page_cache_mib > PAGE_CACHE_MIB_MAX {
            return Err(format!(
                "store.page_cache_mib = {} must be between 1 and {PAGE_CACHE_MIB_MAX}",
                store.page_cache_mib
            ));
        }
        if store.compact_after_changes == 0
            || store.compact_after_changes > COMPACT_AFTER_CHANGES_MAX
        {
            return Err(format!(
                "store.compact_after_changes = {} must be between 1 and {COMPACT_AFTER_CHANGES_MAX}",
                store.compact_after_changes
            ));
        }
        Ok(())
    }

    /// The cluster id, if the node has joined a cluster.
    pub fn cluster_id(&self) -> Option<[u8; 16]> {
        self.cluster.as_ref().and_then(ClusterSection::id_bytes)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes to TOML")
    }
}

/// Checks a `host:port` address: a port, and a host that is not empty.
fn check_address(key: &str, address: &str) -> Result<(), String> {
    let valid = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if valid {
        Ok(())
    } else {
        Err(format!("{key} {address:?} must be host:port"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_fills_defaults() {
        let config = Config::new("site-a");
        assert_eq!(Config::parse(&config.to_toml()).unwrap(), config);
        let minimal = Config::parse("[node]\nname = \"x\"\n").unwrap();
        assert_eq!(minimal.store, StoreSection::default());
    }

    #[test]
    fn refuses_bad_config_naming_the_key() {
        let unknown = Config::parse("[node]\nname = \"x\"\ncolour = 1\n").unwrap_err();
        assert!(unknown.contains("colour"), "{unknown}");
        let range =
            Config::parse("[node]\nname = \"x\"\n[store]\ncache_documents = 0\n").unwrap_err();
        assert!(range.contains("store.cache_documents"), "{range}");
        let missing = Config::parse("[store]\n").unwrap_err();
        assert!(missing.contains("node"), "{missing}");
        let address =
            Config::parse("[node]\nname = \"x\"\n[network]\npeers = [\"nohost\"]\n").unwrap_err();
        assert!(address.contains("network.peers"), "{address}");
        let syntax = Config::parse("[node\n").unwrap_err();
        assert!(!syntax.is_empty());
    }
}
