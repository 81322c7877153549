//! An AVX-512 attention forward without a mask, for heads of 64 values (the ViTs').
//!
//! Per task (a head, or a chunk of its query rows), the head's keys are packed as
//! 16-key panels and its values as contiguous rows; then each tile of [`R`] query rows
//! runs its scores, their softmax and `p v` while the scores sit in L1. Packed keys,
//! values and scores start on a cache line, so no vector load straddles two. On the
//! ViTs' heads, MKL's products over 64-row blocks ran at 50-70% of the FMA units' rate
//! (an inner size of 64 leaves each call much packing), and the softmax, row by row,
//! cost a fifth of attention on top.

use std::arch::x86_64::*;

/// Query rows per tile: `R x 4` accumulators for a 64-key slice of scores, or for one
/// tile's 64 output values, leave registers for the operands.
pub(crate) const R: usize = 6;
/// The head size the tiles are written for.
pub(crate) const D: usize = 64;
/// Keys per panel: one vector.
const P: usize = 16;

/// Whether this CPU runs [`head_rows`] for heads of `d` values.
pub(crate) fn available(d: usize) -> bool {
    d == D && std::arch::is_x86_feature_detected!("avx512f")
}

/// One head's keys `(s, D)` (row stride `k_rs`) in blocks of up to 64 keys (the last
/// padded to a multiple of 16 with copies of the last key), each block `(D, w)`: row `c`
/// of a block holds value `c` of its `w` keys, so a tile's operand for one `c` is one
/// contiguous run. Then its values `(s, D)` (row stride `v_rs`), contiguous.
///
/// # Safety
/// The CPU must have AVX-512F; `k` and `v` must hold `s > 0` rows of `D` values at
/// their strides, and `k_rs * 15` must fit an `i32`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack_head(
    (k, k_rs): (*const f32, usize),
    (v, v_rs): (*const f32, usize),
    s: usize,
    buf: &mut Vec<f32>,
) {
    assert!(s > 0 && k_rs < i32::MAX as usize / 16);
    let s_pad = s.div_ceil(P) * P;
    let n = s_pad * D + s * D;
    buf.clear();
    buf.reserve(n + P);
    let skip = to_line(buf.as_ptr());
    buf.resize(skip, 0.0);
    let dst = buf.as_mut_ptr().add(skip);
    // Panel by panel: lane `l` of value `c` is key `j0 + l`'s value `c`, one gather per
    // (panel, c); keys past `s` read key `s - 1` again (their scores are never used).
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for p0 in (0..s_pad).step_by(P) {
        let b0 = p0 / 64 * 64;
        let w = 64.min(s_pad - b0);
        let last = (s - 1 - p0).min(P - 1) as i32;
        let idx = _mm512_mullo_epi32(
            _mm512_min_epi32(lanes, _mm512_set1_epi32(last)),
            _mm512_set1_epi32(k_rs as i32),
        );
        let src = k.add(p0 * k_rs);
        let out = dst.add(b0 * D + (p0 - b0));
        for c in 0..D {
            let x = _mm512_i32gather_ps::<4>(idx, src.add(c));
            _mm512_storeu_ps(out.add(c * w), x);
        }
    }
    let vt = dst.add(s_pad * D);
    for j in 0..s {
        std::ptr::copy_nonoverlapping(v.add(j * v_rs), vt.add(j * D), D);
    }
    // SAFETY: every value up to `skip + n` was written above.
    buf.set_len(skip + n);
}

/// How many values from `p` to the next 64-byte boundary. The packed keys and values
/// and the scores start there: a buffer from the allocator starts 16 bytes past one, so
/// every vector load then straddled two cache lines, and the tiles ran 10-15% slower.
fn to_line(p: *const f32) -> usize {
    (64 - p as usize % 64) % 64 / 4
}

// The helpers below take and return vectors; `#[inline(always)]` compiles them inside
// `head_rows`, whose `target_feature` they need.

