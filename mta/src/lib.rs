//! A strict, durable SMTP server for hosted domains.
//!
//! `smtp` is the sans-IO protocol core; the rest (feature `daemon`) is the
//! shell around it: directory, queue, delivery, listeners.

#![forbid(unsafe_code)]

pub mod limits;
pub mod smtp;

#[cfg(feature = "daemon")]
pub mod auth_limit;
#[cfg(feature = "daemon")]
pub mod bounce;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod delivery;
#[cfg(feature = "daemon")]
pub mod directory;
#[cfg(feature = "daemon")]
pub mod durable;
#[cfg(feature = "daemon")]
pub mod filter;
#[cfg(feature = "daemon")]
pub mod header_from;
#[cfg(feature = "daemon")]
pub mod lock;
#[cfg(feature = "daemon")]
pub mod logging;
#[cfg(feature = "daemon")]
pub mod maildir;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod mx;
#[cfg(feature = "daemon")]
pub mod privileges;
#[cfg(feature = "daemon")]
pub mod proxy;
#[cfg(feature = "daemon")]
pub mod queue;
#[cfg(feature = "daemon")]
pub mod received;
#[cfg(feature = "daemon")]
pub mod remote;
#[cfg(feature = "daemon")]
pub mod server;
#[cfg(feature = "daemon")]
pub mod tls;
