//! Concord's wire protocol: messages, framing and versioning between nodes.
//!
//! No networking code, no clock, no tokio: this crate only says how bytes on a stream are laid
//! out, so that another implementation can be written from it and `PROTOCOL.md`. Guarantees:
//!
//! - every frame is length-prefixed and at most [`FRAME_BYTES_MAX`] long; a longer length
//!   prefix is refused before any of its bytes are buffered;
//! - every frame carries the protocol version it was encoded with, ahead of the message, so a
//!   receiver can refuse a version it does not speak before decoding anything else;
//! - decoding never panics on any input: malformed bytes are an error.

pub mod frame;
pub mod message;

pub use frame::{encode_frame, FrameDecoder, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
pub use message::*;

/// The protocol version this crate encodes; peers agree on it in the handshake.
pub const PROTOCOL_VERSION: u16 = 1;
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
