//! Asking an LLM the same question several times: the service that `claw judge`
//! (the PRM) and `claw distill-hints` (the hint judge) share, and that `claw eval`
//! uses to put benchmark prompts to a model or an endpoint.
//!
//! A [`ChatBackend`] answers one chat request: [`LocalBackend`] generates with a
//! GGUF model in this process, [`RemoteBackend`] POSTs to any OpenAI-compatible
//! `/chat/completions` endpoint. [`VoteRunner`] sends every prompt `votes` times
//! (each vote with its own seed, derived from the item's key, so a re-run gives the
//! same votes on the local model), with a per-call timeout, bounded retries with
//! exponential backoff, and at most `concurrency` calls in flight. A call that
//! still fails is an `Err` in its slot (an invalid vote for the caller), never a
//! crash; only a misconfigured judge (HTTP 401, 403, 404: wrong key, URL or model
//! name) stops the run, since every later call would fail the same way.
//!
//! Parsing the replies is the caller's business; [`boxed`] reads the `\boxed{}`
//! answers judge prompts ask for (the PRM's vote rules are in `judge::votes`).
//!
//! - [`client`]: the request, the reply, the backend trait, the local backend.
//! - [`remote`]: the HTTP backend: endpoint URLs, the request, the reply's JSON.
//! - [`votes`]: the vote runner, its options and counters, per-vote seeds.
//! - [`boxed`]: the last `\boxed{}` of a reply and its score.
//! - [`prompt`]: prompt files (`[system]` / `[user]` sections, `{name}` placeholders).

pub mod boxed;
pub mod client;
pub mod prompt;
pub mod remote;
pub mod votes;

pub use client::{CallError, ChatBackend, ChatRequest, LocalBackend, Reply};
pub use remote::{endpoints, parse_completion, EndpointFlags, RemoteBackend, JUDGE_FLAGS};
pub use votes::{vote_seed, CallOptions, CallStats, Replies, VoteItem, VoteRunner};
