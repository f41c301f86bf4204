//! One activation row as the decode kernels read it: 16-bit integers with one
//! f32 scale per 32-value group (built by `Activations16` in `kernels/mod.rs`).
//! A file of its own so that the SIMD kernels, which read it, and the module
//! that dispatches to them do not import each other.

/// One activation row of `Activations16`.
pub struct Quantized16<'a> {
    pub(super) values: &'a [i16],
    pub(super) scales: &'a [f32],
}
