//! Sessions (docs/ARCHITECTURE.md, "Sessions and next state"): which conversation a
//! request belongs to, whether it is a `main` or `side` turn, and whether it ends the
//! session. Headers win over body fields; the body fields are removed before the
//! messages reach the template.
//!
//! The registry remembers, per session, the response ids served, so feedback can
//! be checked (unknown session or response id: 404) and aimed at a turn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use rand::Rng;
use serde_json::{Map, Value as Json};

use super::error::ApiError;
use super::fields::{self, parse_done, TURN_TYPE_HEADER};
use crate::rollout::json_kind as kind;

/// Response ids remembered per session (older ones can no longer be named by feedback).
const MAX_RESPONSES_PER_SESSION: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TurnType {
    Main,
    Side,
}

impl TurnType {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnType::Main => "main",
            TurnType::Side => "side",
        }
    }
}

/// The session facts of one request.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session_id: String,
    pub turn_type: TurnType,
    pub done: bool,
}

/// A random id with a prefix: `chatcmpl-`, `sess-`, `call_`, `fb-`.
pub fn new_id(prefix: &str) -> String {
    let n: u128 = rand::thread_rng().gen();
    format!("{prefix}{n:032x}")
}

/// Reads the session fields from the headers, else the body (and removes them
/// from the body either way).
pub fn extract(
    headers: &HeaderMap,
    body: &mut Map<String, Json>,
    default_turn_type: TurnType,
) -> Result<SessionInfo, ApiError> {
    let body_session = body.remove("session_id");
    let body_turn = body.remove("turn_type");
    let body_done = body.remove("session_done");

    let session_id = fields::session_id(headers, body_session.as_ref())?;
    let session_id = match session_id {
        Some(id) => id,
        None => {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                crate::info!(
                    "a request came without X-Session-Id (or session_id): each such request \
                     is its own session (said once)"
                );
            }
            new_id("sess-")
        }
    };

    let turn_type = match fields::header(headers, TURN_TYPE_HEADER)? {
        Some(t) => Some(t),
        None => match body_turn {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s),
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "`turn_type` must be \"main\" or \"side\", got {}",
                        kind(&other)
                    ),
                    "turn_type",
                ))
            }
        },
    };
    let turn_type = match turn_type.as_deref().map(str::trim) {
        None | Some("") => default_turn_type,
        Some(t) if t.eq_ignore_ascii_case("main") => TurnType::Main,
        Some(t) if t.eq_ignore_ascii_case("side") => TurnType::Side,
        Some(t) => {
            return Err(ApiError::invalid(
                format!("turn type must be \"main\" or \"side\", got {t:?} (X-Turn-Type header or turn_type field)"),
                "turn_type",
            ))
        }
    };

    let done = parse_done(headers, body_done.as_ref())?;
    Ok(SessionInfo {
        session_id,
        turn_type,
        done,
    })
}

struct Entry {
    /// Response ids of this session's turns, in order, with their turn type.
    responses: Vec<(String, TurnType)>,
    last_seen: Instant,
    done: bool,
}

/// Sessions seen recently, forgotten after `timeout` idle.
pub struct Registry {
    timeout: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    sessions: HashMap<String, Entry>,
}

/// What feedback resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackTarget {
    pub response_id: String,
    /// 1-based index among the session's main turns, if the response is a main turn.
    pub turn: Option<i32>,
}

