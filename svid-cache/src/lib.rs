//! svid-cache (being written)
