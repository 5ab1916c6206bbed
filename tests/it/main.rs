//! kiln's integration tests, built as one binary (`cargo test --test it`) so that the crate
//! and candle are linked once rather than once per file.
//!
//! Each module was a test binary of its own and keeps its own fixtures, statics and
//! `OnceLock`s; what they share (running the `kiln` binary, temporary workspaces, reading
//! JSON, parsing `kiln run`'s per-stage lines…) lives in [`support`]. One module or one test
//! runs with a filter: `cargo test --test it faults::` or `cargo test --test it dag_formats`.
//! Snapshots of the CLI's human output are under `snapshots/` beside this file.

mod cli;
mod convert;
mod data_stages;
mod experiments;
mod faults;
mod fuzz_manifest;
mod http_source;
mod init;
mod label_issues;
mod library;
mod models;
mod pipelines;
mod remote;
mod serve;
mod slurm;
mod snapshots;
mod support;
mod tasks;
mod train;
