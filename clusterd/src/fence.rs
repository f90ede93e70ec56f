//! Fence agents (TODO).
