//! The judge stage on in-memory batches, with a scripted LLM judge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use super::*;
use crate::llm::{CallError, CallOptions, ChatBackend, ChatRequest, Reply, VoteRunner};
use crate::rollout::{rows_from_batch, rows_to_batch, RolloutRow, COLUMNS};

/// Replies from a script found in the judge prompt: a next state containing
/// `script:a|b|c` gets `a`, then `b`, then `c` on successive calls (`!fail` is a
/// failed call); anything else gets `\boxed{1}`.
#[derive(Default)]
struct Scripted {
    seen: Mutex<HashMap<String, usize>>,
    prompts: Mutex<Vec<String>>,
}

impl ChatBackend for Scripted {
    fn name(&self) -> &str {
        "stub-judge"
    }
    fn max_concurrency(&self) -> usize {
        1
    }
    fn retries_help(&self) -> bool {
        false
    }
    fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError> {
        let user = req.messages.last().unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string();
        self.prompts.lock().unwrap().push(user.clone());
        let Some(at) = user.find("script:") else {
            return Ok(reply("fine \\boxed{1}"));
        };
        let script: Vec<&str> = user[at + 7..].lines().next().unwrap().split('|').collect();
        let mut seen = self.seen.lock().unwrap();
        let n = seen.entry(user.clone()).or_default();
        let step = script[*n % script.len()];
        *n += 1;
        match step {
            "!fail" => Err(CallError::Failed("scripted failure".into())),
            s => Ok(reply(s)),
        }
    }
}

fn reply(text: &str) -> Reply {
    Reply {
        text: text.into(),
        completion_tokens: Some(4),
    }
}

fn prm_factory(backend: Arc<Scripted>) -> PrmFactory {
    struct Shared(Arc<Scripted>);
    impl ChatBackend for Shared {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn max_concurrency(&self) -> usize {
            1
        }
        fn retries_help(&self) -> bool {
            false
        }
        fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError> {
            self.0.complete(req)
        }
    }
    Box::new(move || {
        let runner = VoteRunner::new(
            Box::new(Shared(backend)),
            CallOptions {
                votes: 3,
                timeout: Duration::from_secs(5),
                ..Default::default()
            },
        )?;
        let prompt = PromptTemplate::parse(DEFAULT_PRM_PROMPT, "default", &PRM_VARS)?;
        Ok(PrmJudge::new(runner, prompt))
    })
}

fn judge(sources: &[Source], rejudge: bool) -> (Judge, Arc<Scripted>) {
    let backend = Arc::new(Scripted::default());
    let prm = sources
        .contains(&Source::Prm)
        .then(|| prm_factory(backend.clone()));
    let j = Judge::new(
        JudgeConfig {
            sources: sources.to_vec(),
            rejudge,
        },
        prm,
    )
    .unwrap();
    (j, backend)
}

fn row(id: &str) -> RolloutRow {
    RolloutRow {
        sample_id: id.into(),
        session_id: "s".into(),
        turn: Some(1),
        turn_type: "main".into(),
        model: "m".into(),
        messages_json: "[]".into(),
        response_text: format!("response of {id}"),
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        ..Default::default()
    }
}

fn next(mut r: RolloutRow, role: &str, text: &str) -> RolloutRow {
    r.next_state_role = Some(role.into());
    r.next_state_text = Some(text.into());
    r
}

fn batch_of(batch: RecordBatch) -> RolloutBatch {
    RolloutBatch {
        source: "in.parquet".into(),
        first_row: 0,
        batch,
    }
}

fn run(j: &mut Judge, rows: &[RolloutRow]) -> Vec<RolloutRow> {
    let out = j
        .judge_batch(&batch_of(rows_to_batch(rows).unwrap()), &|| {})
        .unwrap();
    rows_from_batch(&out).unwrap()
}

fn by_id<'a>(rows: &'a [RolloutRow], id: &str) -> &'a RolloutRow {
    rows.iter().find(|r| r.sample_id == id).unwrap()
}

