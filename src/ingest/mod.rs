//! Streaming capture: durable encrypted spool, content checks, commit.

pub mod spool;
