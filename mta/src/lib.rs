//! A strict, durable SMTP server for hosted domains.
//!
//! `smtp` is the sans-IO protocol core; the rest (feature `daemon`) is the
//! shell around it: directory, queue, delivery, listeners.

pub mod limits;
pub mod smtp;

#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod directory;
#[cfg(feature = "daemon")]
pub mod durable;
#[cfg(feature = "daemon")]
pub mod maildir;
#[cfg(feature = "daemon")]
pub mod queue;
