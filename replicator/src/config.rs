//! Configuration of `replicator serve`: an optional TOML file, overridden
//! by command-line flags, resolved into a validated [`ServeConfig`].
//!
//! Unknown keys are errors (a typo must not silently fall back to a
//! default), and every error names the file, the key and the fix.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::metadata::MetaLocation;
use crate::nbd::handshake::TlsMode;
use crate::tls::TlsFiles;

/// The NBD port registered with IANA.
pub const NBD_PORT_DEFAULT: u16 = 10809;
/// Where `serve` listens for `status` when not told otherwise.
pub const CONTROL_SOCKET_DEFAULT: &str = "/run/replicator/replicator.ctl";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("invalid config {path}: {cause}")]
    Parse { path: PathBuf, cause: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    volume: VolumeSection,
    #[serde(default)]
    nbd: NbdSection,
    #[serde(default)]
    tls: TlsSection,
    #[serde(default)]
    control: ControlSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    io: IoSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeSection {
    disk: Option<PathBuf>,
    meta: Option<String>,
    export: Option<String>,
    description: Option<String>,
    read_only: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NbdSection {
    listen: Option<Vec<String>>,
    unix: Option<Vec<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    mode: Option<TlsMode>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlSection {
    socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IoSection {
    direct: Option<bool>,
    threads: Option<usize>,
    ring_entries: Option<u32>,
    busy_poll_us: Option<u32>,
}

/// Values given on the command line; each overrides the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub disk: Option<PathBuf>,
    pub meta: Option<String>,
    pub export: Option<String>,
    pub description: Option<String>,
    pub read_only: bool,
    pub direct_io: bool,
    pub listen: Vec<String>,
    pub unix: Vec<PathBuf>,
    pub tls_mode: Option<TlsMode>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub control: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub io_threads: Option<usize>,
    pub busy_poll_us: Option<u32>,
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub disk: PathBuf,
    pub meta: MetaLocation,
    pub export: String,
    pub description: String,
    pub read_only: bool,
    pub direct_io: bool,
    pub listen: Vec<String>,
    pub unix: Vec<PathBuf>,
    pub tls_mode: TlsMode,
    pub tls_files: Option<TlsFiles>,
    pub control: PathBuf,
    pub metrics_listen: Option<String>,
    pub io_threads: usize,
    pub ring_entries: u32,
    pub busy_poll_us: u32,
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.to_owned(), cause })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), cause: e.to_string() })
}

