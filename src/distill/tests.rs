//! The distill-hints stage on the tiny model with a scripted hint judge.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch};

use serde_json::json;

use super::hints::Select;
use super::*;
use crate::llm::{CallError, CallOptions, ChatBackend, ChatRequest, Reply};
use crate::model::testing::{write_tiny_gguf, TinySpec};
use crate::model::{Model, WeightFormat};
use crate::train::checkpoint::CheckpointDir;

fn tiny_model() -> Arc<Model> {
    tiny_model_as(WeightFormat::F32)
}

fn tiny_model_as(weights: WeightFormat) -> Arc<Model> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &TinySpec::default()).unwrap();
    Arc::new(Model::load_with(&path, weights).unwrap())
}

/// A random rank-2 adapter on `model`, saved as policy version `version`.
fn saved_adapter(model: &Model, version: u64) -> (Adapter, tempfile::TempDir) {
    let adapter = Adapter::random_for_tests(&model.decoder.to_hf_layout().unwrap(), 1);
    let dir = tempfile::tempdir().unwrap();
    CheckpointDir::create(dir.path())
        .unwrap()
        .save(&adapter, "tiny", version, None, None)
        .unwrap();
    (adapter, dir)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Answers by looking for a keyword of the response in the prompt.
struct ScriptedJudge;

impl ChatBackend for ScriptedJudge {
    fn name(&self) -> &str {
        "scripted"
    }
    fn max_concurrency(&self) -> usize {
        1
    }
    fn retries_help(&self) -> bool {
        false
    }
    fn complete(&self, req: &ChatRequest) -> Result<Reply, CallError> {
        let prompt = req.messages.last().unwrap()["content"].as_str().unwrap();
        let text = if prompt.contains("GOOD-HINT") {
            "The user wanted metric units.\n\\boxed{1}\n[HINT_START]Give distances in kilometres, not miles.[HINT_END]"
        } else if prompt.contains("SHORT-HINT") {
            "\\boxed{1} [HINT_START]km[HINT_END]"
        } else if prompt.contains("NO-HINT") {
            "Nothing to learn here. \\boxed{-1}"
        } else {
            "I am not sure."
        };
        Ok(Reply {
            text: text.into(),
            completion_tokens: Some(10),
        })
    }
}

fn row(id: &str, next_state: Option<&str>, feedback_text: Option<&str>) -> RolloutRow {
    RolloutRow {
        sample_id: id.into(),
        session_id: "s".into(),
        turn: Some(1),
        turn_type: "main".into(),
        model: "tiny".into(),
        messages_json: json!([{"role": "user", "content": "how far is it?"}]).to_string(),
        prompt_text: String::new(),
        response_text: format!("It is 3 miles. {id}"),
        prompt_ids: vec![1, 104, 105],
        response_ids: vec![110, 111, 112, 2],
        response_logprobs: vec![-1.0; 4],
        token_source: "engine".into(),
        finish_reason: "stop".into(),
        next_state_role: next_state.map(|_| "user".into()),
        next_state_text: next_state.map(str::to_string),
        feedback_text: feedback_text.map(str::to_string),
        ..Default::default()
    }
}

fn config(source: HintSource) -> DistillConfig {
    DistillConfig {
        source,
        select: Select::Longest,
        placement: HintPlacement::End,
        topk: 0,
        redo: false,
        teacher: TeacherWeights::Policy,
        checkpoints: None,
        max_tokens: 4096,
        max_judge_chars: 4000,
    }
}

fn judge() -> HintJudge {
    HintJudge {
        runner: VoteRunner::new(
            Box::new(ScriptedJudge),
            CallOptions {
                votes: 2,
                ..Default::default()
            },
        )
        .unwrap(),
        prompt: PromptTemplate::parse(DEFAULT_HINT_PROMPT, "default", &HINT_PROMPT_VARS).unwrap(),
    }
}

/// The rows as a batch with one extra, unknown column that must pass through.
fn batch_of(rows: &[RolloutRow]) -> RecordBatch {
    let batch = rows_to_batch(rows).unwrap();
    let extra: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows.len() as i64));
    let mut fields: Vec<_> = batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(arrow::datatypes::Field::new(
        "my_column",
        arrow::datatypes::DataType::Int64,
        false,
    )));
    let mut columns = batch.columns().to_vec();
    columns.push(extra);
    RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns).unwrap()
}

