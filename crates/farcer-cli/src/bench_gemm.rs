//! `farcer bench --gemm`: the `gemm` crate against CBLAS libraries on the model's own
//! product shapes (what decides `FARCER_GEMM`).

use farcer_kernels::blas::{self, Engine};
use farcer_kernels::gemm::time_gemm;
use serde::Serialize;

/// One product: rows `m`, output width `n`, inner size `k`; `a_t`/`b_t`: stored
/// transposed (the backward's layouts).
#[derive(Clone, Copy, Serialize)]
pub struct Shape {
    pub what: &'static str,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_t: bool,
    pub b_t: bool,
}

/// SmolLM2-135M's and the ViTs' products at the rows the benchmark cases use: forward
/// (weights stored `(in, out)`), the backward's input gradient (weights as stored on
/// disk, `(out, in)`, read transposed), and `x @ w^T` with the weight as stored.
pub fn shapes() -> Vec<Shape> {
    let mut v = Vec::new();
    let s = |what, m, n, k, a_t, b_t| Shape {
        what,
        m,
        n,
        k,
        a_t,
        b_t,
    };
    for m in [128, 512, 2048] {
        v.push(s("llm qkv fwd", m, 960, 576, false, false));
        v.push(s("llm o fwd", m, 576, 576, false, false));
        v.push(s("llm gate+up fwd", m, 3072, 576, false, false));
        v.push(s("llm down fwd", m, 576, 1536, false, false));
        v.push(s("llm down bwd (dY W)", m, 1536, 576, false, false));
        v.push(s("llm gate+up bwd (dY W)", m, 576, 3072, false, false));
        v.push(s("llm qkv x W^T", m, 960, 576, false, true));
        v.push(s("llm weight grad (X^T dY)", 576, 960, m, true, false));
    }
    // The LM head at a few answer tokens: memory-bound, it streams the 49152 x 576
    // embedding (113 MB in f32) once forward and once backward.
    v.push(s("llm lm head (h E^T)", 4, 49152, 576, false, true));
    v.push(s("llm lm head bwd (dL E)", 4, 576, 49152, false, false));
    for (what, m, d, f) in [("vit-s", 2056, 384, 1536), ("vit-b", 1576, 768, 3072)] {
        v.push(s(what, m, 3 * d, d, false, false));
        v.push(s(what, m, f, d, false, false));
        v.push(s(what, m, d, f, false, false));
    }
    v
}

#[derive(Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub shape: Shape,
    /// GFLOP/s per engine, in the order of `engines`.
    pub gflops: Vec<f64>,
}

#[derive(Serialize)]
pub struct Report {
    pub engines: Vec<String>,
    pub threads: usize,
    pub rows: Vec<Row>,
    /// The LM head's two products read from Q8_0 blocks (as the model runs them):
    /// (what, GFLOP/s, milliseconds per pass).
    pub q8_lm_head: Vec<(String, f64, f64)>,
}

/// The LM head's products at 4 answer tokens with the weight in Q8_0 blocks (SmolLM2's
/// 49152 x 576 embeddings; the values do not matter to the time), best of `reps` after
/// a warm-up, on the process's GEMM choice.
fn q8_lm_head(reps: usize) -> Vec<(String, f64, f64)> {
    use farcer_kernels::quant::{Q8_BLOCK, Q8_BYTES};
    let (rows, cols, n) = (49152, 576, 4);
    let mut data = Vec::with_capacity(rows * cols / Q8_BLOCK * Q8_BYTES);
    for b in 0..rows * cols / Q8_BLOCK {
        data.extend_from_slice(&0x2e66u16.to_le_bytes());
        data.extend((0..Q8_BLOCK).map(|j| ((b + j) % 200) as u8));
    }
    let w = farcer_kernels::Q8Matrix::new(&data, rows, cols).expect("whole blocks");
    let x = vec![0.5f32; n * cols];
    let g = vec![0.25f32; n * rows];
    let flop = 2.0 * (n * rows * cols) as f64;
    let best = |f: &dyn Fn()| {
        f();
        (0..reps.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let fwd = best(&|| {
        std::hint::black_box(farcer_kernels::q8_matmul_nt(&x, n, w));
    });
    let bwd = best(&|| {
        std::hint::black_box(farcer_kernels::q8_matmul_nn(&g, n, w));
    });
    vec![
        (
            "llm lm head (h E^T), Q8_0".into(),
            flop / fwd / 1e9,
            fwd * 1e3,
        ),
        (
            "llm lm head bwd (dL E), Q8_0".into(),
            flop / bwd / 1e9,
            bwd * 1e3,
        ),
    ]
}

/// Times every shape on the crate and on each library in `libs` (short names or paths).
pub fn run(libs: &[String], reps: usize, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut engines = vec![Engine::Crate];
    for l in libs {
        match blas::open(l) {
            Ok(c) => engines.push(Engine::Blas(c)),
            Err(e) => eprintln!("skipped: {e}"),
        }
    }
    let names: Vec<String> = engines.iter().map(|e| e.name()).collect();
    println!("| shape | m | n | k | layout | {} |", names.join(" | "));
    println!("|---|---:|---:|---:|---|{}", "---:|".repeat(names.len()));
    let mut rows = Vec::new();
    for sh in shapes() {
        let flop = 2.0 * (sh.m * sh.n * sh.k) as f64;
        let gflops: Vec<f64> = engines
            .iter()
            .map(|&e| flop / time_gemm(e, sh.m, sh.n, sh.k, sh.a_t, sh.b_t, reps) / 1e9)
            .collect();
        let best = gflops.iter().cloned().fold(0.0, f64::max);
        let cells: Vec<String> = gflops
            .iter()
            .map(|g| {
                if *g == best {
                    format!("**{g:.0}**")
                } else {
                    format!("{g:.0}")
                }
            })
            .collect();
        let layout = format!(
            "{}{}",
            if sh.a_t { "T" } else { "N" },
            if sh.b_t { "T" } else { "N" }
        );
        println!(
            "| {} | {} | {} | {} | {layout} | {} |",
            sh.what,
            sh.m,
            sh.n,
            sh.k,
            cells.join(" | ")
        );
        rows.push(Row { shape: sh, gflops });
    }
    let q8 = q8_lm_head(reps);
    println!("\nThe LM head from Q8_0 blocks (4 answer tokens; as the model reads it):\n");
    println!("| product | GFLOP/s | ms per pass |\n|---|---:|---:|");
    for (what, gf, ms) in &q8 {
        println!("| {what} | {gf:.0} | {ms:.2} |");
    }
    if let Some(p) = json {
        let r = Report {
            engines: names,
            threads: rayon::current_num_threads(),
            rows,
            q8_lm_head: q8,
        };
        farcer::util::write_atomic(p, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    Ok(())
}
