//! AdamW with gradient accumulation and global grad-norm clipping.
//!
//! Written here rather than using candle_nn's `AdamW` because training needs
//! three things it does not offer: weight decay on matrices only, gradients
//! summed over several backward passes (micro-batches) before one update, and
//! its moments saved and restored for `--resume`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices (rank ≥ 2) only.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<Param>,
    steps: u64,
}

/// Gradients summed over micro-batches, keyed by parameter.
#[derive(Default)]
pub struct GradSum {
    sums: HashMap<TensorId, Tensor>,
}

impl GradSum {
    /// Adds the gradients of `vars` found in `grads`.
    pub fn add(&mut self, grads: &GradStore, vars: &[Var]) -> Result<()> {
        for var in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let id = var.as_tensor().id();
            let sum = match self.sums.remove(&id) {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            };
            self.sums.insert(id, sum);
        }
        Ok(())
    }

    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        self.sums.get(&var.as_tensor().id())
    }

    /// The global L2 norm of all gradients.
    pub fn norm(&self) -> Result<f64> {
        let mut total = 0f64;
        for g in self.sums.values() {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(total.sqrt())
    }

    /// Scales every gradient so the global norm is at most `max_norm`; returns
    /// the norm before clipping.
    pub fn clip(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.norm()?;
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for g in self.sums.values_mut() {
                *g = (&*g * scale)?;
            }
        }
        Ok(norm)
    }
}

impl AdamW {
    pub fn new(named_vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let params = named_vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.zeros_like()?;
                let v = var.zeros_like()?;
                Ok(Param { name, var, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            steps: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Continues the step count of a checkpoint whose moments were not saved.
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// One update from summed gradients. Parameters with no gradient are left
    /// alone (no decay either: they did not take part in this step).
    pub fn step(&mut self, grads: &GradSum) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else {
                continue;
            };
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&p.m / bias1)?;
            let v_hat = (&p.v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let mut next = (p.var.as_tensor() - (update * c.lr)?)?;
            if p.var.rank() >= 2 && c.weight_decay > 0.0 {
                next = (next - (p.var.as_tensor() * (c.lr * c.weight_decay))?)?;
            }
            p.var.set(&next)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`NAME.exp_avg`, `NAME.exp_avg_sq`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("{}.exp_avg", p.name), p.m.clone()),
                    (format!("{}.exp_avg_sq", p.name), p.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by [`state_tensors`](Self::state_tensors) after `steps` updates.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &mut self.params {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors
                    .get(&key)
                    .with_context(|| format!("optimizer state has no {key}"))?;
                anyhow::ensure!(
                    t.dims() == p.var.dims(),
                    "optimizer state {key} has shape {:?}, the parameter {:?}",
                    t.dims(),
                    p.var.dims()
                );
                Ok(t.clone())
            };
            p.m = get("exp_avg")?;
            p.v = get("exp_avg_sq")?;
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        let w = Var::new(&[[1.0f32, -1.0]], &Device::Cpu).unwrap();
        let bias = Var::new(&[0.5f32], &Device::Cpu).unwrap();
        let loss = ((w.as_tensor().sum_all().unwrap() * 3.0).unwrap()
            - bias.as_tensor().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let mut sum = GradSum::default();
        sum.add(&grads, &[w.clone(), bias.clone()]).unwrap();
        let config = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone()), ("b".into(), bias.clone())],
            config,
        )
        .unwrap();
        opt.step(&sum).unwrap();
        // Adam's first step is lr * sign(g); decay lr*wd*w on the matrix only.
        let w_after: Vec<Vec<f32>> = w.as_tensor().to_vec2().unwrap();
        assert!((w_after[0][0] - (1.0 - 0.1 - 0.05)).abs() < 1e-5);
        assert!((w_after[0][1] - (-1.0 - 0.1 + 0.05)).abs() < 1e-5);
        let b_after: Vec<f32> = bias.as_tensor().to_vec1().unwrap();
        assert!((b_after[0] - 0.6).abs() < 1e-5);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let w = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let loss = (w.as_tensor().sqr().unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap();
        let mut sum = GradSum::default();
        sum.add(&loss.backward().unwrap(), std::slice::from_ref(&w))
            .unwrap();
        assert!((sum.clip(1.0).unwrap() - 5.0).abs() < 1e-5);
        assert!((sum.norm().unwrap() - 1.0).abs() < 1e-3);
    }
}
