//! Self-imitation (`claw train --self-imitation N`, after Oh et al., 2018): a
//! reply the user accepted is trained once, in the step its batch fills, and
//! then never again, although early in a run it is the rarest and most useful
//! signal there is (a persona run has a few accepted replies among many
//! rejected ones). Each step also trains N accepted replies of earlier steps
//! again, as auxiliary samples with their judged reward measured against the
//! same baseline as the rows: with `--reward-baseline recent` the push fades by
//! itself as accepted replies become the rule. Only accepted replies are
//! replayed: pushing a rejected reply down again says nothing about what to
//! write instead, and a larger step on everything (a higher `--lr`,
//! `--updates-per-batch`) is what broke the persona runs' answers.

use std::collections::VecDeque;

use super::trainer::TrainSample;

/// Accepted replies kept for replay; the oldest go first.
pub const CAPACITY: usize = 16;

/// An accepted reply and how often it was replayed.
#[derive(Debug)]
struct Kept {
    sample: TrainSample,
    replays: usize,
}

/// The accepted replies of earlier steps, replayed `per_step` at a time.
#[derive(Debug)]
pub struct SelfImitation {
    per_step: usize,
    kept: VecDeque<Kept>,
}

impl SelfImitation {
    pub fn new(per_step: usize) -> Self {
        Self {
            per_step,
            kept: VecDeque::with_capacity(CAPACITY),
        }
    }

    /// Up to `per_step` kept replies for this step: the least replayed first and,
    /// among those, the newest (each accepted reply gets its turns, recent ones
    /// sooner). Call before [`SelfImitation::remember`] for the same batch, so
    /// that a step never replays its own rows.
    pub fn samples(&mut self) -> Vec<TrainSample> {
        let mut order: Vec<usize> = (0..self.kept.len()).collect();
        order.sort_by_key(|&i| (self.kept[i].replays, std::cmp::Reverse(i)));
        order
            .into_iter()
            .take(self.per_step)
            .map(|i| {
                let kept = &mut self.kept[i];
                kept.replays += 1;
                kept.sample.clone()
            })
            .collect()
    }

    /// Keeps the batch's accepted rows (judged reward above 0) for later steps.
    /// The replay reinforces the reply alone: the teacher's log-probs belonged
    /// to the step it was first trained in.
    pub fn remember(&mut self, batch: &[TrainSample]) {
        let accepted = batch
            .iter()
            .filter(|s| !s.auxiliary && s.reward.is_some_and(|r| r > 0.0));
        for sample in accepted {
            if self.kept.len() == CAPACITY {
                self.kept.pop_front();
            }
            self.kept.push_back(Kept {
                sample: TrainSample {
                    sample_id: format!("{}#imitation", sample.sample_id),
                    teacher_logprobs: None,
                    teacher_topk: None,
                    replay: None,
                    auxiliary: true,
                    ..sample.clone()
                },
                replays: 0,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, reward: Option<f32>) -> TrainSample {
        TrainSample {
            sample_id: id.into(),
            prompt_ids: vec![1, 2],
            response_ids: vec![3],
            reward,
            teacher_logprobs: Some(vec![-0.5]),
            ..Default::default()
        }
    }

    fn ids(samples: &[TrainSample]) -> Vec<&str> {
        samples.iter().map(|s| s.sample_id.as_str()).collect()
    }

    #[test]
    fn accepted_replies_come_back_least_replayed_and_newest_first() {
        let mut imitation = SelfImitation::new(2);
        assert!(imitation.samples().is_empty(), "nothing kept yet");
        imitation.remember(&[
            row("a", Some(1.0)),
            row("no", Some(-1.0)),
            row("none", None),
        ]);
        imitation.remember(&[row("b", Some(1.0)), row("c", Some(0.5))]);
        let first = imitation.samples();
        assert_eq!(ids(&first), ["c#imitation", "b#imitation"]);
        // Replayed as auxiliary samples with the reward, without the teacher.
        assert!(first
            .iter()
            .all(|s| s.auxiliary && s.teacher_logprobs.is_none()));
        assert_eq!(first[0].reward, Some(0.5));
        // "a" has had no turn yet; then the newest of those replayed once.
        assert_eq!(ids(&imitation.samples()), ["a#imitation", "c#imitation"]);
        // A replay is never kept again as if it were a row.
        imitation.remember(&first);
        assert_eq!(imitation.kept.len(), 3);
    }

    #[test]
    fn the_oldest_accepted_replies_make_room() {
        let mut imitation = SelfImitation::new(CAPACITY);
        let batch: Vec<TrainSample> = (0..CAPACITY + 3)
            .map(|i| row(&i.to_string(), Some(1.0)))
            .collect();
        imitation.remember(&batch);
        let replayed = imitation.samples();
        assert_eq!(replayed.len(), CAPACITY);
        assert!(!ids(&replayed).contains(&"2#imitation"));
        assert!(ids(&replayed).contains(&"3#imitation"));
    }
}