/// Scores of `R` query rows against the block of `NP` panels that starts at key `j0`
/// (see [`pack_head`]), unscaled, into `sc` (rows of `s_pad` values); each row's
/// running maximum in `mx`, over keys before `s` only.
#[inline(always)]
unsafe fn score_tile<const NP: usize>(
    q: &[*const f32; R],
    kt: *const f32,
    j0: usize,
    s: usize,
    (sc, s_pad): (*mut f32, usize),
    mx: &mut [__m512; R],
) {
    let mut acc = [[_mm512_setzero_ps(); NP]; R];
    let blk = kt.add(j0 * D);
    for c in 0..D {
        let mut b = [_mm512_setzero_ps(); NP];
        for (i, bi) in b.iter_mut().enumerate() {
            *bi = _mm512_loadu_ps(blk.add(c * NP * P + i * P));
        }
        for (acc_r, qr) in acc.iter_mut().zip(q) {
            let a = _mm512_set1_ps(*qr.add(c));
            for (x, &bi) in acc_r.iter_mut().zip(&b) {
                *x = _mm512_fmadd_ps(a, bi, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (i, &x) in row.iter().enumerate() {
            let j = j0 + i * P;
            _mm512_storeu_ps(sc.add(r * s_pad + j), x);
            mx[r] = _mm512_mask_max_ps(mx[r], tail_mask(j, s), mx[r], x);
        }
    }
}

/// The lanes of the 16 keys from `j` that come before `s`.
#[inline(always)]
fn tail_mask(j: usize, s: usize) -> __mmask16 {
    match s.saturating_sub(j) {
        n if n >= P => 0xffff,
        n => ((1u32 << n) - 1) as __mmask16,
    }
}

/// `e^x` of each lane for `x <= 0`: [`crate::math::exp_approx`]'s polynomial, in
/// vectors, except that below -87 it gives `e^-87` rather than 0 (a probability that
/// small changes neither a row's sum, which is at least 1, nor its output).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let shift = _mm512_set1_ps(12_582_912.0);
    // `max` returns its second operand where either is NaN: a NaN stays NaN.
    let xc = _mm512_max_ps(_mm512_set1_ps(-87.0), x);
    let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E), shift);
    let n = _mm512_sub_ps(t, shift);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(
        _mm512_mul_ps(p, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    // 2^n from the integer in `t`'s low mantissa bits.
    let bits = _mm512_slli_epi32::<23>(_mm512_sub_epi32(
        _mm512_castps_si512(t),
        _mm512_set1_epi32(0x4B40_0000 - 127),
    ));
    _mm512_mul_ps(y, _mm512_castsi512_ps(bits))
}

/// `out[r] = sum_j p[r][j] v[j]` over `s` keys for `R` rows (`p` rows of `s_pad`, `v`
/// rows of [`D`]), each row then times `inv[r]`; only the first `rows` rows are written
/// (row stride `o_rs`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile(
    p: *const f32,
    s_pad: usize,
    v: *const f32,
    s: usize,
    inv: &[f32; R],
    out: *mut f32,
    o_rs: usize,
    rows: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for j in 0..s {
        let vr = v.add(j * D);
        let b = [
            _mm512_loadu_ps(vr),
            _mm512_loadu_ps(vr.add(16)),
            _mm512_loadu_ps(vr.add(32)),
            _mm512_loadu_ps(vr.add(48)),
        ];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*p.add(r * s_pad + j));
            for (x, &bi) in acc_r.iter_mut().zip(&b) {
                *x = _mm512_fmadd_ps(a, bi, *x);
            }
        }
    }
    for r in 0..rows.min(R) {
        let f = _mm512_set1_ps(inv[r]);
        for (i, &x) in acc[r].iter().enumerate() {
            _mm512_storeu_ps(out.add(r * o_rs + i * 16), _mm512_mul_ps(x, f));
        }
    }
}

/// Attention of `rows` query rows of one head over its `s` keys: `softmax(scale q k^T) v`
/// into `out` (row stride `o_rs`), each row's log-sum-exp of the scaled scores into
/// `lse`. `kv` is the buffer [`pack_head`] filled (its data starts at the buffer's
/// first cache line); `sc` is scratch.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]); `q` must hold `rows` rows of [`D`]
/// values at its stride, `out` `rows` rows at `o_rs`, `lse` at least `rows`.
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn head_rows(
    (q, q_rs): (*const f32, usize),
    kv: &[f32],
    s: usize,
    rows: usize,
    scale: f32,
    (out, o_rs): (*mut f32, usize),
    lse: &mut [f32],
    sc: &mut Vec<f32>,
) {
    let np = s.div_ceil(P);
    let s_pad = np * P;
    let kv = &kv[to_line(kv.as_ptr())..];
    assert!(kv.len() >= s_pad * D + s * D && lse.len() >= rows && s > 0);
    let (kt, v) = (kv.as_ptr(), kv.as_ptr().add(s_pad * D));
    sc.resize(R * s_pad + P, 0.0);
    let scp = sc.as_mut_ptr().add(to_line(sc.as_ptr()));
    for r0 in (0..rows).step_by(R) {
        let n = R.min(rows - r0);
        // A short last tile repeats its last row; those results are dropped.
        let qr: [*const f32; R] = std::array::from_fn(|r| q.add((r0 + r.min(n - 1)) * q_rs));
        let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); R];
        for p0 in (0..np).step_by(4) {
            let (j0, scr) = (p0 * P, (scp, s_pad));
            match np - p0 {
                1 => score_tile::<1>(&qr, kt, j0, s, scr, &mut mx),
                2 => score_tile::<2>(&qr, kt, j0, s, scr, &mut mx),
                3 => score_tile::<3>(&qr, kt, j0, s, scr, &mut mx),
                _ => score_tile::<4>(&qr, kt, j0, s, scr, &mut mx),
            }
        }
        // Probabilities in place, unnormalised (`p v` divides by the sums).
        let sv = _mm512_set1_ps(scale);
        let mut inv = [0f32; R];
        for r in 0..n {
            let max = _mm512_reduce_max_ps(mx[r]);
            let row = scp.add(r * s_pad);
            if max == f32::NEG_INFINITY {
                // Every score -inf (infinite inputs): a zero row, as the blocked path.
                std::ptr::write_bytes(row, 0, s_pad);
                lse[r0 + r] = f32::NEG_INFINITY;
                continue;
            }
            let ms = _mm512_set1_ps(max * scale);
            let mut sum = _mm512_setzero_ps();
            for j in (0..s_pad).step_by(P) {
                let e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(row.add(j)), sv, ms));
                _mm512_storeu_ps(row.add(j), e);
                sum = _mm512_mask_add_ps(sum, tail_mask(j, s), sum, e);
            }
            let sum = _mm512_reduce_add_ps(sum);
            inv[r] = 1.0 / sum;
            lse[r0 + r] = max * scale + sum.ln();
        }
        pv_tile(scp, s_pad, v, s, &inv, out.add(r0 * o_rs), o_rs, n);
    }
}
