//! The LISTEN/NOTIFY event source.
