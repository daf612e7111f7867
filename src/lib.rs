//! docmail as a library: the stages of a job's life, one module each, for the `docmail` binary (which
//! is their only user) and for the fuzz targets in `fuzz/`. See HACKING.md for what each one owns.

pub mod check;
pub mod cli;
pub mod compose;
pub mod config;
pub mod deliver;
pub mod error;
pub mod intake;
pub mod manifest;
pub mod queue;
pub mod render;
pub mod report;
pub mod run;
pub mod spool;
pub mod submit;
