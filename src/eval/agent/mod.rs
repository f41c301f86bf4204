//! The agent benchmark (docs/ARCHITECTURE.md, "Agent benchmark"): does the loop
//! learn to use a tool, only from what the environment says?
//!
//! The model gets problems whose answer must be computed ([`tasks`]) and a
//! `python` tool; the harness runs its calls in the sandbox and sends their
//! output back as the tool message, checks the final answer exactly, and reports
//! the outcome to the loop ([`episode`]). Episodes go through a live `claw up`
//! ([`run`]) while its stages train in the background; [`metrics`] turns them
//! into the success rate per window of episodes, the held-out success before and
//! after, and the tool-call validity rate.

pub mod episode;
pub mod metrics;
pub mod run;
pub mod tasks;
