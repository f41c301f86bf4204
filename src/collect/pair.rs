//! The pairing rules (docs/ARCHITECTURE.md, "Sessions and next state"), on plain
//! events so they can be tested without files: main turns are numbered within their
//! session, paired with the next state and with explicit feedback, and held until
//! nothing can change them.
//!
//! Time is event time (`created_at`), never the wall clock, so a batch run gives
//! the same answer however long after the events it runs:
//! - the *clock* is the latest event time seen so far (over all sessions);
//! - a turn is *resolved* when the next main request of its session arrives (it
//!   then has its next state) or when its session ends; it is *emitted* once the
//!   clock passes resolution + `feedback_grace`, so feedback sent just after the
//!   next turn (or after the last one) still reaches it;
//! - a session ends with a `session_done` event (its turns are emitted
//!   `feedback_grace` later), or when it has had no event for `session_timeout`
//!   (its turns are emitted then);
//! - feedback attaches to the turn it names (by response id, else by turn number),
//!   else to the session's latest main turn; feedback whose turn was already
//!   emitted, or that names a side turn or an unknown id, is dropped and counted.
//!
//! Because every decision depends only on the events and their order, splitting
//! the events over several runs (carrying the open sessions in between, see
//! [`Pairer::into_open_sessions`]) gives the same samples as one run.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
pub type Ms = i64;

/// Where a turn's full row is held: a batch index and a row in that batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowRef {
    pub batch: u32,
    pub row: u32,
}

/// The state that followed a turn: the user or tool messages that end the next
/// main request (src/collect/raw.rs, `next_state`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextState {
    /// `user` or `tool` (or `feedback`: no next request, but feedback text).
    pub role: String,
    pub text: String,
}

/// What one raw event is.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// A main chat turn. `row` is `None` when the request got no response (the
    /// turn is dropped, but the request still gives the previous turn its next
    /// state). `next_state` is what the request's closing user or tool
    /// messages say.
    Main {
        sample_id: String,
        row: Option<RowRef>,
        next_state: Option<NextState>,
    },
    /// A side request (summaries, titles): dropped, but it is session activity.
    Side,
    /// Explicit feedback about a turn.
    Feedback {
        response_id: Option<String>,
        turn: Option<i32>,
        rating: Option<i8>,
        text: Option<String>,
    },
    /// A row whose turn_type claw does not know: dropped.
    Unknown,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub time: Ms,
    pub session: Arc<str>,
    /// The request ended its session (`X-Session-Done`).
    pub done: bool,
    pub kind: EventKind,
}

/// A finished sample: a main turn with everything collect adds to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    #[serde(with = "arc_str")]
    pub session: Arc<str>,
    pub turn: i32,
    pub row: RowRef,
    pub next_state: Option<NextState>,
    pub feedback: Option<i8>,
    pub feedback_text: Option<String>,
}

impl Sample {
    /// Called when the sample leaves the pairer: a turn with no next request but
    /// with feedback text gets that text as its next state (role `feedback`), so a
    /// judge or hint extractor sees what the user said about it.
    fn finalize(mut self) -> Self {
        if self.next_state.is_none() {
            if let Some(text) = self.feedback_text.as_ref().filter(|t| !t.is_empty()) {
                self.next_state = Some(NextState {
                    role: "feedback".into(),
                    text: text.clone(),
                });
            }
        }
        self
    }
}

/// A main turn waiting to be emitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingTurn {
    pub sample_id: String,
    pub sample: Sample,
    /// When the turn got its next state or its session ended; `None` while the
    /// session may still send the next request.
    pub resolved_at: Option<Ms>,
}

/// One open session, as carried between runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpenSession {
    #[serde(with = "arc_str")]
    pub id: Arc<str>,
    /// Main turns numbered so far (the next one is `turns + 1`).
    pub turns: i32,
    pub last_event: Ms,
    /// Time of the event that ended the session, if one did.
    pub done_at: Option<Ms>,
    /// Turn number of the latest main turn (for feedback that names none).
    pub latest_turn: Option<i32>,
    /// Turns not emitted yet, in turn order; only the last can be unresolved.
    pub pending: VecDeque<PendingTurn>,
}

/// Settings of the pairing rules.
#[derive(Clone, Copy, Debug)]
pub struct PairConfig {
    /// A session with no event for this long has ended.
    pub session_timeout: Ms,
    /// How long a resolved turn still waits for feedback.
    pub feedback_grace: Ms,
}

