//! Vectorisable `exp`, `erf`, lane sums and element-wise adds: libm's scalar calls and
//! index-checked loops would stop the loops around them from vectorising.

/// `a b + c`: one fused instruction in the builds that have it (`FMA`, see
/// `multiversion!`), a multiply and an add elsewhere, where `mul_add` would be a libm
/// call per value.
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` to about 2 ulp on [-87, 88], 0 below; a branch-free polynomial (Cephes'
/// `expf`) that the compiler vectorises, unlike libm's scalar call.
#[inline(always)]
pub(crate) fn exp_approx<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let xc = x.clamp(-87.0, 88.0);
    // `t` holds round(xc log2 e) in its low mantissa bits: the integer for the exponent
    // comes from the bits (an `as i32` conversion would not vectorise).
    let f = fmadd::<FMA>;
    let t = f(xc, LOG2E, SHIFT);
    let n = t - SHIFT;
    let r = f(-n, 0.693_359_4, xc);
    let r = f(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4_f32;
    p = f(p, r, 1.398_199_9e-3);
    p = f(p, r, 8.333_452e-3);
    p = f(p, r, 4.166_579_6e-2);
    p = f(p, r, 1.666_666_5e-1);
    p = f(p, r, 0.5);
    let y = f(p * r, r, r + 1.0);
    let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// `erf(x)` to about 2e-7 (Abramowitz & Stegun 7.1.26 with a vectorisable `exp`).
#[inline(always)]
pub(crate) fn erf_approx<const FMA: bool>(x: f32) -> f32 {
    let f = fmadd::<FMA>;
    let a = x.abs();
    let t = 1.0 / f(0.327_591_1, a, 1.0);
    let mut poly = 1.061_405_4f32;
    poly = f(poly, t, -1.453_152_1);
    poly = f(poly, t, 1.421_413_7);
    poly = f(poly, t, -0.284_496_74);
    poly = f(poly, t, 0.254_829_6);
    let y = f(-poly * t, exp_approx::<FMA>(-a * a), 1.0);
    y.copysign(x)
}

multiversion! {
    /// `acc += x`, element by element.
    pub(crate) fn add_into(acc: &mut [f32], x: &[f32]) {
        for (a, x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    }
}

/// Sum of `x` in 16 lanes: a plain `iter().sum()` keeps the strict order of the adds and
/// so one scalar add per value; lanes let the compiler use whole vectors.
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32]) -> f32 {
    lane_fold([x], |[v]| v)
}

/// `sum(a * b)` in 16 lanes (see [`lane_sum`]).
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    lane_fold([a, &b[..a.len()]], |[a, b]| a * b)
}

/// `sum(f(xs[0][i], xs[1][i], ...))` over the first slice's length (the others at least
/// as long: a shorter one panics, as an index would): lane `l` adds the
/// values at `l`, `l + 16`, ..., then the lanes are summed, then the tail. Each step reads
/// 16-value arrays, so no index is checked inside and the lanes become one vector.
#[inline(always)]
pub(crate) fn lane_fold<const K: usize>(xs: [&[f32]; K], f: impl Fn([f32; K]) -> f32) -> f32 {
    let n = xs.first().map_or(0, |x| x.len());
    let body = n / 16 * 16;
    let mut acc = [0f32; 16];
    for c in (0..body).step_by(16) {
        let blocks: [&[f32; 16]; K] =
            std::array::from_fn(|j| xs[j][c..c + 16].try_into().expect("16 values"));
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(std::array::from_fn(|j| blocks[j][l]));
        }
    }
    let tail: f32 = (body..n)
        .map(|i| f(std::array::from_fn(|j| xs[j][i])))
        .sum();
    acc.iter().sum::<f32>() + tail
}
