//! The `mirror` subcommands, one module each: its flags (a clap `Args` struct) and its `run`.
//! What several of them share is in [`shared`].

pub mod backup;
pub mod bench;
pub mod check_workload;
pub mod control;
pub mod demo;
pub mod keys;
pub mod primary;
pub mod shared;
pub mod status;
pub mod top;
pub mod verify;
