//! What a binding keeps of its own in the store, each under a name made in one place: the
//! initial loads' progress, how far it applied withdrawals, and its deferred and quarantined
//! rows.

/// Which way a row goes: `In`, table to record; `Out`, record to table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    In,
    Out,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::In => "in",
            Side::Out => "out",
        }
    }
}

/// One piece of a binding's state.
#[derive(Debug, Clone, Copy)]
pub(super) enum State<'a> {
    /// How far the initial load of the table's rows into records got.
    LoadIn,
    /// How far the initial load of the records into the table got.
    LoadOut,
    /// The last withdrawal (a record that left this node) applied to the table.
    Withdrawn,
    /// The log marks an older build kept (read once, then let go).
    LegacyMarks,
    /// A row set aside with its error, retried with backoff.
    Quarantined(Side, &'a str),
    /// A row waiting for a capture of its own to be read first.
    Deferred(Side, &'a str),
}

impl State<'_> {
    /// The name it is kept under, for the binding named `binding`.
    pub(super) fn name(self, binding: &str) -> Vec<u8> {
        let what = match self {
            State::LoadIn => "load_in".to_owned(),
            State::LoadOut => "load_out".to_owned(),
            State::Withdrawn => "withdrawn".to_owned(),
            State::LegacyMarks => "marks".to_owned(),
            State::Quarantined(side, key) => format!("quarantine/{}/{key}", side.as_str()),
            State::Deferred(side, key) => format!("deferred/{}/{key}", side.as_str()),
        };
        format!("adapter/{binding}/{what}").into_bytes()
    }
}

/// The prefix of the names of a binding's quarantined rows (both sides).
pub(super) fn quarantined_prefix(binding: &str) -> Vec<u8> {
    format!("adapter/{binding}/quarantine/").into_bytes()
}

/// The prefix of the names of a binding's deferred rows on one side.
pub(super) fn deferred_prefix(binding: &str, side: Side) -> Vec<u8> {
    format!("adapter/{binding}/deferred/{}/", side.as_str()).into_bytes()
}
