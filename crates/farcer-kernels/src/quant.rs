//! Products with a frozen weight kept in GGUF's Q8_0 blocks (34 bytes per 32 values: an
//! f16 scale `d`, then 32 signed bytes `q`). A tile of rows at a time is dequantized to
//! f32 as the loader does it (`q as f32 * d`), so the product sees exactly the values of
//! the f32 copy; but it streams 34 bytes per 32 values instead of 128. The LM head of a
//! small LLM is memory-bound (a few answer rows against the whole vocabulary), so this
//! is what its speed is made of.

use crate::gemm::gemm_raw;
use crate::math::add_into;
use crate::profile::{self, Part};
use crate::util::{uninit, SendPtr};
use rayon::prelude::*;

/// Values per Q8_0 block.
pub const Q8_BLOCK: usize = 32;
/// Bytes per Q8_0 block.
pub const Q8_BYTES: usize = 34;
/// Weight rows per tile: at SmolLM2's 576 columns a tile (590 KB) stays in L2 for its
/// product.
const TILE: usize = 256;
/// Weight rows per task in the backward; fixed, so the order of its sums does not depend
/// on the thread count.
const CHUNK: usize = 16 * TILE;

/// A row-major `(rows, cols)` matrix in Q8_0 blocks.
#[derive(Clone, Copy, Debug)]
pub struct Q8Matrix<'a> {
    data: &'a [u8],
    rows: usize,
    cols: usize,
}

