//! Trigger SQL and its installer.
