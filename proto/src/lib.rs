//! Concord's wire protocol: messages, framing and versioning between nodes.
//!
//! No networking code, no clock, no tokio: this crate only says how bytes on a stream are laid
//! out, so that another implementation can be written from it and `PROTOCOL.md`. Guarantees:
//!
//! - every frame is length-prefixed and at most [`FRAME_BYTES_MAX`] long; a longer length
//!   prefix is refused before any of its bytes are buffered;
//! - every frame carries the protocol version that introduced its message, ahead of the
//!   message, so a receiver can refuse a version it does not speak before decoding anything
//!   else, and a peer of an older version reads every message that version defines;
//! - decoding never panics on any input: malformed bytes are an error.

pub mod frame;
pub mod message;

pub use frame::{encode_frame, FrameDecoder, FRAME_BYTES_MAX, FRAME_HEADER_BYTES, VERSION_BYTES};
pub use message::*;

/// The newest protocol version this crate speaks; peers agree on one in the handshake.
///
/// Version 2 added [`Message::PolicyHash`], version 3 [`Message::Writer`] and
/// [`Message::LogMark`], version 4 [`Message::Covered`] and [`Message::Withdraw`], version 5
/// [`Message::Holdings`], version 6 [`Message::CompactedDocument`]. Every frame
/// carries the version that introduced its message ([`Message::introduced_in`]), so a
/// version-1 peer reads every frame a version-2 node sends it (a node sends a newer message
/// only to a peer that said it speaks it).
pub const PROTOCOL_VERSION: u16 = 6;
/// The oldest protocol version this crate decodes.
pub const PROTOCOL_VERSION_MIN: u16 = 1;

/// Why bytes could not be read as a frame or a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {size} bytes is over the limit of {size_max}")]
    FrameTooLarge { size: usize, size_max: usize },
    #[error("frame of {size} bytes is too short to hold a version")]
    FrameTooShort { size: usize },
    #[error("protocol version {version} is not spoken here ({PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("malformed message: {0}")]
    Malformed(String),
}