fn expected_teacher(model: &Model, decoder: &Decoder, row: &RolloutRow, hint: &str) -> Vec<f32> {
    let messages: Vec<Json> = serde_json::from_str(&row.messages_json).unwrap();
    let messages = teacher_messages(&messages, hint, HintPlacement::End).unwrap();
    let text = model.template.render(&messages, None, true).unwrap();
    assert!(text.contains("[user's hint / instruction]\nGive") || text.contains(hint));
    let prompt = model.tokenizer.encode(&text).unwrap();
    let response: Vec<u32> = row.response_ids.iter().map(|&i| i as u32).collect();
    score::score(
        decoder,
        &[Sequence {
            prompt: &prompt,
            response: &response,
        }],
        4096,
    )
    .unwrap()
    .remove(0)
}

#[test]
fn judge_hints_become_teacher_logprobs_and_the_rest_passes_through() {
    let model = tiny_model();
    let rows = vec![
        row("GOOD-HINT", Some("No, in kilometres please."), None),
        row("NO-HINT", Some("Thanks!"), None),
        row("SHORT-HINT", Some("km"), None),
        row("GARBAGE", Some("hm"), None),
        row("LAST", None, None),
    ];
    let input = batch_of(&rows);
    let mut distiller =
        Distiller::new(config(HintSource::Judge), model.clone(), Some(judge())).unwrap();
    let out = distiller.process(&input, "test").unwrap();
    assert_eq!(
        out.column_by_name("my_column").unwrap(),
        input.column_by_name("my_column").unwrap()
    );
    let got = rows_from_batch(&out).unwrap();
    let hint = "Give distances in kilometres, not miles.";
    assert_eq!(got[0].hint.as_deref(), Some(hint));
    let candidates: Json =
        serde_json::from_str(got[0].hint_candidates_json.as_ref().unwrap()).unwrap();
    assert_eq!(candidates.as_array().unwrap().len(), 2, "both votes kept");
    let teacher = got[0].teacher_logprobs.as_ref().unwrap();
    assert_eq!(teacher.len(), rows[0].response_ids.len());
    let expected = expected_teacher(&model, &model.decoder, &rows[0], hint);
    assert_eq!(teacher, &expected);
    for (i, r) in got.iter().enumerate().skip(1) {
        assert_eq!(r, &rows[i], "row {i} must pass through untouched");
    }
    let s = &distiller.stats;
    assert_eq!(
        (
            s.accepted_from_judge,
            s.rejected_negative,
            s.rejected_short,
            s.rejected_invalid,
            s.no_hint_source
        ),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(s.judged, 4);
    assert_eq!(s.calls.calls, 8, "2 votes for each of 4 rows");

    // A second pass leaves distilled rows alone unless --redo.
    let mut again =
        Distiller::new(config(HintSource::Judge), model.clone(), Some(judge())).unwrap();
    let twice = again.process(&out, "test").unwrap();
    assert_eq!(again.stats.already_distilled, 1);
    assert_eq!(rows_from_batch(&twice).unwrap(), got);
}

#[test]
fn feedback_hints_need_no_judge_and_top_k_is_sorted() {
    let model = tiny_model();
    let mut judged_negative = row("neg", Some("That is wrong, use kilometres."), None);
    judged_negative.reward = Some(-1.0);
    let rows = vec![
        row("fb", None, Some("Always answer in kilometres.")),
        judged_negative,
        row("plain", Some("thanks, that helps"), None),
    ];
    let mut cfg = config(HintSource::Feedback);
    cfg.topk = 3;
    let mut distiller = Distiller::new(cfg, model.clone(), None).unwrap();
    let got = rows_from_batch(&distiller.process(&batch_of(&rows), "test").unwrap()).unwrap();
    assert_eq!(got[0].hint.as_deref(), Some("Always answer in kilometres."));
    assert_eq!(
        got[1].hint.as_deref(),
        Some("That is wrong, use kilometres.")
    );
    assert_eq!(got[2], rows[2]);
    assert_eq!(distiller.stats.accepted_from_feedback, 2);
    let ids = got[0].teacher_topk_ids.as_ref().unwrap();
    let lps = got[0].teacher_topk_logprobs.as_ref().unwrap();
    assert_eq!(ids.len(), 4);
    assert!(ids.iter().all(|k| k.len() == 3));
    assert!(lps.iter().all(|k| k[0] >= k[1] && k[1] >= k[2]));
    // The chosen token's log-prob is at most the best one.
    let teacher = got[0].teacher_logprobs.as_ref().unwrap();
    assert!(teacher.iter().zip(lps).all(|(t, k)| *t <= k[0] + 1e-6));
}

#[test]
fn the_teacher_uses_the_adapter_that_produced_the_response() {
    let model = tiny_model();
    let (adapter, dir) = saved_adapter(&model, 3);
    let mut at_v3 = row("v3", None, Some("Always answer in kilometres."));
    at_v3.policy_version = 3;
    let mut at_v9 = row("v9", None, Some("Always answer in kilometres."));
    at_v9.policy_version = 9;
    let mut cfg = config(HintSource::Feedback);
    cfg.checkpoints = Some(dir.path().to_path_buf());
    let mut distiller = Distiller::new(cfg, model.clone(), None).unwrap();
    let got = rows_from_batch(
        &distiller
            .process(&batch_of(&[at_v3.clone(), at_v9.clone()]), "t")
            .unwrap(),
    )
    .unwrap();
    let with_adapter = adapter.apply_for_serving(&model.decoder).unwrap();
    let hint = "Always answer in kilometres.";
    let expected = expected_teacher(&model, &with_adapter, &at_v3, hint);
    let base = expected_teacher(&model, &model.decoder, &at_v3, hint);
    let teacher = got[0].teacher_logprobs.as_ref().unwrap();
    let diff = max_diff;
    assert!(diff(teacher, &expected) < 1e-5);
    assert!(diff(teacher, &base) > 1e-4, "the adapter must matter");
    // Version 9 has no checkpoint: scored by the base model, and counted.
    assert!(diff(got[1].teacher_logprobs.as_ref().unwrap(), &base) < 1e-5);
    assert_eq!(distiller.stats.adapter_missing, 1);
}

/// distill-hints holds its teacher in packed GGUF blocks by default (serve's
/// kernels, 16-bit activations): the same log-probs and top-K as the f32 weights
/// up to rounding, with the adapter and without.
#[test]
fn a_packed_teacher_scores_as_the_f32_weights_do() {
    let f32_model = tiny_model();
    let packed_model = tiny_model_as(WeightFormat::Packed);
    let (_, dir) = saved_adapter(&f32_model, 2);
    let hint = "Always answer in kilometres.";
    let mut rows = vec![row("base", None, Some(hint)), row("v2", None, Some(hint))];
    rows[1].policy_version = 2;
    let teach = |model: &Arc<Model>| {
        let mut cfg = config(HintSource::Feedback);
        cfg.checkpoints = Some(dir.path().to_path_buf());
        cfg.topk = 4;
        let mut distiller = Distiller::new(cfg, model.clone(), None).unwrap();
        rows_from_batch(&distiller.process(&batch_of(&rows), "t").unwrap()).unwrap()
    };
    let (exact, packed) = (teach(&f32_model), teach(&packed_model));
    for (e, p) in exact.iter().zip(&packed) {
        let (e_lp, p_lp) = (
            e.teacher_logprobs.as_ref().unwrap(),
            p.teacher_logprobs.as_ref().unwrap(),
        );
        let d = max_diff(e_lp, p_lp);
        assert!(
            d < 5e-3,
            "{}: packed and f32 teacher log-probs differ by {d}",
            e.sample_id
        );
        let (e_top, p_top) = (
            e.teacher_topk_logprobs.as_ref().unwrap(),
            p.teacher_topk_logprobs.as_ref().unwrap(),
        );
        for (a, b) in e_top.iter().zip(p_top) {
            assert!(
                max_diff(a, b) < 5e-3,
                "{}: top-K {a:?} vs {b:?}",
                e.sample_id
            );
        }
    }
    // ... while the adapter moves them by far more.
    let by_adapter = max_diff(
        exact[0].teacher_logprobs.as_ref().unwrap(),
        exact[1].teacher_logprobs.as_ref().unwrap(),
    );
    assert!(
        by_adapter > 5e-2,
        "the adapter moved the teacher by only {by_adapter}"
    );
}

/// The teacher's context is the prompt the policy saw plus the hint: a recorded
/// tool call's arguments (a JSON string, as OpenAI clients send them) are
/// rendered as the object serve rendered, not as a quoted string.
#[test]
fn the_teacher_renders_recorded_tool_calls_as_serve_did() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &TinySpec::default()).unwrap();
    let mut model = Model::load_with(&path, WeightFormat::F32).unwrap();
    // Qwen2.5's way of printing a call: its arguments through tojson.
    model.template = crate::model::template::ChatTemplate::new(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\
         {% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \
         \"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}\
         <|im_end|>\n{% endfor %}<|im_start|>assistant\n",
        "",
        "<|im_end|>",
    )
    .unwrap();
    let model = Arc::new(model);
    let mut turn = row("call", None, Some("print the result"));
    turn.messages_json = json!([
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "python", "arguments": "{\"code\": \"print(2+2)\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ])
    .to_string();
    let distiller = Distiller::new(config(HintSource::Feedback), model.clone(), None).unwrap();
    let ids = distiller.teacher_prompt(&turn, "print the result").unwrap();
    let text = model.tokenizer.decode(&ids).unwrap();
    assert!(
        text.contains(r#""arguments": {"code": "print(2+2)"}"#),
        "{text}"
    );
    assert!(text.contains("print the result"), "{text}");
}
