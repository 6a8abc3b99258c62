//! Prometheus metrics: process-wide counters recorded by one-line calls
//! (`metrics::ingest_bytes(n)`) and rendered in the text format at
//! `GET /metrics` on the HTTP port.
//!
//! Hand-written over atomics rather than a client crate: the set is small
//! and fixed, and statics keep every recording point a single call that
//! needs no handle threaded through the use-case constructors. Labels are
//! closed sets (read purposes); no customer, object or principal ever
//! becomes a label, so a scrape holds no personal data.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::model::Purpose;

/// Upper bounds (seconds) of the ack latency buckets: around the group
/// commit interval (100 ms by default) and the fsync times of slow disks.
const ACK_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every metric of the service. One instance ([`global`]) in the server;
/// unit tests make their own.
pub struct Registry {
    ingest_bytes: AtomicU64,
    ingest_streams: AtomicU64,
    ingest_streams_open: AtomicI64,
    ingest_streams_refused: AtomicU64,
    objects_committed: AtomicU64,
    ack_buckets: [AtomicU64; ACK_BUCKETS.len()],
    ack_count: AtomicU64,
    ack_sum_micros: AtomicU64,
    reads: [AtomicU64; Purpose::ALL.len()],
    shreds_requested: AtomicU64,
    shreds_completed: AtomicU64,
    sweeps: AtomicU64,
    sweep_failures: AtomicU64,
    sweep_objects_expired: AtomicU64,
    sweep_objects_held: AtomicU64,
    sweep_uploads_abandoned: AtomicU64,
    sweep_leftovers: AtomicU64,
    store_errors: AtomicU64,
    catalog_errors: AtomicU64,
}

static GLOBAL: Registry = Registry::new();

/// The server's registry.
pub fn global() -> &'static Registry {
    &GLOBAL
}

/// Plaintext bytes received by ingest (streams and unary puts).
pub fn ingest_bytes(n: u64) {
    GLOBAL.ingest_bytes.fetch_add(n, Relaxed);
}

/// An ingest stream's session opened; the guard closes it when dropped.
pub fn stream_opened() -> StreamGuard {
    GLOBAL.ingest_streams.fetch_add(1, Relaxed);
    GLOBAL.ingest_streams_open.fetch_add(1, Relaxed);
    StreamGuard(())
}

/// An ingest stream refused at `ingest.max_streams`.
pub fn stream_refused() {
    GLOBAL.ingest_streams_refused.fetch_add(1, Relaxed);
}

/// Counts an open ingest stream for as long as it lives.
pub struct StreamGuard(());

impl Drop for StreamGuard {
    fn drop(&mut self) {
        GLOBAL.ingest_streams_open.fetch_sub(1, Relaxed);
    }
}

/// An object committed (stream or put).
pub fn object_committed() {
    GLOBAL.objects_committed.fetch_add(1, Relaxed);
}

/// Time from receiving the oldest byte of a batch to its durable ack.
pub fn ack_latency(d: Duration) {
    GLOBAL.observe_ack(d);
}

/// A read served (after its audit record), by declared purpose.
pub fn read(purpose: Purpose) {
    GLOBAL.reads[purpose_index(purpose)].fetch_add(1, Relaxed);
}

pub fn shred_requested() {
    GLOBAL.shreds_requested.fetch_add(1, Relaxed);
}

/// A shred reached its signed certificate.
pub fn shred_completed() {
    GLOBAL.shreds_completed.fetch_add(1, Relaxed);
}

/// A retention sweep that ran to its end, with what it did.
pub fn sweep(report: &crate::retention::SweepReport) {
    GLOBAL.sweeps.fetch_add(1, Relaxed);
    GLOBAL.sweep_objects_expired.fetch_add(report.objects_expired, Relaxed);
    GLOBAL.sweep_objects_held.store(report.objects_held, Relaxed);
    GLOBAL.sweep_uploads_abandoned.fetch_add(report.uploads_abandoned, Relaxed);
    GLOBAL.sweep_leftovers.fetch_add(report.leftovers, Relaxed);
}

/// A retention sweep that stopped on an error.
pub fn sweep_failed() {
    GLOBAL.sweep_failures.fetch_add(1, Relaxed);
}

/// An object store failure that reached a use case.
pub fn store_error() {
    GLOBAL.store_errors.fetch_add(1, Relaxed);
}

/// A catalog backend failure that reached a use case.
pub fn catalog_error() {
    GLOBAL.catalog_errors.fetch_add(1, Relaxed);
}

