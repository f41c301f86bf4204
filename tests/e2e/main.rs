//! claw's integration tests, run like a user would: the built `claw` binary on
//! temporary directories, talked to only on loopback.
//!
//! One test binary holds every suite as a module (`cargo test --test e2e serve::`),
//! so the build links it once instead of once per file: each link carries the whole
//! library, and twenty of them cost gigabytes of disk and minutes on CI.

mod common;

mod agent;
mod attnres;
mod cli;
mod collect;
mod daemon;
mod distill;
mod eval;
mod judge;
mod model;
mod persona;
mod pipeline;
mod rollout;
mod serve;
mod store;
mod train;
mod up;
mod upstream;
mod upstream_lora;
mod upstream_push;
