//! Concord: masterless replication of business records as Automerge documents.
//!
//! The parts, one module each (see `DESIGN.md` in the shared design notes):
//! [`record`] (the record model), [`store`] (sled and in-memory stores, document layout,
//! cache), [`node`] (a node's data dir, config and record operations), with replication,
//! transport and adapters building on them.

pub mod config;
pub mod net;
pub mod node;
pub mod record;
pub mod store;
pub mod sync;