#[test]
fn sources_apply_in_priority_order() {
    let mut thumbs_and_error = next(
        row("both"),
        "tool",
        "Traceback (most recent call last):\nboom",
    );
    thumbs_and_error.feedback = Some(1);
    let rows = vec![
        thumbs_and_error,
        next(row("tool-error"), "tool", "bash: foo: command not found"),
        next(row("tool-ok"), "tool", "3 files"),
        next(row("user"), "user", "thanks!"),
        row("last-turn"),
        {
            let mut r = row("thumbs-down-last");
            r.feedback = Some(-1);
            r
        },
    ];
    let (mut j, backend) = judge(&[Source::Feedback, Source::Env, Source::Prm], false);
    let out = run(&mut j, &rows);
    assert_eq!(out.len(), 6);

    let r = by_id(&out, "both");
    assert_eq!(
        (r.reward, r.judge_source.as_deref()),
        (Some(1.0), Some("feedback"))
    );
    assert_eq!(
        (&r.judge_votes, r.judge_invalid, &r.judge_raw),
        (&None, None, &None)
    );

    let r = by_id(&out, "tool-error");
    assert_eq!(
        (r.reward, r.judge_source.as_deref()),
        (Some(-1.0), Some("env"))
    );
    assert_eq!(
        r.judge_raw.as_deref(),
        Some("env rule os-error: bash: foo: command not found")
    );

    for id in ["tool-ok", "user"] {
        let r = by_id(&out, id);
        assert_eq!(r.reward, Some(1.0), "{id}");
        assert_eq!(r.judge_source.as_deref(), Some("prm:stub-judge"));
        assert_eq!(r.judge_votes, Some(vec![1, 1, 1]));
        assert_eq!(r.judge_invalid, Some(0));
        assert_eq!(r.judge_raw.as_deref(), Some("fine \\boxed{1}"));
    }

    // no next state, no feedback: no reward at all (null, not 0)
    let r = by_id(&out, "last-turn");
    assert_eq!(
        (r.reward, &r.judge_source, &r.judge_votes),
        (None, &None, &None)
    );
    assert_eq!(by_id(&out, "thumbs-down-last").reward, Some(-1.0));

    // only the two rows that reached the PRM were sent, 3 votes each
    let prompts = backend.prompts.lock().unwrap();
    assert_eq!(prompts.len(), 6);
    assert!(prompts[0].contains("## Assistant output\nresponse of tool-ok"));
    assert!(prompts[0].contains("## Next state [role: tool]\n3 files"));

    let s = j.summary();
    assert_eq!((s.rows, s.judged, s.no_reward), (6, 5, 1));
    assert_eq!(s.by_source["feedback"].total(), 2);
    assert_eq!(s.by_source["env"].minus, 1);
    assert_eq!(s.by_source["prm:stub-judge"].plus, 2);
    assert_eq!((s.votes, s.invalid_votes), (6, 0));
    assert_eq!(s.mean_reward, Some(1.0 / 5.0)); // +1 -1 +1 +1 -1
    assert_eq!(s.judge_tokens, 24);
}

#[test]
fn source_order_is_configurable() {
    let mut r = next(row("a"), "tool", "Error: disk full");
    r.feedback = Some(1);
    // env before feedback
    let (mut j, _) = judge(&[Source::Env, Source::Feedback], false);
    assert_eq!(
        run(&mut j, &[r.clone()])[0].judge_source.as_deref(),
        Some("env")
    );
    // without the prm source, a clean tool result gets no reward
    let (mut j, _) = judge(&[Source::Feedback, Source::Env], false);
    let out = run(&mut j, &[next(row("b"), "tool", "done")]);
    assert_eq!(out[0].reward, None);
    // a bad source list is an error
    assert!(Judge::new(
        JudgeConfig {
            sources: vec![],
            rejudge: false
        },
        None
    )
    .is_err());
    assert!(Judge::new(
        JudgeConfig {
            sources: vec![Source::Env, Source::Env],
            rejudge: false
        },
        None
    )
    .is_err());
}

