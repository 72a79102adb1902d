//! meshauth agent (being written)
