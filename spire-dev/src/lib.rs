//! spire-dev (being written)
