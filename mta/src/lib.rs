//! A strict, durable SMTP server for hosted domains.
//!
//! `smtp` is the sans-IO protocol core; the rest is the shell around it.

pub mod limits;
pub mod smtp;
