//! Attention Residuals in the tensor forward pass: each sublayer's depth
//! aggregation ([`DepthOp`]), the sources it reads while the sublayers run
//! ([`Sources`]) and what a traced pass records ([`DepthTrace`]).

use anyhow::Result;
use candle_core::Tensor;

use crate::model::attnres::{self, DepthAttention};
use crate::model::config::Residual;

/// One AttnRes aggregation: the sublayer's own zero-initialised query w and
/// key RMSNorm gain g.
#[derive(Debug, Clone)]
pub(super) struct DepthOp {
    pub(super) query: Tensor,
    pub(super) gain: Tensor,
    /// u = w ⊙ g as a plain vector (the score is r·(u·v)), for the decode step.
    pub(super) u: Vec<f32>,
    pub(super) eps: f64,
}

impl DepthOp {
    pub(super) fn new(query: Tensor, gain: Tensor, eps: f64) -> Result<Self> {
        let (w, g): (Vec<f32>, Vec<f32>) = (query.to_vec1()?, gain.to_vec1()?);
        anyhow::ensure!(w.len() == g.len(), "AttnRes query and norm sizes differ");
        let u = w.iter().zip(&g).map(|(a, b)| a * b).collect();
        Ok(Self {
            query,
            gain,
            u,
            eps,
        })
    }

    /// Σ α_i v_i over `sources`, each (batch, seq, d). One source is itself
    /// (its weight is exactly 1). With `alphas`, also appends the mean weight
    /// of each source over all tokens.
    pub(super) fn forward(
        &self,
        sources: &[&Tensor],
        alphas: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Tensor> {
        let (b, t, d) = sources[0].dims3()?;
        if sources.len() == 1 {
            if let Some(alphas) = alphas {
                alphas.push(vec![1.0]);
            }
            return Ok(sources[0].clone());
        }
        let n = sources.len();
        let v = Tensor::stack(sources, 2)?.reshape((b * t, n, d))?;
        if let Some(alphas) = alphas {
            let flat: Vec<f32> = v.flatten_all()?.to_vec1()?;
            let mut mean = vec![0f32; n];
            for row in flat.chunks_exact(n * d) {
                for (m, a) in
                    mean.iter_mut()
                        .zip(attnres::depth_weights(row, &self.u, self.eps as f32))
                {
                    *m += a / (b * t) as f32;
                }
            }
            alphas.push(mean);
        }
        let h = v.apply_op3(
            &self.query,
            &self.gain,
            DepthAttention {
                eps: self.eps as f32,
            },
        )?;
        Ok(h.reshape((b, t, d))?)
    }
}

/// Per-depth diagnostics of one forward pass (the AttnRes study): magnitudes
/// and routing weights, each averaged over all tokens.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DepthTrace {
    /// RMS of each sublayer's input before its PreNorm: the running sum for
    /// the standard residual, the depth-attention mix for AttnRes.
    pub input_rms: Vec<f32>,
    /// RMS of each sublayer's raw output f_l(h_l).
    pub output_rms: Vec<f32>,
    /// AttnRes only: per sublayer (the first included, with its single
    /// source), then the final readout, the mean weight of each source.
    pub alphas: Vec<Vec<f32>>,
}

pub(super) fn rms(t: &Tensor) -> Result<f32> {
    Ok(t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?)
}

/// The AttnRes sources of the tensor path while the sublayers run.
pub(super) enum Sources {
    /// Embedding, then every sublayer output.
    Full(Vec<Tensor>),
    /// Embedding and finished block sums; the current block's partial sum.
    Block {
        size: usize,
        blocks: Vec<Tensor>,
        partial: Option<Tensor>,
    },
}

impl Sources {
    pub(super) fn new(residual: Residual, embedding: Tensor) -> Self {
        match residual {
            Residual::Block { size } => Sources::Block {
                size,
                blocks: vec![embedding],
                partial: None,
            },
            _ => Sources::Full(vec![embedding]),
        }
    }

    /// Sublayer `j`'s input (j = number of sublayers run so far, or the total
    /// for the readout).
    pub(super) fn input(
        &mut self,
        j: usize,
        op: Option<&DepthOp>,
        alphas: Option<&mut Vec<Vec<f32>>>,
        readout: bool,
    ) -> Result<Tensor> {
        let list: Vec<&Tensor> = match self {
            Sources::Full(all) => all.iter().collect(),
            Sources::Block {
                size,
                blocks,
                partial,
            } => {
                // A block's first sublayer sees finished blocks only (Eq. 6):
                // the block that just ended becomes a source of its own.
                if !readout && j > 0 && j.is_multiple_of(*size) {
                    if let Some(p) = partial.take() {
                        blocks.push(p);
                    }
                }
                blocks.iter().chain(partial.iter()).collect()
            }
        };
        match op {
            Some(op) => op.forward(&list, alphas),
            None => {
                anyhow::ensure!(list.len() == 1, "AttnRes op missing for sublayer {j}");
                if let Some(alphas) = alphas {
                    alphas.push(vec![1.0]);
                }
                Ok(list[0].clone())
            }
        }
    }

    pub(super) fn push(&mut self, v: Tensor) -> Result<()> {
        match self {
            Sources::Full(all) => all.push(v),
            Sources::Block { partial, .. } => {
                *partial = Some(match partial.take() {
                    Some(p) => (p + v)?,
                    None => v,
                });
            }
        }
        Ok(())
    }
}
