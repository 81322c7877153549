//! The CBLAS engine (a library opened at run time; OpenBLAS unless `FARCER_TEST_BLAS`
//! names others, e.g. `openblas,mkl`) against a plain f64 product and the `gemm` crate,
//! its calibration table, and the model's fused kernels run on it against candle's ops
//! (`farcer selftest`'s checks, which share no GEMM with the kernels). The suite's
//! process sends every product to the library.

mod common;
use farcer::selftest;
use farcer_kernels::blas::{self, Choice, Engine};
use farcer_kernels::gemm::matmul_on;

fn libs() -> Vec<String> {
    std::env::var("FARCER_TEST_BLAS")
        .unwrap_or_else(|_| "openblas".into())
        .split(',')
        .map(str::to_string)
        .collect()
}

fn opened() -> Vec<&'static blas::Cblas> {
    libs()
        .iter()
        .map(|l| blas::open(l).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Values that make a wrong index or a missed row visible.
fn fill(len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7 + salt * 13) % 101) as f32 - 50.0) * 0.01)
        .collect()
}

/// Every layout, with and without accumulation, with the rows split across threads
/// (m > n), the columns split (n > m), a single block and a 1x1 product: equal to an f64
/// product to 1e-5 of its scale, and to the crate's result.
fn blas_products_equal_a_plain_product() {
    for lib in opened() {
        for (m, n, k) in [
            (300, 40, 129),
            (37, 300, 65),
            (128, 960, 576),
            (1, 1, 1),
            (5, 3, 2),
        ] {
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                for acc in [false, true] {
                    let (a, b, c0) = (fill(m * k, 1), fill(k * n, 2), fill(m * n, 3));
                    let at = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] };
                    let bt = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] };
                    let mut want = vec![0f64; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = if acc { c0[i * n + j] as f64 } else { 0.0 };
                            for p in 0..k {
                                s += at(i, p) as f64 * bt(p, j) as f64;
                            }
                            want[i * n + j] = s;
                        }
                    }
                    let scale = want.iter().fold(1e-3f64, |s, v| s.max(v.abs()));
                    // The library must take every layout (a silent fall-back to the crate
                    // would pass the comparisons below).
                    let (a_rs, a_cs) = if a_t { (1, m) } else { (k, 1) };
                    let (b_rs, b_cs) = if b_t { (1, k) } else { (n, 1) };
                    assert!(
                        blas::cblas_layout(m, n, k, n, a_rs, a_cs, b_rs, b_cs).is_some(),
                        "CBLAS cannot say m={m} n={n} k={k} a_t={a_t} b_t={b_t}"
                    );
                    let mut got = if acc {
                        c0.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    let mut crate_ = got.clone();
                    matmul_on(Engine::Blas(lib), &a, a_t, &b, b_t, &mut got, acc, m, n, k);
                    matmul_on(Engine::Crate, &a, a_t, &b, b_t, &mut crate_, acc, m, n, k);
                    let diff = |x: &[f32]| {
                        x.iter()
                            .zip(&want)
                            .map(|(g, w)| (*g as f64 - w).abs())
                            .fold(0f64, f64::max)
                    };
                    let what = format!(
                        "{} m={m} n={n} k={k} a_t={a_t} b_t={b_t} acc={acc}",
                        lib.name
                    );
                    assert!(
                        diff(&got) <= 1e-5 * scale,
                        "{what}: {} of {scale}",
                        diff(&got)
                    );
                    assert!(diff(&crate_) <= 1e-5 * scale, "crate, {what}");
                }
            }
        }
    }
}

/// A calibration's table reads back as the same choice; text that is not a table (or
/// names a library the choice does not have) is refused.
fn calibration_table_reads_back() {
    let libs = opened();
    let (c, ratios) = Choice::calibrate(&libs, 1);
    // Three layouts x six (rows, inner) classes per library, and six forward classes.
    assert_eq!(ratios.len(), 18 * libs.len() + 6, "{ratios:?}");
    assert!(
        ratios.iter().all(|(_, r)| r.is_finite() && *r > 0.0),
        "{ratios:?}"
    );
    let text = c.table_text();
    let back = Choice::from_table_text(&libs, &text).expect("its own table");
    assert_eq!(back.table_text(), text);
    assert_eq!(back.describe(), c.describe());
    let zeros = |n| "0".repeat(n);
    let all = Choice::from_table_text(&libs, &format!("{} {}", "1".repeat(24), zeros(6)));
    let all = all.unwrap().describe();
    assert!(all.ends_with("for every product"), "{all}");
    assert!(!all.contains("forwards"), "{all}");
    // Each position of the text is its own class: one '1' names exactly one class,
    // and no two positions name the same one; the same for the forward's classes.
    let mut seen = std::collections::HashSet::new();
    for i in 0..24 {
        let mut t = vec![b'0'; 24];
        t[i] = b'1';
        let t = format!("{} {}", String::from_utf8(t).unwrap(), zeros(6));
        let one = Choice::from_table_text(&libs, &t).unwrap();
        let d = one.describe();
        let classes = d.split(" for ").nth(1).unwrap().split("; ").next().unwrap();
        assert!(!classes.contains(", "), "{i}: {d}");
        assert!(seen.insert(classes.to_string()), "{i} repeats {classes}");
        assert_eq!(one.table_text(), t);
    }
    let mut seen = std::collections::HashSet::new();
    for i in 0..6 {
        let mut f = vec![b'0'; 6];
        f[i] = b'1';
        let t = format!("{} {}", zeros(24), String::from_utf8(f).unwrap());
        let d = Choice::from_table_text(&libs, &t).unwrap().describe();
        let classes = d
            .split("forwards read weights as stored for ")
            .nth(1)
            .unwrap();
        assert!(!classes.contains(", "), "{i}: {d}");
        assert!(seen.insert(classes.to_string()), "{i} repeats {classes}");
    }
    assert!(Choice::from_table_text(&libs, "0101 000000").is_none());
    assert!(Choice::from_table_text(&libs, &zeros(24)).is_none());
    let past = char::from(b'1' + libs.len() as u8).to_string();
    assert!(Choice::from_table_text(&libs, &format!("{} {}", past.repeat(24), zeros(6))).is_none());
    assert!(Choice::from_table_text(&libs, &format!("{} {}", zeros(24), "2".repeat(6))).is_none());
}

/// The fused kernels' forward and backward with every product on the library agree with
/// candle's op-by-op path (logits, input and adapter gradients within selftest's f32
/// tolerance).
fn model_kernels_on_the_library_match_candle() {
    let lib = blas::choice()
        .lib()
        .expect("the suite sends every product to the library");
    let r = selftest::run(&candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    assert!(r.passed(), "{} : {:?}", lib.name, r.checks);
}

fn main() -> std::process::ExitCode {
    let available = || libs().iter().all(|l| blas::open(l).is_ok());
    if available() {
        blas::set_choice(Choice::everywhere(blas::open(&libs()[0]).unwrap()));
    }
    let what = format!(
        "CBLAS library {} (scripts/setup installs OpenBLAS)",
        libs().join(",")
    );
    common::harness::main(tests![
        blas_products_equal_a_plain_product.needs(&what, available),
        calibration_table_reads_back.needs(&what, available),
        model_kernels_on_the_library_match_candle.needs(&what, available),
    ])
}
