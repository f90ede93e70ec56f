//! Cluster configuration (TODO).