/// Counts kept by the pairer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairStats {
    pub events: u64,
    pub main_turns: u64,
    pub side_turns: u64,
    pub no_response: u64,
    pub unknown_turn_type: u64,
    pub feedback_events: u64,
    pub feedback_attached: u64,
    pub feedback_unmatched: u64,
    /// Events older than the clock when they were seen (out of order across runs);
    /// they are handled as if they happened at the clock.
    pub late_events: u64,
}

/// The pairing state machine. Feed it events in time order with [`push`](Self::push);
/// emitted samples collect in [`out`](Self::out).
pub struct Pairer {
    cfg: PairConfig,
    clock: Option<Ms>,
    sessions: HashMap<Arc<str>, Session>,
    /// (deadline, session): when a session may next have something to do. Entries
    /// are not removed when a deadline moves; a stale one is skipped when popped.
    deadlines: BinaryHeap<Reverse<(Ms, Arc<str>)>>,
    pub out: Vec<Sample>,
    pub stats: PairStats,
}

struct Session {
    open: OpenSession,
    /// The deadline currently in the heap for this session.
    deadline: Ms,
}

impl Session {
    fn end_at(&self, cfg: &PairConfig) -> Ms {
        match self.open.done_at {
            Some(done) => done.saturating_add(cfg.feedback_grace),
            None => self.open.last_event.saturating_add(cfg.session_timeout),
        }
    }

    fn next_deadline(&self, cfg: &PairConfig) -> Ms {
        let end = self.end_at(cfg);
        match self.open.pending.front().and_then(|p| p.resolved_at) {
            Some(r) => end.min(r.saturating_add(cfg.feedback_grace)),
            None => end,
        }
    }

    /// Resolves the unresolved turn (if any) at `at` with `next_state`.
    fn resolve_last(&mut self, at: Ms, next_state: Option<NextState>) {
        if let Some(p) = self.open.pending.back_mut() {
            if p.resolved_at.is_none() {
                p.resolved_at = Some(at);
                p.sample.next_state = next_state;
            }
        }
    }
}

impl Pairer {
    pub fn new(cfg: PairConfig) -> Self {
        Pairer {
            cfg,
            clock: None,
            sessions: HashMap::new(),
            deadlines: BinaryHeap::new(),
            out: Vec::new(),
            stats: PairStats::default(),
        }
    }

    /// Restores the sessions a previous run left open, and its clock.
    pub fn with_open_sessions(mut self, clock: Option<Ms>, sessions: Vec<OpenSession>) -> Self {
        self.clock = clock;
        for open in sessions {
            let id = open.id.clone();
            let mut s = Session { open, deadline: 0 };
            s.deadline = s.next_deadline(&self.cfg);
            self.deadlines.push(Reverse((s.deadline, id.clone())));
            self.sessions.insert(id, s);
        }
        self
    }

    /// The latest event time seen (also across runs).
    pub fn clock(&self) -> Option<Ms> {
        self.clock
    }

