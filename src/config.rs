//! Service configuration: an optional TOML file, then command-line flags and
//! `RECVAULT_*` environment variables on top. Unknown keys are refused, so a
//! typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ingest::SizeCaps;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./recvault-data";
/// Default gRPC address (loopback only: nothing is exposed by default).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Holds `catalog.sqlite`, `root.key`, `spool/` and `objects/`.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    pub ingest: IngestSection,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSection {
    /// Longest wait of received bytes for their fsync and ack.
    #[serde(with = "humantime_serde_compat")]
    pub commit_interval: Duration,
    /// Flush early once this many bytes are pending.
    pub commit_bytes: usize,
    /// Close a stream silent this long (its durable bytes are kept).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Largest body of the unary Put.
    pub put_cap: u64,
    pub caps: SizeCaps,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            ingest: IngestSection::default(),
        }
    }
}

impl Default for IngestSection {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(100),
            commit_bytes: 4 << 20,
            idle_timeout: Duration::from_secs(120),
            put_cap: 4 << 20,
            caps: SizeCaps::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; every problem names the file and the key.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let i = &self.ingest;
        anyhow::ensure!(
            !i.commit_interval.is_zero() && i.commit_interval <= Duration::from_secs(5),
            "ingest.commit_interval must be between 1ms and 5s"
        );
        anyhow::ensure!(
            (64 << 10..=64 << 20).contains(&i.commit_bytes),
            "ingest.commit_bytes must be between 64 KiB and 64 MiB"
        );
        anyhow::ensure!(i.idle_timeout >= Duration::from_secs(1), "ingest.idle_timeout must be at least 1s");
        anyhow::ensure!(
            (1..=64 << 20).contains(&i.put_cap),
            "ingest.put_cap must be between 1 byte and 64 MiB (larger items use the streaming Ingest call)"
        );
        Ok(())
    }
}

/// `Duration` as a humantime string ("100ms", "2m").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_unknown_keys_are_refused() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg, Config::default());
        let cfg = Config::from_toml("listen = \"127.0.0.1:9000\"\n[ingest]\ncommit_interval = \"50ms\"\n").unwrap();
        assert_eq!(cfg.ingest.commit_interval, Duration::from_millis(50));
        let err = Config::from_toml("lisen = \"127.0.0.1:9000\"").unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(Config::from_toml("[ingest]\ncommit_interval = \"0s\"").is_err());
    }

    #[test]
    fn the_shipped_example_is_the_defaults() {
        let cfg = Config::from_toml(include_str!("../deploy/recvault.toml")).unwrap();
        assert_eq!(cfg, Config::default());
    }
}
