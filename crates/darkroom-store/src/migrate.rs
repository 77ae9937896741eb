//! `darkroom migrate`: copies a SQLite deployment into PostgreSQL.