    /// Handles one event. Events must come in time order (ties in file order);
    /// one older than the clock is treated as happening at the clock.
    pub fn push(&mut self, event: Event) {
        self.stats.events += 1;
        let time = match self.clock {
            Some(c) if event.time < c => {
                self.stats.late_events += 1;
                c
            }
            _ => event.time,
        };
        self.advance(time);
        let cfg = self.cfg;
        let is_feedback = matches!(event.kind, EventKind::Feedback { .. });
        if is_feedback && !self.sessions.contains_key(&event.session) {
            // Feedback for a session that has ended (or was never seen).
            self.stats.feedback_events += 1;
            self.stats.feedback_unmatched += 1;
            return;
        }
        let s = self
            .sessions
            .entry(event.session.clone())
            .or_insert_with(|| Session {
                open: OpenSession {
                    id: event.session.clone(),
                    turns: 0,
                    last_event: time,
                    done_at: None,
                    latest_turn: None,
                    pending: VecDeque::new(),
                },
                deadline: Ms::MAX,
            });
        s.open.last_event = s.open.last_event.max(time);
        match event.kind {
            EventKind::Main {
                sample_id,
                row,
                next_state,
            } => {
                // A new main request: the session goes on even if it said it was done.
                s.open.done_at = None;
                s.resolve_last(time, next_state);
                match row {
                    Some(row) => {
                        self.stats.main_turns += 1;
                        s.open.turns += 1;
                        let turn = s.open.turns;
                        s.open.latest_turn = Some(turn);
                        s.open.pending.push_back(PendingTurn {
                            sample_id,
                            sample: Sample {
                                session: s.open.id.clone(),
                                turn,
                                row,
                                next_state: None,
                                feedback: None,
                                feedback_text: None,
                            },
                            resolved_at: None,
                        });
                    }
                    None => self.stats.no_response += 1,
                }
            }
            EventKind::Side => self.stats.side_turns += 1,
            EventKind::Unknown => self.stats.unknown_turn_type += 1,
            EventKind::Feedback {
                response_id,
                turn,
                rating,
                text,
            } => {
                self.stats.feedback_events += 1;
                let target = match (&response_id, turn) {
                    (Some(id), _) => s.open.pending.iter_mut().find(|p| &p.sample_id == id),
                    (None, Some(n)) => s.open.pending.iter_mut().find(|p| p.sample.turn == n),
                    (None, None) => match s.open.latest_turn {
                        Some(n) => s.open.pending.iter_mut().find(|p| p.sample.turn == n),
                        None => None,
                    },
                };
                match target {
                    Some(p) => {
                        self.stats.feedback_attached += 1;
                        if rating.is_some() {
                            // The latest rating wins: the user changed their mind.
                            p.sample.feedback = rating;
                        }
                        if let Some(text) = text.filter(|t| !t.trim().is_empty()) {
                            match &mut p.sample.feedback_text {
                                Some(existing) => {
                                    existing.push('\n');
                                    existing.push_str(&text);
                                }
                                None => p.sample.feedback_text = Some(text),
                            }
                        }
                    }
                    None => self.stats.feedback_unmatched += 1,
                }
            }
        }
        if event.done {
            s.open.done_at = Some(time);
            s.resolve_last(time, None);
        }
        let deadline = s.next_deadline(&cfg);
        if deadline != s.deadline {
            s.deadline = deadline;
            self.deadlines
                .push(Reverse((deadline, event.session.clone())));
        }
        // With no grace, a turn resolved by this event is final right away.
        self.emit_due();
    }

    /// Moves the clock to `time` and emits whatever became due (daemon mode moves
    /// it to the wall clock, so quiet sessions still end).
    pub fn advance(&mut self, time: Ms) {
        if self.clock.is_none_or(|c| c < time) {
            self.clock = Some(time);
        }
        self.emit_due();
    }

    /// Emits every turn whose time has come at the current clock, and ends the
    /// sessions whose end has come.
    fn emit_due(&mut self) {
        let Some(time) = self.clock else {
            return;
        };
        while let Some(Reverse((deadline, _))) = self.deadlines.peek() {
            if *deadline > time {
                break;
            }
            let Some(Reverse((deadline, id))) = self.deadlines.pop() else {
                break;
            };
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            if s.deadline != deadline {
                continue; // stale entry
            }
            let cfg = self.cfg;
            let end = s.end_at(&cfg);
            if time >= end {
                // The session has ended: everything in it is final.
                if let Some(s) = self.sessions.remove(&id) {
                    emit_all(s.open, end, &mut self.out);
                }
                continue;
            }
            while let Some(r) = s.open.pending.front().and_then(|p| p.resolved_at) {
                if r.saturating_add(cfg.feedback_grace) > time {
                    break;
                }
                if let Some(p) = s.open.pending.pop_front() {
                    self.out.push(p.sample.finalize());
                }
            }
            s.deadline = s.next_deadline(&cfg);
            self.deadlines.push(Reverse((s.deadline, id)));
        }
    }

    /// Ends every open session now (`--flush`): their turns are emitted, the last
    /// of each without a next state.
    pub fn flush(&mut self) {
        let clock = self.clock.unwrap_or(0);
        let mut ids: Vec<Arc<str>> = self.sessions.keys().cloned().collect();
        ids.sort();
        for id in ids {
            if let Some(s) = self.sessions.remove(&id) {
                emit_all(s.open, clock, &mut self.out);
            }
        }
        self.deadlines.clear();
    }

