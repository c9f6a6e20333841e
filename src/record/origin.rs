//! Node ids, sources and the Automerge actors they write with.
//!
//! Every writer on a node (the node's own API, each adapter) is a *source* and writes with its
//! own actor. An actor id is the 16-byte node id followed by the source's 2-byte index on that
//! node, so any node can tell from an actor alone which node wrote a change; the source's name
//! comes from the actor registry (the `_actors` collection), which replicates like any record.

use std::fmt;
use std::str::FromStr;

use automerge::ActorId;

/// Bytes in a node id.
pub const NODE_ID_BYTES: usize = 16;
/// Bytes in an actor id written by Concord: node id, then the source index (big endian).
pub const ACTOR_ID_BYTES: usize = NODE_ID_BYTES + 2;
/// Most sources one node may register.
pub const SOURCES_PER_NODE_MAX: usize = 1024;
/// Longest source name, in bytes.
pub const SOURCE_NAME_BYTES_MAX: usize = 64;
/// The collection that maps actor ids to (node, source).
pub const ACTOR_REGISTRY_COLLECTION: &str = "_actors";
/// The source name of the node's own API (CLI and HTTP).
pub const API_SOURCE: &str = "api";

/// A node's stable identity, created once by `concord init`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; NODE_ID_BYTES]);

impl NodeId {
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; NODE_ID_BYTES];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// The actor this node's source number `source_index` writes with.
    pub fn actor(&self, source_index: u16) -> ActorId {
        let mut bytes = [0u8; ACTOR_ID_BYTES];
        bytes[..NODE_ID_BYTES].copy_from_slice(&self.0);
        bytes[NODE_ID_BYTES..].copy_from_slice(&source_index.to_be_bytes());
        ActorId::from(&bytes[..])
    }

    /// The node and source index of an actor written by Concord; `None` for foreign actors.
    pub fn split_actor(actor: &ActorId) -> Option<(NodeId, u16)> {
        let bytes = actor.to_bytes();
        if bytes.len() != ACTOR_ID_BYTES {
            return None;
        }
        let mut node = [0u8; NODE_ID_BYTES];
        node.copy_from_slice(&bytes[..NODE_ID_BYTES]);
        let index = u16::from_be_bytes([bytes[NODE_ID_BYTES], bytes[NODE_ID_BYTES + 1]]);
        Some((NodeId(node), index))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("node id {0:?} is invalid: it must be {NODE_ID_BYTES} bytes written as {digits} hex digits", digits = NODE_ID_BYTES * 2)]
pub struct NodeIdError(String);

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(text.trim()).map_err(|_| NodeIdError(text.to_owned()))?;
        let bytes: [u8; NODE_ID_BYTES] =
            bytes.try_into().map_err(|_| NodeIdError(text.to_owned()))?;
        Ok(Self(bytes))
    }
}

/// Checks a source name: 1-64 characters of a-z, 0-9, '_', '-', ':' or '.'.
pub fn check_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= SOURCE_NAME_BYTES_MAX
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b':' | b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_round_trips_to_node_and_source() {
        let node = NodeId::random().unwrap();
        let actor = node.actor(7);
        assert_eq!(NodeId::split_actor(&actor), Some((node, 7)));
        assert_eq!(node.to_string().parse::<NodeId>().unwrap(), node);
        assert_eq!(NodeId::split_actor(&ActorId::random()), None);
        assert!("xyz".parse::<NodeId>().is_err());
    }
}