#[test]
fn votes_majority_invalid_and_ties() {
    let rows = vec![
        next(
            row("maj"),
            "user",
            "script:\\boxed{-1}|no box here|\\boxed{-1}",
        ),
        next(row("tie"), "user", "script:\\boxed{1}|\\boxed{-1}|!fail"),
        next(row("all-bad"), "user", "script:garbage|!fail|\\boxed{7}"),
        next(
            row("plus"),
            "user",
            "script:\\boxed{+1}|\\boxed{0} then \\boxed{1}|\\boxed{0}",
        ),
    ];
    let (mut j, _) = judge(&[Source::Prm], false);
    let out = run(&mut j, &rows);
    let r = by_id(&out, "maj");
    assert_eq!(r.reward, Some(-1.0));
    assert_eq!(r.judge_votes, Some(vec![-1, -1]));
    assert_eq!(r.judge_invalid, Some(1));
    assert_eq!(r.judge_raw.as_deref(), Some("\\boxed{-1}"));

    let r = by_id(&out, "tie");
    assert_eq!((r.reward, r.judge_invalid), (Some(0.0), Some(1)));
    assert_eq!(r.judge_votes, Some(vec![1, -1]));
    assert_eq!(r.judge_raw, None, "no reply agrees with a tie's 0");

    let r = by_id(&out, "all-bad");
    assert_eq!((r.reward, r.judge_invalid), (Some(0.0), Some(3)));
    assert_eq!(r.judge_votes, Some(vec![]));
    assert_eq!(r.judge_source.as_deref(), Some("prm:stub-judge"));

    let r = by_id(&out, "plus");
    assert_eq!(r.reward, Some(1.0));
    assert_eq!(r.judge_votes, Some(vec![1, 1, 0]));

    let s = j.summary();
    assert_eq!((s.votes, s.invalid_votes, s.failed_calls), (12, 5, 2));
    assert!((s.invalid_rate.unwrap() - 5.0 / 12.0).abs() < 1e-12);
}

#[test]
fn judged_rows_pass_through_unless_rejudged() {
    let mut done = next(row("done"), "user", "thanks");
    done.reward = Some(-1.0);
    done.judge_source = Some("prm:other".into());
    done.judge_votes = Some(vec![-1, -1, 1]);
    done.judge_invalid = Some(0);
    done.judge_raw = Some("old".into());
    let mut stale = row("stale"); // judged before, no signal now
    stale.reward = Some(1.0);
    stale.judge_source = Some("feedback".into());
    let mut side = next(row("side"), "user", "x");
    side.turn_type = "side".into();
    let mut fb_event = row("fb-1");
    fb_event.turn_type = "feedback".into();
    fb_event.feedback = Some(-1);
    let rows = vec![done.clone(), stale.clone(), side.clone(), fb_event.clone()];

    let (mut j, backend) = judge(&[Source::Feedback, Source::Env, Source::Prm], false);
    let out = run(&mut j, &rows);
    assert_eq!(
        out, rows,
        "judged rows and non-main rows are kept as they are"
    );
    assert!(backend.prompts.lock().unwrap().is_empty());
    let s = j.summary();
    assert_eq!((s.already_judged, s.not_main, s.judged), (2, 2, 0));

    let (mut j, _) = judge(&[Source::Feedback, Source::Env, Source::Prm], true);
    let out = run(&mut j, &rows);
    let r = by_id(&out, "done");
    assert_eq!(r.reward, Some(1.0));
    assert_eq!(r.judge_source.as_deref(), Some("prm:stub-judge"));
    let r = by_id(&out, "stale");
    assert_eq!(
        (r.reward, &r.judge_source),
        (None, &None),
        "old verdict cleared"
    );
    assert_eq!(by_id(&out, "side"), &side);
    assert_eq!(by_id(&out, "fb-1"), &fb_event);
}

#[test]
fn other_columns_are_untouched_and_judge_columns_are_added_in_place() {
    // A batch with only the required columns, in an unusual order, plus an extra.
    let full = rows_to_batch(&[
        {
            let mut r = next(row("a"), "tool", "exit code: 2");
            r.feedback = None;
            r
        },
        row("b"),
    ])
    .unwrap();
    let mut fields = Vec::new();
    let mut cols = Vec::new();
    for c in COLUMNS
        .iter()
        .filter(|c| c.required || c.name.starts_with("next_state"))
    {
        let i = full.schema().index_of(c.name).unwrap();
        fields.push(full.schema().field(i).clone());
        cols.push(full.column(i).clone());
    }
    fields.push(Field::new("my_extra", DataType::Utf8, true));
    cols.push(Arc::new(StringArray::from(vec![Some("x"), None])));
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(
            fields,
            HashMap::from([("owner".to_string(), "me".to_string())]),
        )),
        cols,
    )
    .unwrap();

    let (mut j, _) = judge(&[Source::Env], false);
    let out = j.judge_batch(&batch_of(batch.clone()), &|| {}).unwrap();
    let names: Vec<String> = out
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert_eq!(
        names.last().map(String::as_str),
        Some("my_extra"),
        "{names:?}"
    );
    assert!(pos("next_state_text") < pos("reward"));
    assert!(pos("reward") < pos("judge_votes") && pos("judge_source") < pos("judge_raw"));
    assert_eq!(out.schema().metadata()["owner"], "me");
    for name in batch.schema().fields().iter().map(|f| f.name()) {
        assert_eq!(
            out.column_by_name(name).unwrap().to_data(),
            batch.column_by_name(name).unwrap().to_data(),
            "{name} changed"
        );
    }
    let reward = out
        .column_by_name("reward")
        .unwrap()
        .as_primitive::<Float32Type>();
    assert_eq!((reward.value(0), reward.is_null(1)), (-1.0, true));
    assert_eq!(
        out.column_by_name("judge_source").unwrap().data_type(),
        &DataType::Utf8
    );
}