    /// Sessions still open, sorted by id: what a state file carries to the next run.
    pub fn into_open_sessions(self) -> (Option<Ms>, Vec<OpenSession>, Vec<Sample>, PairStats) {
        let mut open: Vec<OpenSession> = self.sessions.into_values().map(|s| s.open).collect();
        open.sort_by(|a, b| a.id.cmp(&b.id));
        (self.clock, open, self.out, self.stats)
    }
}

fn emit_all(mut open: OpenSession, at: Ms, out: &mut Vec<Sample>) {
    if let Some(p) = open.pending.back_mut() {
        if p.resolved_at.is_none() {
            p.resolved_at = Some(at);
        }
    }
    out.extend(open.pending.into_iter().map(|p| p.sample.finalize()));
}

/// Serde for `Arc<str>` (serde's `rc` feature is not enabled).
mod arc_str {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        Ok(Arc::from(String::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Ms = 60_000;

    fn cfg() -> PairConfig {
        PairConfig {
            session_timeout: 30 * MIN,
            feedback_grace: 0,
        }
    }

    fn main_turn(t: Ms, session: &str, id: &str, next: Option<(&str, &str)>) -> Event {
        Event {
            time: t,
            session: session.into(),
            done: false,
            kind: EventKind::Main {
                sample_id: id.into(),
                row: Some(RowRef {
                    batch: 0,
                    row: t as u32,
                }),
                next_state: next.map(|(role, text)| NextState {
                    role: role.into(),
                    text: text.into(),
                }),
            },
        }
    }

    fn side(t: Ms, session: &str) -> Event {
        Event {
            time: t,
            session: session.into(),
            done: false,
            kind: EventKind::Side,
        }
    }

    fn feedback(
        t: Ms,
        session: &str,
        id: Option<&str>,
        turn: Option<i32>,
        rating: i8,
        text: Option<&str>,
    ) -> Event {
        Event {
            time: t,
            session: session.into(),
            done: false,
            kind: EventKind::Feedback {
                response_id: id.map(Into::into),
                turn,
                rating: Some(rating),
                text: text.map(Into::into),
            },
        }
    }

    fn done(mut e: Event) -> Event {
        e.done = true;
        e
    }

    fn run(cfg: PairConfig, events: Vec<Event>, flush: bool) -> (Vec<Sample>, PairStats) {
        let mut p = Pairer::new(cfg);
        for e in events {
            p.push(e);
        }
        if flush {
            p.flush();
        }
        let (_, _, mut out, stats) = p.into_open_sessions();
        out.sort_by(|a, b| (&a.session, a.turn).cmp(&(&b.session, b.turn)));
        (out, stats)
    }

    fn ns(s: &Sample) -> Option<(&str, &str)> {
        s.next_state
            .as_ref()
            .map(|n| (n.role.as_str(), n.text.as_str()))
    }

    #[test]
    fn next_state_is_the_next_main_requests_last_message() {
        let (out, stats) = run(
            cfg(),
            vec![
                main_turn(1, "a", "r1", Some(("user", "hi"))),
                side(2, "a"),
                main_turn(3, "a", "r2", Some(("user", "no, shorter"))),
                main_turn(4, "b", "r3", Some(("user", "other session"))),
                main_turn(5, "a", "r4", Some(("tool", "exit 1"))),
                // A request whose last message is the assistant's: no next state.
                main_turn(6, "a", "r5", None),
            ],
            true,
        );
        let a: Vec<_> = out.iter().filter(|s| &*s.session == "a").collect();
        assert_eq!(
            a.iter().map(|s| s.turn).collect::<Vec<_>>(),
            [1, 2, 3, 4],
            "side turns are not numbered"
        );
        assert_eq!(ns(a[0]), Some(("user", "no, shorter")));
        assert_eq!(ns(a[1]), Some(("tool", "exit 1")));
        assert_eq!(ns(a[2]), None);
        assert_eq!(ns(a[3]), None, "the last turn has no next state");
        let b: Vec<_> = out.iter().filter(|s| &*s.session == "b").collect();
        assert_eq!((b[0].turn, ns(b[0])), (1, None));
        assert_eq!(stats.side_turns, 1);
        assert_eq!(stats.main_turns, 5);
    }

    #[test]
    fn a_turn_without_response_is_dropped_but_gives_the_next_state() {
        let mut no_response = main_turn(2, "a", "r2", Some(("user", "hello?")));
        if let EventKind::Main { row, .. } = &mut no_response.kind {
            *row = None;
        }
        let (out, stats) = run(
            cfg(),
            vec![
                main_turn(1, "a", "r1", Some(("user", "hi"))),
                no_response,
                main_turn(3, "a", "r3", Some(("user", "again"))),
            ],
            true,
        );
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].turn, ns(&out[0])), (1, Some(("user", "hello?"))));
        assert_eq!(out[1].turn, 2, "numbering has no gap");
        assert_eq!(stats.no_response, 1);
    }

    #[test]
    fn feedback_attaches_by_id_by_turn_or_to_the_latest_turn() {
        let grace = PairConfig {
            feedback_grace: 10,
            ..cfg()
        };
        let (out, stats) = run(
            grace,
            vec![
                main_turn(100, "a", "r1", Some(("user", "q1"))),
                feedback(101, "a", None, None, -1, Some("too long")),
                main_turn(102, "a", "r2", Some(("user", "q2"))),
                // Names turn 1 after turn 2 arrived, within the grace: attaches.
                feedback(105, "a", Some("r1"), None, 1, Some("actually fine")),
                feedback(106, "a", None, Some(2), 1, None),
                // Names a side turn's id: dropped.
                feedback(107, "a", Some("side-id"), None, 1, None),
                // Unknown session: dropped.
                feedback(108, "zzz", None, None, 1, None),
            ],
            true,
        );
        assert_eq!(out[0].feedback, Some(1), "latest rating wins");
        assert_eq!(
            out[0].feedback_text.as_deref(),
            Some("too long\nactually fine")
        );
        assert_eq!(out[1].feedback, Some(1));
        assert_eq!(stats.feedback_events, 5);
        assert_eq!(stats.feedback_attached, 3);
        assert_eq!(stats.feedback_unmatched, 2);
    }

    #[test]
    fn feedback_after_the_turn_is_final_is_dropped() {
        // Grace 0: a turn is final when the next turn arrives.
        let (out, stats) = run(
            cfg(),
            vec![
                main_turn(1, "a", "r1", Some(("user", "q1"))),
                main_turn(2, "a", "r2", Some(("user", "q2"))),
                feedback(3, "a", Some("r1"), None, -1, None),
            ],
            true,
        );
        assert_eq!(out[0].feedback, None);
        assert_eq!(stats.feedback_unmatched, 1);
    }

    #[test]
    fn the_last_turn_waits_for_the_session_to_end() {
        let mut p = Pairer::new(cfg());
        p.push(main_turn(0, "a", "r1", Some(("user", "q1"))));
        p.push(main_turn(MIN, "a", "r2", Some(("user", "q2"))));
        assert_eq!(p.out.len(), 1, "turn 1 has its next state and is emitted");
        // Activity elsewhere, before the timeout: turn 2 is still held.
        p.push(main_turn(20 * MIN, "b", "r3", Some(("user", "x"))));
        assert_eq!(p.out.len(), 1);
        // 30 minutes after a's last event: a has ended.
        p.push(main_turn(31 * MIN, "b", "r4", Some(("user", "y"))));
        assert_eq!(p.out.len(), 3, "{:?}", p.out);
        let last = p.out.iter().find(|s| &*s.session == "a" && s.turn == 2);
        assert_eq!(last.map(|s| s.next_state.clone()), Some(None));
        // A new request in a after it timed out starts over at turn 1.
        p.push(main_turn(32 * MIN, "a", "r5", Some(("user", "back"))));
        p.flush();
        let again = p.out.iter().rfind(|s| &*s.session == "a").unwrap();
        assert_eq!((again.turn, again.row.row), (1, (32 * MIN) as u32));
    }

    #[test]
    fn session_done_ends_the_session_and_feedback_can_follow_within_the_grace() {
        let grace = PairConfig {
            feedback_grace: 1000,
            ..cfg()
        };
        let mut p = Pairer::new(grace);
        p.push(main_turn(0, "a", "r1", Some(("user", "q1"))));
        p.push(done(main_turn(10, "a", "r2", Some(("user", "bye")))));
        p.push(feedback(500, "a", None, None, -1, Some("don't use bold")));
        assert!(p.out.is_empty(), "both turns wait out the grace");
        p.push(main_turn(2000, "b", "r3", Some(("user", "x"))));
        assert_eq!(p.out.len(), 2, "session a ended at done + grace");
        let last = &p.out[1];
        assert_eq!(last.turn, 2);
        assert_eq!(last.feedback, Some(-1));
        assert_eq!(
            last.next_state,
            Some(NextState {
                role: "feedback".into(),
                text: "don't use bold".into()
            }),
            "feedback text stands in for the missing next state"
        );
        let (_, open, _, _) = p.into_open_sessions();
        assert_eq!(open.len(), 1, "only b is open");
    }

    #[test]
    fn a_side_turn_can_end_the_session() {
        let mut p = Pairer::new(cfg());
        p.push(main_turn(0, "a", "r1", Some(("user", "q1"))));
        p.push(done(side(5, "a")));
        p.push(side(6, "b"));
        assert_eq!(p.out.len(), 1);
        assert_eq!(p.out[0].next_state, None);
    }

    #[test]
    fn feedback_can_end_the_session_and_rate_its_last_turn() {
        // "Thumbs up, and I'm done": the turn is final at once (grace 0), with the
        // rating, and not after the 30-minute timeout.
        let mut p = Pairer::new(cfg());
        p.push(main_turn(0, "a", "r1", Some(("user", "q1"))));
        p.push(done(feedback(5, "a", Some("r1"), None, 1, None)));
        assert_eq!(p.out.len(), 1);
        assert_eq!(p.out[0].feedback, Some(1));
        assert_eq!(p.out[0].next_state, None);
    }

    /// The events of three "segments": sessions spanning segment boundaries,
    /// feedback, a side turn, a timeout and a done flag.
    fn three_segments() -> Vec<Vec<Event>> {
        vec![
            vec![
                main_turn(0, "a", "a1", Some(("user", "a q1"))),
                main_turn(MIN, "b", "b1", Some(("user", "b q1"))),
                main_turn(2 * MIN, "a", "a2", Some(("user", "a q2"))),
            ],
            vec![
                side(3 * MIN, "a"),
                feedback(4 * MIN, "a", None, None, 1, Some("good")),
                main_turn(5 * MIN, "c", "c1", Some(("user", "c q1"))),
            ],
            vec![
                main_turn(
                    6 * MIN,
                    "a",
                    "a3",
                    Some(("user", "a q3 (next state of a2)")),
                ),
                done(main_turn(7 * MIN, "c", "c2", Some(("tool", "c result")))),
                main_turn(40 * MIN, "d", "d1", Some(("user", "d q1"))),
                main_turn(41 * MIN, "d", "d2", Some(("user", "d q2"))),
            ],
        ]
    }

    #[test]
    fn carrying_open_sessions_across_runs_loses_and_duplicates_nothing() {
        let cfg = PairConfig {
            session_timeout: 30 * MIN,
            feedback_grace: 30_000,
        };
        let segs = three_segments();
        let (single, _) = run(cfg, segs.concat(), true);

        // Run 1 over seg1+seg2 without flush, run 2 over seg3 with flush.
        let mut p1 = Pairer::new(cfg);
        for e in segs[0].iter().chain(&segs[1]) {
            p1.push(e.clone());
        }
        let (clock, open, out1, _) = p1.into_open_sessions();
        assert!(!open.is_empty());
        // The carried state survives a JSON round trip (that is what the state file holds).
        let open: Vec<OpenSession> =
            serde_json::from_str(&serde_json::to_string(&open).unwrap()).unwrap();
        let mut p2 = Pairer::new(cfg).with_open_sessions(clock, open);
        for e in segs[2].iter() {
            p2.push(e.clone());
        }
        p2.flush();
        let (_, _, out2, _) = p2.into_open_sessions();
        let mut union: Vec<Sample> = out1.into_iter().chain(out2).collect();
        union.sort_by(|a, b| (&a.session, a.turn).cmp(&(&b.session, b.turn)));
        assert_eq!(union, single);

        let a2 = single.iter().find(|s| &*s.session == "a" && s.turn == 2);
        assert_eq!(
            a2.and_then(ns),
            Some(("user", "a q3 (next state of a2)")),
            "a2 got its next state from the third segment"
        );
        assert_eq!(a2.and_then(|s| s.feedback), Some(1));
        let keys: Vec<(&str, i32)> = single.iter().map(|s| (&*s.session, s.turn)).collect();
        assert_eq!(
            keys,
            [
                ("a", 1),
                ("a", 2),
                ("a", 3),
                ("b", 1),
                ("c", 1),
                ("c", 2),
                ("d", 1),
                ("d", 2)
            ]
        );
    }
}