fn purpose_index(p: Purpose) -> usize {
    Purpose::ALL.iter().position(|q| *q == p).unwrap_or(0)
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    #[allow(clippy::declare_interior_mutable_const)] // array initialiser only
    pub const fn new() -> Self {
        const ZERO: AtomicU64 = AtomicU64::new(0);
        Self {
            ingest_bytes: ZERO,
            ingest_streams: ZERO,
            ingest_streams_open: AtomicI64::new(0),
            ingest_streams_refused: AtomicU64::new(0),
            objects_committed: ZERO,
            ack_buckets: [ZERO; ACK_BUCKETS.len()],
            ack_count: ZERO,
            ack_sum_micros: ZERO,
            reads: [ZERO; Purpose::ALL.len()],
            shreds_requested: ZERO,
            shreds_completed: ZERO,
            sweeps: ZERO,
            sweep_failures: ZERO,
            sweep_objects_expired: ZERO,
            sweep_objects_held: ZERO,
            sweep_uploads_abandoned: ZERO,
            sweep_leftovers: ZERO,
            store_errors: ZERO,
            catalog_errors: ZERO,
        }
    }

    fn observe_ack(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Cumulative buckets are summed at render time; each observation
        // lands in the first bucket that holds it (or only in +Inf).
        if let Some(i) = ACK_BUCKETS.iter().position(|b| secs <= *b) {
            self.ack_buckets[i].fetch_add(1, Relaxed);
        }
        self.ack_count.fetch_add(1, Relaxed);
        self.ack_sum_micros.fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n");
        };
        counter(
            &mut out,
            "recvault_ingest_bytes_total",
            "Plaintext bytes received by ingest streams and puts.",
            self.ingest_bytes.load(Relaxed),
        );
        counter(
            &mut out,
            "recvault_ingest_streams_total",
            "Ingest stream sessions opened.",
            self.ingest_streams.load(Relaxed),
        );
        let _ = write!(
            out,
            "# HELP recvault_ingest_streams_open Ingest stream sessions open now.\n\
             # TYPE recvault_ingest_streams_open gauge\nrecvault_ingest_streams_open {}\n",
            self.ingest_streams_open.load(Relaxed)
        );
        counter(
            &mut out,
            "recvault_ingest_streams_refused_total",
            "Ingest streams refused with UNAVAILABLE at ingest.max_streams.",
            self.ingest_streams_refused.load(Relaxed),
        );
        counter(
            &mut out,
            "recvault_objects_committed_total",
            "Objects committed.",
            self.objects_committed.load(Relaxed),
        );

        let name = "recvault_ingest_ack_latency_seconds";
        let _ =
            write!(out, "# HELP {name} Time from receiving ingest data to its durable ack.\n# TYPE {name} histogram\n");
        let mut cumulative = 0;
        for (bound, n) in ACK_BUCKETS.iter().zip(&self.ack_buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.ack_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.ack_sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");

        let name = "recvault_reads_total";
        let _ = write!(out, "# HELP {name} Content reads served, by declared purpose.\n# TYPE {name} counter\n");
        for (p, n) in Purpose::ALL.iter().zip(&self.reads) {
            let _ = writeln!(out, "{name}{{purpose=\"{}\"}} {}", p.name(), n.load(Relaxed));
        }

        let name = "recvault_shreds_total";
        let _ = write!(out, "# HELP {name} Customer shreds, by stage.\n# TYPE {name} counter\n");
        let _ = writeln!(out, "{name}{{stage=\"requested\"}} {}", self.shreds_requested.load(Relaxed));
        let _ = writeln!(out, "{name}{{stage=\"completed\"}} {}", self.shreds_completed.load(Relaxed));

        let name = "recvault_retention_sweeps_total";
        let _ = write!(out, "# HELP {name} Retention sweeps, by result.\n# TYPE {name} counter\n");
        let _ = writeln!(out, "{name}{{result=\"ok\"}} {}", self.sweeps.load(Relaxed));
        let _ = writeln!(out, "{name}{{result=\"failed\"}} {}", self.sweep_failures.load(Relaxed));
        let name = "recvault_retention_sweep_objects_total";
        let _ = write!(out, "# HELP {name} What retention sweeps did to objects and uploads.\n# TYPE {name} counter\n");
        for (outcome, v) in [
            ("expired", &self.sweep_objects_expired),
            ("upload_abandoned", &self.sweep_uploads_abandoned),
            ("leftover", &self.sweep_leftovers),
        ] {
            let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {}", v.load(Relaxed));
        }
        let name = "recvault_retention_objects_held";
        let _ = write!(
            out,
            "# HELP {name} Objects past their retention kept by legal holds, at the last sweep.\n# TYPE {name} gauge\n\
             {name} {}\n",
            self.sweep_objects_held.load(Relaxed)
        );
        counter(
            &mut out,
            "recvault_store_errors_total",
            "Object store failures that reached a request or sweep.",
            self.store_errors.load(Relaxed),
        );
        counter(
            &mut out,
            "recvault_catalog_errors_total",
            "Catalog backend failures that reached a request or sweep.",
            self.catalog_errors.load(Relaxed),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn the_histogram_is_cumulative_and_counts_overflow_only_in_inf() {
        let r = Registry::new();
        r.observe_ack(Duration::from_millis(3));
        r.observe_ack(Duration::from_millis(100));
        r.observe_ack(Duration::from_secs(60));
        let text = r.render();
        let h = "recvault_ingest_ack_latency_seconds";
        assert_eq!(value(&text, &format!("{h}_bucket{{le=\"0.005\"}}")), 1.0);
        assert_eq!(value(&text, &format!("{h}_bucket{{le=\"0.05\"}}")), 1.0);
        assert_eq!(value(&text, &format!("{h}_bucket{{le=\"0.1\"}}")), 2.0, "a bound is inclusive");
        assert_eq!(value(&text, &format!("{h}_bucket{{le=\"10\"}}")), 2.0);
        assert_eq!(value(&text, &format!("{h}_bucket{{le=\"+Inf\"}}")), 3.0);
        assert_eq!(value(&text, &format!("{h}_count")), 3.0);
        assert!((value(&text, &format!("{h}_sum")) - 60.103).abs() < 1e-9);
    }

    #[test]
    fn every_series_has_help_and_type_and_purposes_are_a_closed_set() {
        let text = Registry::new().render();
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{name} has no TYPE line before it");
            }
        }
        for p in Purpose::ALL {
            assert_eq!(value(&text, &format!("recvault_reads_total{{purpose=\"{}\"}}", p.name())), 0.0);
        }
    }
}
