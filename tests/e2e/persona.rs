//! The persona benchmark's plumbing at CI size: the tiny random model, a few
//! sessions. It cannot learn anything; what is checked is that the sessions are
//! recorded, judged, distilled and trained on, that serve hot-loads the
//! checkpoints, and that the metrics, report and plot are written.

use crate::common::{claw, read_rows, tiny_chat_model};

#[test]
fn a_short_persona_run_goes_through_the_whole_loop_and_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let report = tmp.path().join("report");
    let data = tmp.path().join("runs");
    let out = claw()
        .args(["eval", "--bench", "persona", "--persona", "brief"])
        .args([
            "--method",
            "combined,off",
            "--sessions",
            "8",
            "--batch",
            "4",
        ])
        .args([
            "--heldout",
            "2",
            "--max-tokens",
            "8",
            "--round-timeout",
            "120",
            // the retention check of the combined run's adapter, at CI size
            "--retention-limit",
            "2",
        ])
        .arg("--model")
        .arg(&model)
        // The tiny model as the helpfulness judge: it cannot judge, but every
        // held-out reply is put to it (3 votes) and counted.
        .arg("--helpfulness-judge")
        .arg(&model)
        .arg("--report")
        .arg(&report)
        .arg("--keep-data")
        .arg(&data)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| brief | combined |"), "{stdout}");

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("persona.json")).unwrap()).unwrap();
    let runs = results.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["sessions"].as_array().unwrap().len(), 8);
        assert_eq!(run["heldout_prompts"], 2);
        // the held-out replies before and after, and the judge's control
        for when in ["helpful_before", "helpful_after", "helpful_empty"] {
            let h = &run[when];
            let counted = h["judged"].as_u64().unwrap() + h["unjudged"].as_u64().unwrap();
            assert_eq!(counted, 2, "each held-out question was judged: {h}");
        }
    }
    let md = std::fs::read_to_string(report.join("persona.md")).unwrap();
    assert!(md.contains("## Helpfulness"), "{md}");
    assert!(md.contains("control: empty replies judged helpful"), "{md}");
    assert!(md.contains("| brief | combined | 0 | tiny"), "{md}");
    // combined trained and serve loaded it; off stayed at the base model.
    let combined = &runs[0];
    assert_eq!(combined["method"], "combined");
    assert!(
        combined["final_policy_version"].as_u64().unwrap() >= 2,
        "{combined}"
    );
    let last = combined["sessions"].as_array().unwrap().last().unwrap();
    assert!(
        last["policy_version"].as_u64().unwrap() >= 1,
        "the second round was served by a trained policy: {last}"
    );
    assert_eq!(runs[1]["method"], "off");
    assert_eq!(runs[1]["final_policy_version"], 0);
    // The trained run's final adapter was checked against the base; the control
    // (the base itself) was not.
    let retention = &combined["retention"];
    let rows: Vec<&str> = retention["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no retention rows: {combined}"))
        .iter()
        .map(|r| r["metric"].as_str().unwrap())
        .collect();
    assert_eq!(rows, ["gsm8k accuracy", "facts accuracy", "perplexity"]);
    assert_eq!(retention["gsm8k_items"], 2);
    assert!(retention["adapter"]
        .as_str()
        .unwrap()
        .contains("brief-combined-seed0"));
    assert!(retention["adapted"]["perplexity"].as_f64().unwrap() > 1.0);
    assert!(runs[1].get("retention").is_none(), "{}", runs[1]);

    // Every reply of every session went through collect, judge (the thumbs are
    // the reward) and distill-hints (the corrections are the hints).
    let run_dir = data.join("brief-combined-seed0");
    let mut distilled = Vec::new();
    for entry in std::fs::read_dir(run_dir.join("distilled")).unwrap() {
        distilled.extend(read_rows(&entry.unwrap().path()));
    }
    let turns: Vec<u64> = combined["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["turns"].as_u64().unwrap())
        .collect();
    assert!(turns.iter().all(|&t| (1..=3).contains(&t)), "{turns:?}");
    assert_eq!(
        distilled.len() as u64,
        turns.iter().sum::<u64>(),
        "every reply became a sample"
    );
    // A disappointed user corrects the reply in the same session: the model's
    // next turn is turn 2 of that session, and the correction is turn 1's next state.
    if turns.iter().any(|&t| t > 1) {
        let second = distilled
            .iter()
            .find(|r| r.turn == Some(2))
            .expect("a turn 2");
        let first = distilled
            .iter()
            .find(|r| r.turn == Some(1) && r.session_id == second.session_id)
            .expect("its turn 1");
        assert_eq!(first.reward, Some(-1.0));
        assert_eq!(first.next_state_role.as_deref(), Some("user"));
    }
    for row in &distilled {
        let reward = row.reward.expect("judged");
        assert_eq!(reward.abs(), 1.0);
        assert_eq!(
            row.teacher_logprobs.is_some(),
            reward < 0.0,
            "{}",
            row.sample_id
        );
    }
    assert!(run_dir.join("checkpoints").join("LATEST").is_file());

    let md = std::fs::read_to_string(report.join("persona.md")).unwrap();
    assert!(
        md.contains("| brief | off |") && md.contains("persona.png"),
        "{md}"
    );
    assert!(
        md.contains("## Retention") && md.contains("| brief | combined | perplexity |"),
        "{md}"
    );
    assert!(
        stdout.contains("| brief | combined | facts accuracy |"),
        "{stdout}"
    );
    // The chart decodes, and has both methods on it: the combined run's colour
    // and the control's grey, more of each than the legend's swatches hold (one
    // panel, the persona's, with the legend beside it).
    let png = std::fs::read(report.join("persona.png")).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut rgb).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert!(info.width > info.height, "{}x{}", info.width, info.height);
    let count = |c: [u8; 3]| rgb.chunks(3).filter(|p| *p == c).count();
    assert!(count([31, 119, 180]) > 400, "the combined run's line");
    assert!(count([110, 110, 110]) > 400, "the control's line");
}
