//! `concord.toml`: a node's configuration.
//!
//! Owns parsing and checking the file. Unknown keys and out-of-range values are refused with
//! an error naming the file and the key, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::policy::{PolicyKind, PolicySection};
use crate::store::{CACHE_DOCUMENTS_MAX, CACHE_MIB_MAX, COMPACT_AFTER_CHANGES_MAX};

/// The config file's name inside a data dir.
pub const CONFIG_FILE: &str = "concord.toml";
/// Longest node name, in bytes.
pub const NODE_NAME_BYTES_MAX: usize = 64;
// A name that config accepts must fit the hello that carries it.
const _: () = assert!(NODE_NAME_BYTES_MAX <= concord_proto::NODE_NAME_BYTES_MAX);
/// Largest page cache one may configure, in MiB.
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
    /// Tables and files mapped to collections (see `crate::adapters`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<BindingSection>,
    /// Conflict policies per collection, or per field (see `crate::policy`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicySection>,
}

/// Most policy entries one node may have.
pub const POLICIES_MAX: usize = 1024;
/// Most names one `priority` list may hold.
pub const PRIORITY_NAMES_MAX: usize = 64;

/// Most bindings one node may have (each runs a thread and holds a database connection).
pub const BINDINGS_MAX: usize = 64;
/// Most key columns of one binding.
pub const KEY_COLUMNS_MAX: usize = 8;
/// Most mapped columns of one binding.
pub const MAPPED_COLUMNS_MAX: usize = 1024;

/// One external table mapped to one collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSection {
    /// The binding's name: its source name in history and its key in `concord errors`.
    /// Defaults to `ADAPTER-COLLECTION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub collection: String,
    pub adapter: AdapterKind,
    /// `postgres://...` for PostgreSQL; a file path for SQLite.
    pub url: String,
    /// `schema.table` or `table`.
    pub table: String,
    /// The key columns; the record key is derived from their values.
    pub key: Vec<String>,
    #[serde(default)]
    pub direction: Direction,
    /// `column = "field"`; when empty, every column maps to the field of its own name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub fields: std::collections::BTreeMap<String, String>,
}

impl BindingSection {
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.adapter.as_str(), self.collection))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    Postgres,
    Sqlite,
}

impl AdapterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// Which way rows flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Table to records only: the adapter never writes to the table.
    In,
    /// Records to table only.
    Out,
    #[default]
    Both,
}

impl Direction {
    pub fn reads_table(self) -> bool {
        matches!(self, Self::In | Self::Both)
    }

    pub fn writes_table(self) -> bool {
        matches!(self, Self::Out | Self::Both)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
            Self::Both => "both",
        }
    }
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
    /// How far ahead of this node's clock a change may be stamped, in ms: one stamped further
    /// ahead (a writer whose clock runs ahead) waits until it no longer is, or is refused at
    /// import.
    #[serde(default = "clock_ahead_max_ms_default")]
    pub clock_ahead_max_ms: u64,
}

fn clock_ahead_max_ms_default() -> u64 {
    crate::sync::CLOCK_AHEAD_MAX_DEFAULT.as_millis() as u64
}

