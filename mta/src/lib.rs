//! Placeholder: see issue tracker; this crate is filled in by a later issue.