impl<'a> Q8Matrix<'a> {
    /// `None` unless `cols` is whole blocks and `data` holds exactly `rows` rows of them.
    pub fn new(data: &'a [u8], rows: usize, cols: usize) -> Option<Self> {
        let bytes = rows.checked_mul(cols / Q8_BLOCK)?.checked_mul(Q8_BYTES)?;
        let whole = cols > 0 && cols.is_multiple_of(Q8_BLOCK);
        (whole && data.len() == bytes).then_some(Q8Matrix { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `r0 .. r0 + out.len() / cols` as f32.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let row_bytes = self.cols / Q8_BLOCK * Q8_BYTES;
        let n = out.len() / self.cols;
        dequantize_blocks(&self.data[r0 * row_bytes..][..n * row_bytes], out);
    }
}

/// The f32 value of an IEEE half (exact: every f16 is an f32).
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let negative = h & 0x8000 != 0;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let magnitude = match exp {
        // Zero and subnormals: man 2^-24.
        0 => man as f32 * f32::from_bits(0x3380_0000),
        0x1f => f32::from_bits(0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(((exp + 112) << 23) | (man << 13)),
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

multiversion! {
    /// Whole blocks to their values, `q as f32 * d` (one call per tile: the loop over the
    /// 32 values of a block vectorises, a call per block would not pay).
    fn dequantize_blocks(src: &[u8], out: &mut [f32]) {
        for (block, out) in src.chunks_exact(Q8_BYTES).zip(out.chunks_exact_mut(Q8_BLOCK)) {
            let d = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
            let q: &[u8; Q8_BLOCK] = block[2..].try_into().expect("32 values");
            for (o, &q) in out.iter_mut().zip(q) {
                *o = q as i8 as f32 * d;
            }
        }
    }
}

/// `x @ w^T`: `x` `(n, cols)`, `w` `(rows, cols)` in Q8_0; returns `(n, rows)`. Each
/// task dequantizes a tile of `w`'s rows and writes its columns of the result.
pub fn q8_matmul_nt(x: &[f32], n: usize, w: Q8Matrix) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    assert!(n.checked_mul(cols).is_some_and(|len| x.len() >= len));
    let _span = profile::span(Part::Gemm, 2.0 * (n * rows * cols) as f64);
    let mut y = uninit(n.checked_mul(rows).expect("output size overflows"));
    if n == 0 {
        return y;
    }
    let yp = SendPtr(y.as_mut_ptr());
    (0..rows.div_ceil(TILE)).into_par_iter().for_each(|t| {
        let r0 = t * TILE;
        let tr = TILE.min(rows - r0);
        let mut tile = uninit(tr * cols);
        w.dequantize_rows(r0, &mut tile);
        // SAFETY: `x` holds `n` rows (checked above); each task writes only columns
        // `r0 .. r0 + tr` of `y`'s `n` rows of `rows`.
        unsafe {
            gemm_raw(
                n,
                tr,
                cols,
                yp.get().add(r0),
                rows,
                false,
                x.as_ptr(),
                cols,
                1,
                tile.as_ptr(),
                1,
                cols,
                gemm::Parallelism::None,
            )
        };
    });
    y
}

/// `g @ w`: `g` `(n, rows)`, `w` `(rows, cols)` in Q8_0; returns `(n, cols)` (the input
/// gradient of [`q8_matmul_nt`]). Fixed chunks of `w`'s rows each sum their tiles in
/// order, then the chunks are summed in order: the result does not depend on the thread
/// count.
pub fn q8_matmul_nn(g: &[f32], n: usize, w: Q8Matrix) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    assert!(n.checked_mul(rows).is_some_and(|len| g.len() >= len));
    let out_len = n.checked_mul(cols).expect("output size overflows");
    if n == 0 {
        return Vec::new();
    }
    let _span = profile::span(Part::Gemm, 2.0 * (n * rows * cols) as f64);
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; out_len];
            let end = ((c + 1) * CHUNK).min(rows);
            let mut tile = uninit(TILE * cols);
            for r0 in (c * CHUNK..end).step_by(TILE) {
                let tr = TILE.min(end - r0);
                let tile = &mut tile[..tr * cols];
                w.dequantize_rows(r0, tile);
                // SAFETY: columns `r0 .. r0 + tr` of `g`'s `n` rows (checked above), the
                // tile, and this task's own `acc`.
                unsafe {
                    gemm_raw(
                        n,
                        cols,
                        tr,
                        acc.as_mut_ptr(),
                        cols,
                        true,
                        g.as_ptr().add(r0),
                        rows,
                        1,
                        tile.as_ptr(),
                        cols,
                        1,
                        gemm::Parallelism::None,
                    )
                };
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; out_len];
    for p in &partials {
        add_into(&mut out, p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q8_0 blocks of deterministic values, and their f32 values as the loader gives them.
    fn matrix(rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        let mut data = Vec::new();
        let mut vals = Vec::new();
        for b in 0..rows * cols / Q8_BLOCK {
            // Scales from normal f16s and one subnormal, of both signs.
            let h: u16 = match b % 5 {
                0 => 0x2e66,                      // 0.0999...
                1 => 0x1c00,                      // 2^-8
                2 => 0x0003,                      // subnormal: 3 * 2^-24
                3 => 0xa400 | (b as u16 & 0x3ff), // negative, about -0.0156
                _ => 0x3c00,                      // 1.0
            };
            data.extend_from_slice(&h.to_le_bytes());
            let d = f16_to_f32(h);
            for j in 0..Q8_BLOCK {
                let q = ((b * 31 + j * 17) % 255) as i32 - 127;
                data.push(q as i8 as u8);
                vals.push(q as f32 * d);
            }
        }
        (data, vals)
    }

    /// The backward's sums do not depend on how many threads run them.
    #[test]
    fn the_backward_is_the_same_on_any_thread_count() {
        let (rows, cols, n) = (3 * CHUNK + 100, 64, 2);
        let (data, _) = matrix(rows, cols);
        let q = Q8Matrix::new(&data, rows, cols).expect("whole blocks");
        let g: Vec<f32> = (0..n * rows)
            .map(|i| ((i * 7) % 23) as f32 / 3.0 - 3.5)
            .collect();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| q8_matmul_nn(&g, n, q))
        };
        let one = on(1);
        assert_eq!(one.len(), n * cols);
        for threads in [2, 3, 5] {
            let other = on(threads);
            assert!(
                one.iter()
                    .zip(&other)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads"
            );
        }
        assert!(q8_matmul_nn(&[], 0, q).is_empty());
        assert!(Q8Matrix::new(&[], 3, 0).is_none());
    }

    #[test]
    fn halves_convert_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x83ff), -1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }

    /// Both products against f64 sums over the same f32 values, on a weight whose rows
    /// end part-way through a tile and a chunk.
    #[test]
    fn products_match_the_dequantized_weight() {
        let (rows, cols, n) = (CHUNK + TILE + 37, 96, 3);
        let (data, w) = matrix(rows, cols);
        let q = Q8Matrix::new(&data, rows, cols).expect("whole blocks");
        let mut back = vec![0f32; 5 * cols];
        q.dequantize_rows(rows - 5, &mut back);
        assert_eq!(back, w[(rows - 5) * cols..]);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7) % 13) as f32 / 6.5 - 1.0)
            .collect();
        let y = q8_matmul_nt(&x, n, q);
        for i in 0..n {
            for r in 0..rows {
                let want: f64 = (0..cols)
                    .map(|c| x[i * cols + c] as f64 * w[r * cols + c] as f64)
                    .sum();
                let got = y[i * rows + r] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "y[{i}, {r}]"
                );
            }
        }
        let g: Vec<f32> = (0..n * rows)
            .map(|i| ((i * 5) % 11) as f32 / 5.5 - 1.0)
            .collect();
        let dx = q8_matmul_nn(&g, n, q);
        for i in 0..n {
            for c in 0..cols {
                let want: f64 = (0..rows)
                    .map(|r| g[i * rows + r] as f64 * w[r * cols + c] as f64)
                    .sum();
                let got = dx[i * cols + c] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "dx[{i}, {c}]: {got} against {want}"
                );
            }
        }
        assert!(Q8Matrix::new(&data[1..], rows, cols).is_none());
        assert!(Q8Matrix::new(&data, rows, cols + 1).is_none());
    }
}
