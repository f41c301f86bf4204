//! A safe front to the `gemm` crate (the GEMM candle itself multiplies with),
//! for the training ops that need what candle's `matmul` does not offer:
//! accumulating into an existing output (`dst += a·b`) and reading transposed
//! operands in place. Each saved output is one allocation and one pass over an
//! activation-sized buffer fewer, per linear layer and step.

/// A read-only f32 matrix view: element (i, j) is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// `data` as a row-major (rows, cols) matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// `data` as (rows, cols) with rows `row_stride` elements apart: a block of
    /// columns of a wider row-major matrix (start `data` at its first column).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        last < self.data.len()
    }
}

/// `dst = scale·a·b` (`accumulate` false) or `dst += scale·a·b` (true), with
/// `dst` a row-major (a.rows, b.cols) matrix. Runs on candle's thread count.
pub fn gemm_into(dst: &mut [f32], a: Mat, b: Mat, scale: f32, accumulate: bool) {
    gemm_into_on(dst, a, b, scale, accumulate, Threads::Candle)
}

/// Where a product runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Across candle's thread count.
    Candle,
    /// On the calling thread: for small products inside a parallel loop.
    Caller,
}

/// [`gemm_into`] on the given threads.
pub fn gemm_into_on(
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    scale: f32,
    accumulate: bool,
    threads: Threads,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm_into: inner dimensions differ");
    assert_eq!(dst.len(), m * n, "gemm_into: output size");
    assert!(
        a.in_bounds() && b.in_bounds(),
        "gemm_into: view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let count = match threads {
        Threads::Candle => candle_core::utils::get_num_threads(),
        Threads::Caller => 1,
    };
    let parallelism = match count > 1 {
        true => gemm::Parallelism::Rayon(count),
        false => gemm::Parallelism::None,
    };
    // SAFETY: the shapes are checked above and every element the strides
    // address lies inside its slice; dst is exclusively borrowed and disjoint
    // from the shared a and b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `scale·a·b` as a new row-major matrix.
pub fn gemm(a: Mat, b: Mat, scale: f32) -> Vec<f32> {
    let mut dst = vec![0f32; a.rows * b.cols];
    gemm_into(&mut dst, a, b, scale, false);
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let at = |m: &Mat, i: usize, j: usize| m.data[i * m.row_stride + j * m.col_stride];
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols).map(|p| at(&a, i, p) * at(&b, p, j)).sum();
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn products_of_plain_and_transposed_views_match_the_definition() {
        let (m, k, n) = (37, 19, 23);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let bt = values(n * k, 3);
        let at = values(k * m, 4);
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(x, y)| (x - y).abs() < 1e-4);
        let cases = [
            (Mat::rows(&a, m, k), Mat::rows(&b, k, n)),
            (Mat::rows(&a, m, k), Mat::rows(&bt, n, k).t()),
            (Mat::rows(&at, k, m).t(), Mat::rows(&b, k, n)),
            (Mat::rows(&at, k, m).t(), Mat::rows(&bt, n, k).t()),
        ];
        for (x, y) in cases {
            let want = naive(x, y);
            assert!(close(&gemm(x, y, 1.0), &want));
            // scale, and accumulate onto what is there
            let mut dst = want.clone();
            gemm_into(&mut dst, x, y, 0.5, true);
            let expect: Vec<f32> = want.iter().map(|v| v * 1.5).collect();
            assert!(close(&dst, &expect));
        }
    }

    #[test]
    #[should_panic(expected = "inner dimensions")]
    fn mismatched_shapes_are_refused() {
        let a = values(6, 0);
        gemm(Mat::rows(&a, 2, 3), Mat::rows(&a, 2, 3), 1.0);
    }
}