impl Registry {
    pub fn new(timeout: Duration) -> Self {
        Registry {
            timeout,
            inner: Mutex::new(Inner {
                sessions: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the sessions idle for the timeout (`claw serve` calls it on a
    /// timer; lookups also treat them as gone meanwhile).
    pub fn prune(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let timeout = self.timeout;
        inner
            .sessions
            .retain(|_, e| now.duration_since(e.last_seen) < timeout);
    }

    /// How often [`prune`](Self::prune) should run: often enough that memory
    /// follows the timeout, at most once a second.
    pub fn prune_every(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Notes a served response.
    pub fn add_response(&self, info: &SessionInfo, response_id: &str) {
        let mut inner = self.lock();
        let now = Instant::now();
        let entry = inner
            .sessions
            .entry(info.session_id.clone())
            .or_insert_with(|| Entry {
                responses: Vec::new(),
                last_seen: now,
                done: false,
            });
        entry.last_seen = now;
        entry.done |= info.done;
        if entry.responses.len() >= MAX_RESPONSES_PER_SESSION {
            entry.responses.remove(0);
        }
        entry
            .responses
            .push((response_id.to_string(), info.turn_type));
    }

    /// Finds the response feedback is about: the one named by id, else the
    /// session's `turn`-th main turn, else the session's latest response.
    pub fn resolve_feedback(
        &self,
        session_id: &str,
        response_id: Option<&str>,
        turn: Option<i32>,
    ) -> Result<FeedbackTarget, ApiError> {
        let inner = self.lock();
        let live = |e: &&Entry| e.last_seen.elapsed() < self.timeout;
        let entry = inner.sessions.get(session_id).filter(live).ok_or_else(|| {
            ApiError::not_found(
                format!(
                    "unknown session {session_id:?}: no response was served in it (or it expired)"
                ),
                "session_id",
            )
        })?;
        let main_turn_of = |index: usize| -> Option<i32> {
            if entry.responses[index].1 != TurnType::Main {
                return None;
            }
            let n = entry.responses[..=index]
                .iter()
                .filter(|(_, t)| *t == TurnType::Main)
                .count();
            i32::try_from(n).ok()
        };
        if let Some(id) = response_id {
            let index = entry
                .responses
                .iter()
                .position(|(r, _)| r == id)
                .ok_or_else(|| {
                    ApiError::not_found(
                        format!("response {id:?} is not in session {session_id:?}"),
                        "response_id",
                    )
                })?;
            let found = main_turn_of(index);
            if let (Some(asked), Some(found)) = (turn, found) {
                if asked != found {
                    return Err(ApiError::invalid(
                        format!("response {id:?} is main turn {found}, not turn {asked}"),
                        "turn",
                    ));
                }
            }
            return Ok(FeedbackTarget {
                response_id: id.to_string(),
                turn: found,
            });
        }
        if let Some(turn) = turn {
            let index = (0..entry.responses.len())
                .find(|&i| main_turn_of(i) == Some(turn))
                .ok_or_else(|| {
                    ApiError::not_found(
                        format!("session {session_id:?} has no main turn {turn}"),
                        "turn",
                    )
                })?;
            return Ok(FeedbackTarget {
                response_id: entry.responses[index].0.clone(),
                turn: Some(turn),
            });
        }
        let last = entry.responses.len().checked_sub(1).ok_or_else(|| {
            ApiError::not_found(
                format!("session {session_id:?} has no responses"),
                "session_id",
            )
        })?;
        Ok(FeedbackTarget {
            response_id: entry.responses[last].0.clone(),
            turn: main_turn_of(last),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::fields::{SESSION_DONE_HEADER, SESSION_HEADER};
    use serde_json::json;

    fn body(v: Json) -> Map<String, Json> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn headers_win_and_body_fields_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(SESSION_HEADER, "h1".parse().unwrap());
        headers.insert(SESSION_DONE_HEADER, "yes".parse().unwrap());
        let mut b = body(json!({"session_id": "b1", "turn_type": "side", "messages": []}));
        let info = extract(&headers, &mut b, TurnType::Main).unwrap();
        assert_eq!(info.session_id, "h1");
        assert_eq!(info.turn_type, TurnType::Side);
        assert!(info.done);
        assert_eq!(b.keys().collect::<Vec<_>>(), ["messages"]);
    }

    #[test]
    fn defaults_and_errors() {
        let headers = HeaderMap::new();
        let info = extract(&headers, &mut Map::new(), TurnType::Main).unwrap();
        assert!(info.session_id.starts_with("sess-"));
        assert_eq!(info.turn_type, TurnType::Main);
        assert!(!info.done);
        let info = extract(&headers, &mut Map::new(), TurnType::Side).unwrap();
        assert_eq!(info.turn_type, TurnType::Side);
        let err = extract(
            &headers,
            &mut body(json!({"turn_type": "feedback"})),
            TurnType::Main,
        )
        .unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert!(extract(
            &headers,
            &mut body(json!({"session_id": 3})),
            TurnType::Main
        )
        .is_err());
    }

    #[test]
    fn feedback_resolution() {
        let reg = Registry::new(Duration::from_secs(60));
        let main = |done| SessionInfo {
            session_id: "s".into(),
            turn_type: TurnType::Main,
            done,
        };
        let side = SessionInfo {
            session_id: "s".into(),
            turn_type: TurnType::Side,
            done: false,
        };
        reg.add_response(&main(false), "r1");
        reg.add_response(&side, "r2");
        reg.add_response(&main(false), "r3");
        let latest = reg.resolve_feedback("s", None, None).unwrap();
        assert_eq!(
            latest,
            FeedbackTarget {
                response_id: "r3".into(),
                turn: Some(2)
            }
        );
        let by_turn = reg.resolve_feedback("s", None, Some(1)).unwrap();
        assert_eq!(by_turn.response_id, "r1");
        let by_id = reg.resolve_feedback("s", Some("r2"), None).unwrap();
        assert_eq!(by_id.turn, None);
        assert_eq!(
            reg.resolve_feedback("x", None, None)
                .unwrap_err()
                .status
                .as_u16(),
            404
        );
        assert_eq!(
            reg.resolve_feedback("s", Some("nope"), None)
                .unwrap_err()
                .status
                .as_u16(),
            404
        );
        assert_eq!(
            reg.resolve_feedback("s", None, Some(3))
                .unwrap_err()
                .status
                .as_u16(),
            404
        );
        assert_eq!(
            reg.resolve_feedback("s", Some("r3"), Some(1))
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
    }

    /// Issue 21: idle sessions were forgotten only when a chat request came.
    /// `prune` (which `claw serve` runs every `prune_every`) forgets them with no
    /// request at all, and keeps the live ones.
    #[test]
    fn prune_forgets_idle_sessions_without_a_request() {
        let reg = Registry::new(Duration::from_millis(200));
        let info = |id: &str| SessionInfo {
            session_id: id.into(),
            turn_type: TurnType::Main,
            done: false,
        };
        reg.add_response(&info("old"), "r1");
        std::thread::sleep(Duration::from_millis(250));
        reg.add_response(&info("new"), "r2");
        reg.prune();
        let mut left: Vec<String> = reg.lock().sessions.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["new"]);
        // the timer runs every quarter of the timeout, kept between 1 s and 60 s
        assert_eq!(reg.prune_every(), Duration::from_secs(1));
        let hour = Registry::new(Duration::from_secs(3600));
        assert_eq!(hour.prune_every(), Duration::from_secs(60));
        let minute = Registry::new(Duration::from_secs(60));
        assert_eq!(minute.prune_every(), Duration::from_secs(15));
    }
}
