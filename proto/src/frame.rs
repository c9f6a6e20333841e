//! Framing: `[length: u32 big endian][version: u16 big endian][message: postcard]`.
//!
//! `length` counts the version and the message. [`FrameDecoder`] is sans-IO: feed it bytes as
//! they arrive, take whole messages out; it never holds more than one frame's worth of bytes.

use crate::{Message, ProtoError, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

/// Largest frame, length prefix excluded: bounds every message and every receive buffer.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Bytes of the version that starts every frame.
pub const VERSION_BYTES: usize = 2;

/// Encodes one message as a frame. Fails only if the message is larger than a frame may be.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, ProtoError> {
    let mut frame = vec![0u8; FRAME_HEADER_BYTES];
    frame.extend_from_slice(&message.introduced_in().to_be_bytes());
    let frame = postcard::to_extend(message, frame)
        .map_err(|error| ProtoError::Malformed(error.to_string()))?;
    let size = frame.len() - FRAME_HEADER_BYTES;
    if size > FRAME_BYTES_MAX {
        return Err(ProtoError::FrameTooLarge {
            size,
            size_max: FRAME_BYTES_MAX,
        });
    }
    let mut frame = frame;
    let length = u32::try_from(size).expect("FRAME_BYTES_MAX fits in u32");
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&length.to_be_bytes());
    Ok(frame)
}

/// Decodes the body of one frame (version and message, without the length prefix).
pub fn decode_frame_body(body: &[u8]) -> Result<Message, ProtoError> {
    if body.len() < VERSION_BYTES {
        return Err(ProtoError::FrameTooShort { size: body.len() });
    }
    let version = u16::from_be_bytes([body[0], body[1]]);
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&version) {
        return Err(ProtoError::UnsupportedVersion { version });
    }
    let (message, rest) = postcard::take_from_bytes::<Message>(&body[VERSION_BYTES..])
        .map_err(|error| ProtoError::Malformed(error.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtoError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    if message.introduced_in() > version {
        return Err(ProtoError::Malformed(format!(
            "a message of version {} in a frame of version {version}",
            message.introduced_in()
        )));
    }
    message.check()?;
    Ok(message)
}

/// Turns a byte stream into messages, one frame at a time.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the stream.
    ///
    /// Refuses a frame whose length prefix is over the limit as soon as the prefix is seen,
    /// so a peer cannot make this buffer grow past one frame.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        self.buffer.extend_from_slice(bytes);
        self.check_length()
    }

    fn check_length(&self) -> Result<(), ProtoError> {
        if let Some(length) = self.pending_length() {
            if length > FRAME_BYTES_MAX {
                return Err(ProtoError::FrameTooLarge {
                    size: length,
                    size_max: FRAME_BYTES_MAX,
                });
            }
        }
        Ok(())
    }

    fn pending_length(&self) -> Option<usize> {
        let prefix: [u8; FRAME_HEADER_BYTES] =
            self.buffer.get(..FRAME_HEADER_BYTES)?.try_into().ok()?;
        Some(u32::from_be_bytes(prefix) as usize)
    }

    /// The next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtoError> {
        let Some(length) = self.pending_length() else {
            return Ok(None);
        };
        self.check_length()?;
        let end = FRAME_HEADER_BYTES + length;
        if self.buffer.len() < end {
            return Ok(None);
        }
        let message = decode_frame_body(&self.buffer[FRAME_HEADER_BYTES..end]);
        self.buffer.drain(..end);
        self.check_length()?;
        message.map(Some)
    }

    /// Bytes held for a frame not yet complete.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}