#[test]
fn batches_from_inputs_with_other_column_orders_are_aligned() {
    let (mut j, _) = judge(&[Source::Feedback], false);
    let a = rows_to_batch(&[row("a")]).unwrap();
    let first = j.judge_batch(&batch_of(a.clone()), &|| {}).unwrap();
    // same columns, reversed order
    let rev: Vec<usize> = (0..a.num_columns()).rev().collect();
    let b = a.project(&rev).unwrap();
    let second = j.judge_batch(&batch_of(b), &|| {}).unwrap();
    assert_eq!(first.schema().fields(), second.schema().fields());
}

#[test]
fn a_bad_feedback_value_names_the_file_row_and_column() {
    let mut r = row("a");
    r.feedback = Some(5);
    let (mut j, _) = judge(&[Source::Feedback], false);
    let batch = RolloutBatch {
        source: "in.parquet".into(),
        first_row: 10,
        batch: rows_to_batch(&[row("ok"), r]).unwrap(),
    };
    let err = format!("{:#}", j.judge_batch(&batch, &|| {}).unwrap_err());
    assert!(
        err.contains("in.parquet: row 12") && err.contains("`feedback`") && err.contains('5'),
        "{err}"
    );
}

#[test]
fn a_judge_that_cannot_be_set_up_is_only_needed_when_a_row_reaches_it() {
    let failing: PrmFactory = Box::new(|| anyhow::bail!("no model here"));
    let mut j = Judge::new(
        JudgeConfig {
            sources: vec![Source::Feedback, Source::Prm],
            rejudge: false,
        },
        Some(failing),
    )
    .unwrap();
    let mut fb = next(row("a"), "user", "ok");
    fb.feedback = Some(1);
    assert_eq!(run(&mut j, &[fb])[0].reward, Some(1.0));
    let err = j
        .judge_batch(
            &batch_of(rows_to_batch(&[next(row("b"), "user", "ok")]).unwrap()),
            &|| {},
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("no model here"), "{err:#}");
}

#[test]
fn long_fields_are_clipped_for_the_judge() {
    let (mut j, backend) = judge(&[Source::Prm], false);
    let long = format!("START{}END", "x".repeat(3 * MAX_FIELD_CHARS));
    run(&mut j, &[next(row("a"), "tool", &long)]);
    let prompts = backend.prompts.lock().unwrap();
    assert!(prompts[0].len() < 2 * MAX_FIELD_CHARS);
    assert!(prompts[0].contains("START") && prompts[0].contains("END"));
    assert!(prompts[0].contains("characters cut"));
}

#[test]
fn the_default_prompt_parses() {
    const VARS: [&str; 3] = ["response", "next_state_role", "next_state_text"];
    let p = PromptTemplate::parse(DEFAULT_PRM_PROMPT, "default", &VARS).unwrap();
    let msgs = p.render(&[
        ("response", "Here you go."),
        ("next_state_role", "user"),
        ("next_state_text", "no, do it again"),
    ]);
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "system");
    assert_eq!(msgs[1]["role"], "user");
    let system = msgs[0]["content"].as_str().unwrap();
    let user = msgs[1]["content"].as_str().unwrap();
    assert!(!system.contains("claw judge"), "comments are not sent");
    assert!(system.contains("\\boxed{1}") && system.contains("\\boxed{-1}"));
    assert!(user.contains("## Assistant output\nHere you go."));
    assert!(user.contains("## Next state [role: user]\nno, do it again"));
    assert!(user.trim_end().ends_with("\\boxed{0}."));
}
