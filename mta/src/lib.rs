//! A strict, durable SMTP server for hosted domains.
//!
//! `smtp` is the sans-IO protocol core; the rest (feature `daemon`) is the
//! shell around it: directory, queue, delivery, listeners.

pub mod limits;
pub mod smtp;

#[cfg(feature = "daemon")]
pub mod directory;
