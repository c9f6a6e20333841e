//! Concord's wire protocol: messages, framing and versioning between nodes.
//!
//! This crate has no dependency on the node, on tokio or on any socket: it only says how
//! bytes on a QUIC stream are laid out, so that another implementation can be written from
//! it and `PROTOCOL.md`. The replication messages themselves arrive with the replication
//! engine.

/// The protocol version a node speaks; peers agree on it in the handshake.
pub const PROTOCOL_VERSION: u16 = 1;
