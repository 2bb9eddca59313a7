//! The daemon's one TOML configuration file: every key, its default, and validation that names
//! the offending key.