/// Merges the file (if any) and the flags, then validates the result.
pub fn resolve(overrides: Overrides) -> Result<ServeConfig, ConfigError> {
    let file = match &overrides.config_file {
        Some(path) => read_file(path)?,
        None => FileConfig::default(),
    };
    let origin = match &overrides.config_file {
        Some(path) => format!(" in {}", path.display()),
        None => String::new(),
    };
    let invalid = ConfigError::Invalid;

    let disk = overrides
        .disk
        .or(file.volume.disk)
        .ok_or_else(|| invalid(format!("no backing disk given: pass --disk PATH or set volume.disk{origin}")))?;
    let meta: MetaLocation = overrides
        .meta
        .or(file.volume.meta)
        .unwrap_or_else(|| "internal".to_string())
        .parse()
        .map_err(|e| invalid(format!("volume.meta{origin}: {e}")))?;
    let export = overrides.export.or(file.volume.export).unwrap_or_else(|| "volume".to_string());
    if export.len() > 4096 || export.contains('\0') {
        return Err(invalid(format!(
            "volume.export{origin}: export names are at most 4096 bytes without NUL (NBD spec)"
        )));
    }
    let description = overrides.description.or(file.volume.description).unwrap_or_default();
    let read_only = overrides.read_only || file.volume.read_only.unwrap_or(false);
    let direct_io = overrides.direct_io || file.io.direct.unwrap_or(false);

    let mut listen = if overrides.listen.is_empty() { file.nbd.listen.unwrap_or_default() } else { overrides.listen };
    let unix = if overrides.unix.is_empty() { file.nbd.unix.unwrap_or_default() } else { overrides.unix };
    if listen.is_empty() && unix.is_empty() {
        // Loopback by default: exposing a volume to the network is a choice.
        listen.push(format!("127.0.0.1:{NBD_PORT_DEFAULT}"));
    }
    for addr in &listen {
        check_socket_addr(addr).map_err(|e| invalid(format!("nbd.listen{origin}: {e}")))?;
    }

    let tls_mode = overrides.tls_mode.or(file.tls.mode).unwrap_or(TlsMode::Off);
    let cert = overrides.tls_cert.or(file.tls.cert);
    let key = overrides.tls_key.or(file.tls.key);
    let client_ca = overrides.tls_client_ca.or(file.tls.client_ca);
    let tls_files = match (tls_mode, cert, key) {
        (TlsMode::Off, _, _) => None,
        (_, Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca }),
        (mode, _, _) => {
            let mode = if mode == TlsMode::Required { "required" } else { "optional" };
            return Err(invalid(format!(
                "TLS mode {mode} needs a certificate and key: pass --tls-cert and --tls-key or set tls.cert and tls.key{origin}"
            )));
        }
    };

    let control = overrides.control.or(file.control.socket).unwrap_or_else(|| PathBuf::from(CONTROL_SOCKET_DEFAULT));
    let metrics_listen = overrides.metrics_listen.or(file.metrics.listen);
    if let Some(addr) = &metrics_listen {
        check_socket_addr(addr).map_err(|e| invalid(format!("metrics.listen{origin}: {e}")))?;
    }
    let io_threads = overrides.io_threads.or(file.io.threads).unwrap_or(1);
    if !(1..=16).contains(&io_threads) {
        return Err(invalid(format!("io.threads{origin} must be between 1 and 16, not {io_threads}")));
    }
    let ring_entries = file.io.ring_entries.unwrap_or(256);
    if !ring_entries.is_power_of_two() || !(8..=4096).contains(&ring_entries) {
        return Err(invalid(format!(
            "io.ring_entries{origin} must be a power of two between 8 and 4096, not {ring_entries}"
        )));
    }
    let busy_poll_us = overrides.busy_poll_us.or(file.io.busy_poll_us).unwrap_or(crate::backing::BUSY_POLL_DEFAULT_US);
    if busy_poll_us > crate::backing::BUSY_POLL_MAX_US {
        return Err(invalid(format!(
            "io.busy_poll_us{origin} must be between 0 (off) and {}, not {busy_poll_us}",
            crate::backing::BUSY_POLL_MAX_US
        )));
    }

    Ok(ServeConfig {
        disk,
        meta,
        export,
        description,
        read_only,
        direct_io,
        listen,
        unix,
        tls_mode,
        tls_files,
        control,
        metrics_listen,
        io_threads,
        ring_entries,
        busy_poll_us,
    })
}

fn check_socket_addr(addr: &str) -> Result<(), String> {
    addr.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| format!("{addr:?} is not HOST:PORT with a numeric IP (e.g. 127.0.0.1:10809 or [::1]:10809)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("replicator-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("c{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_listen_on_loopback_only() {
        let config = resolve(Overrides { disk: Some("/dev/null".into()), ..Default::default() }).unwrap();
        assert_eq!(config.listen, vec!["127.0.0.1:10809".to_string()]);
        assert_eq!(config.tls_mode, TlsMode::Off);
        assert_eq!(config.export, "volume");
        assert_eq!(config.meta, MetaLocation::Internal);
    }

    #[test]
    fn missing_disk_names_the_flag_and_key() {
        let err = resolve(Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("--disk") && err.contains("volume.disk"), "{err}");
    }

    #[test]
    fn tls_without_cert_is_refused_with_the_fix() {
        let err = resolve(Overrides {
            disk: Some("/dev/null".into()),
            tls_mode: Some(TlsMode::Required),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("--tls-cert"), "{err}");
    }

    #[test]
    fn unknown_key_in_file_is_an_error_naming_it() {
        let path = write_config("[volume]\ndisk = \"/dev/null\"\nreadonly = true\n");
        let err = resolve(Overrides { config_file: Some(path.clone()), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("readonly") && err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let path = write_config("[volume]\ndisk = \"/a\"\nexport = \"x\"\n[nbd]\nlisten = [\"127.0.0.1:1\"]\n");
        let config =
            resolve(Overrides { config_file: Some(path), export: Some("y".into()), ..Default::default() }).unwrap();
        assert_eq!(config.disk, PathBuf::from("/a"));
        assert_eq!(config.export, "y");
        assert_eq!(config.listen, vec!["127.0.0.1:1".to_string()]);
    }

    #[test]
    fn bad_listen_address_is_explained() {
        let err = resolve(Overrides {
            disk: Some("/dev/null".into()),
            listen: vec!["localhost:10809".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("HOST:PORT"), "{err}");
    }
}
