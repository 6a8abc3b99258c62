//! recvault: captures customer-support interactions (call recordings, chat
//! transcripts, images), encrypts each item under per-customer envelope keys
//! into object storage, serves them back by byte range, and makes a
//! customer's content unrecoverable by destroying their keys.
//!
//! # Architecture
//!
//! Layers point inward; only `api` sees protobuf types:
//!
//! ```text
//! api/        gRPC handlers: translate, call one use-case, map errors (api/status.rs)
//! web/        HTTP port: coaching page, JSON over the same handlers, signed playback links
//! ingest/     streaming capture: durable encrypted spool, content checks, commit
//! retrieve/   stat, list, segment-level range reads
//! retention/  policies, holds, expiry sweep, shred pipeline, certificates
//! audit/      hash-chained audit trail (fail-closed for reads and shreds)
//! auth/       identities (tokens, client certificates), roles, the permission table
//! keys/       root key providers, customer keys, data keys
//! catalog/    metadata + wrapped keys behind a trait (SQLite today)
//! store/      ciphertext over Arc<dyn ObjectStore>, the one path builder
//! crypto/     pure: segmented AES-256-GCM format, key wrapping, secret types
//! ```
//!
//! Beside the layers: `config` (file + `RECVAULT__*` env + flags), `server`
//! (wiring), `readiness` (the `/ready` and gRPC health probe), `metrics`
//! (process-wide counters, recorded by one-line calls from the use cases)
//! and `sqlite_group` (group commit for the SQLite catalog and audit trail).
//!
//! # Threat model in brief
//!
//! Every object has its own random data key, wrapped by its customer's key,
//! which is wrapped by the root key. Wrapped keys live only in the catalog,
//! never beside the ciphertext, so a versioned or WORM object store holds
//! nothing that must be destroyed. Shredding a customer deletes every
//! version of the customer key and every wrapped data key of the customer
//! (SQLite `secure_delete` plus a truncating WAL checkpoint scrub the
//! database files); the ciphertext left anywhere — object-store versions,
//! backups of the object store — is then undecryptable. A shred first
//! waits out a grace window (`PENDING_SHRED`, content refused, cancellable),
//! then destroys, verifies that the customer's canary no longer opens, and
//! signs a certificate (docs/STATES.md).
//!
//! Shredding does **not** reach: backups of the catalog taken before the
//! shred together with the root key (restore either and the keys return —
//! keep catalog backups on a retention shorter than your erasure promise, or
//! re-apply the shred ledger on restore); plaintext a client already read;
//! and process memory of a running server until the keys are dropped.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod ingest;
pub mod keys;
pub mod loadgen;
pub mod metrics;
pub mod model;
pub mod readiness;
pub mod retention;
pub mod retrieve;
pub mod revocation;
pub mod server;
pub mod sqlite_group;
pub mod store;
pub mod web;