/// Bounds of `node.clock_ahead_max_ms`: from a tenth of a second to an hour.
pub const CLOCK_AHEAD_MAX_MS_MIN: u64 = 100;
pub const CLOCK_AHEAD_MAX_MS_MAX: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// The storage engine ([`crate::store::Engine`]). A new node's config names
    /// [`crate::store::Engine::DEFAULT`]; a config that names none is a store made on
    /// [`crate::store::Engine::UNNAMED`]
    /// before there was a choice. A store made on one engine opens only on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::store::Engine>,
    /// Documents kept loaded in memory at most.
    pub cache_documents: usize,
    /// Memory the loaded documents may take, in MiB (their histories grow with every change).
    pub cache_mib: usize,
    /// The engine's cache of pages or blocks read from disk, in MiB.
    pub page_cache_mib: u64,
    /// Appended changes per document before they are compacted into a snapshot.
    pub compact_after_changes: u32,
    /// Compact the histories of records once every node holds them
    /// ([`crate::store::stable`]); on unless the config turns it off.
    pub compact_histories: bool,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            engine: None,
            cache_documents: crate::store::CACHE_DOCUMENTS_DEFAULT,
            cache_mib: crate::store::CACHE_MIB_DEFAULT,
            page_cache_mib: crate::store::PAGE_CACHE_BYTES_DEFAULT / (1024 * 1024),
            compact_after_changes: crate::store::COMPACT_AFTER_CHANGES_DEFAULT,
            compact_histories: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn new(name: &str) -> Self {
        Self {
            node: NodeSection {
                name: name.to_owned(),
                clock_ahead_max_ms: clock_ahead_max_ms_default(),
            },
            cluster: None,
            network: NetworkSection::default(),
            store: StoreSection::default(),
            bindings: Vec::new(),
            policies: Vec::new(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
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
        let bound = self.node.clock_ahead_max_ms;
        if !(CLOCK_AHEAD_MAX_MS_MIN..=CLOCK_AHEAD_MAX_MS_MAX).contains(&bound) {
            return Err(format!(
                "node.clock_ahead_max_ms = {bound} must be between {CLOCK_AHEAD_MAX_MS_MIN} and \
                 {CLOCK_AHEAD_MAX_MS_MAX}"
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
        if store.cache_mib == 0 || store.cache_mib > CACHE_MIB_MAX {
            return Err(format!(
                "store.cache_mib = {} must be between 1 and {CACHE_MIB_MAX}",
                store.cache_mib
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
        self.check_bindings()?;
        self.check_policies()
    }

    fn check_policies(&self) -> Result<(), String> {
        if self.policies.len() > POLICIES_MAX {
            return Err(format!(
                "{} policies; the most is {POLICIES_MAX}",
                self.policies.len()
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, entry) in self.policies.iter().enumerate() {
            let at = format!("policies[{index}]");
            crate::record::Collection::new(&entry.collection)
                .map_err(|error| format!("{at}.collection: {error}"))?;
            if let Some(field) = &entry.field {
                crate::record::document::check_field_name(field)
                    .map_err(|error| format!("{at}.field: {error}"))?;
            }
            if !seen.insert((entry.collection.clone(), entry.field.clone())) {
                return Err(format!(
                    "{at}: a second policy for {}{}",
                    entry.collection,
                    entry
                        .field
                        .as_ref()
                        .map(|field| format!(" field {field}"))
                        .unwrap_or_default()
                ));
            }
            match entry.policy {
                PolicyKind::Priority if entry.order.is_empty() => {
                    return Err(format!(
                        "{at}: policy \"priority\" needs an order, such as order = [\"erp\", \"crm\"]"
                    ));
                }
                PolicyKind::Priority if entry.order.len() > PRIORITY_NAMES_MAX => {
                    return Err(format!(
                        "{at}.order has {} names; the most is {PRIORITY_NAMES_MAX}",
                        entry.order.len()
                    ));
                }
                PolicyKind::Priority => {}
                other if !entry.order.is_empty() => {
                    return Err(format!(
                        "{at}: order is for policy \"priority\", not \"{}\"",
                        other.as_str()
                    ));
                }
                _ => {}
            }
            if entry.script.is_some() && entry.policy != PolicyKind::Custom {
                return Err(format!(
                    "{at}: script is for policy \"custom\", not \"{}\"",
                    entry.policy.as_str()
                ));
            }
        }
        crate::policy::Policies::from_config(&self.policies)
            .map(|_| ())
            .map_err(|error| error.to_string())
    }

    fn check_bindings(&self) -> Result<(), String> {
        if self.bindings.len() > BINDINGS_MAX {
            return Err(format!(
                "{} bindings; the most is {BINDINGS_MAX}",
                self.bindings.len()
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, binding) in self.bindings.iter().enumerate() {
            let at = format!("bindings[{index}]");
            let name = binding.name();
            if !crate::record::origin::check_source_name(&name) {
                return Err(format!(
                    "{at}.name {name:?} must be 1-64 characters of a-z, 0-9, '_', '-', ':' or '.'"
                ));
            }
            if !names.insert(name.clone()) {
                return Err(format!(
                    "{at}: two bindings are named {name:?}; give one a `name`"
                ));
            }
            crate::record::Collection::new_user(&binding.collection)
                .map_err(|error| format!("{at}.collection: {error}"))?;
            if binding.url.trim().is_empty() {
                return Err(format!("{at}.url is empty"));
            }
            if binding.adapter == AdapterKind::Postgres
                && !(binding.url.starts_with("postgres://")
                    || binding.url.starts_with("postgresql://"))
            {
                return Err(format!(
                    "{at}.url {:?} must start with postgres:// for the postgres adapter",
                    binding.url
                ));
            }
            let identifier = |what: &str, text: &str| -> Result<(), String> {
                let valid = !text.is_empty()
                    && text.len() <= 63
                    && !text.contains('"')
                    && !text.chars().any(char::is_control);
                if valid {
                    Ok(())
                } else {
                    Err(format!(
                        "{at}.{what} {text:?} must be 1-63 characters without quotes or control characters"
                    ))
                }
            };
            let parts: Vec<&str> = binding.table.split('.').collect();
            if parts.len() > 2 {
                return Err(format!(
                    "{at}.table {:?} must be `table` or `schema.table`",
                    binding.table
                ));
            }
            for part in parts {
                identifier("table", part)?;
            }
            if binding.key.is_empty() || binding.key.len() > KEY_COLUMNS_MAX {
                return Err(format!("{at}.key must name 1-{KEY_COLUMNS_MAX} columns"));
            }
            for column in &binding.key {
                identifier("key", column)?;
            }
            if binding.fields.len() > MAPPED_COLUMNS_MAX {
                return Err(format!(
                    "{at}.fields maps {} columns; the most is {MAPPED_COLUMNS_MAX}",
                    binding.fields.len()
                ));
            }
            let mut fields = std::collections::BTreeSet::new();
            for (column, field) in &binding.fields {
                identifier("fields", column)?;
                crate::record::document::check_field_name(field)
                    .map_err(|error| format!("{at}.fields.{column}: {error}"))?;
                if !fields.insert(field) {
                    return Err(format!(
                        "{at}.fields maps two columns to the field {field:?}"
                    ));
                }
            }
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
