//! Our Llama forward against transformers on a tiny random checkpoint (GQA, Llama-3 rope
//! scaling, untied head), and the consistency of the cached, packed and training paths.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::*;
use farcer::decode::{self, LabelTokens};
use farcer::model::frozen::Backend;
use farcer::model::llama::Positions;
use farcer::model::load_llm;

/// transformers' logits, f32 throughout: we require agreement to 1e-4.
const TOL: f32 = 1e-4;

fn tiny() -> farcer::model::Llm {
    load_llm(
        fixture("tiny-llama").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// The tiny Llama on each path: the fused f32 CPU kernels, and candle's op-by-op path (what
/// a GPU runs) in f32 and in bf16.
fn paths() -> Vec<(&'static str, farcer::model::Llm)> {
    let at = |dtype: DType| {
        load_llm(fixture("tiny-llama").to_str().unwrap(), &Device::Cpu, dtype).unwrap()
    };
    let mut candle = at(DType::F32);
    candle.model = candle.model.clone().with_backend(Backend::Candle).unwrap();
    vec![
        ("kernels f32", tiny()),
        ("candle f32", candle),
        ("candle bf16", at(DType::BF16)),
    ]
}

/// Tolerance of a path against an f32 reference, relative to the largest value (at least
/// 1): f32 1e-4, bf16 3e-2 (8 bits of mantissa through two layers).
fn tol(path: &str) -> f32 {
    if path.ends_with("bf16") {
        3e-2
    } else {
        TOL
    }
}

/// Largest difference relative to the reference's largest value (at least 1), in f32.
fn rel_diff(a: &Tensor, reference: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    max_abs_diff(&a, reference) / max_abs(reference).max(1.0)
}

/// Against transformers, on every path; each position's most likely token too.
#[test]
fn tiny_llama_logits_match_transformers() {
    let f = load_safetensors("tiny-llama-logits.safetensors");
    let ids = ids_of(&f["ids"]);
    for (path, llm) in paths() {
        let logits = logits_at_every_position(&llm, &ids);
        let d = rel_diff(&logits, &f["logits"]);
        assert!(d <= tol(path), "{path}: logits differ by {d} (relative)");
        let ours = logits.to_dtype(DType::F32).unwrap().argmax(1).unwrap();
        let theirs = f["logits"].argmax(1).unwrap();
        assert_eq!(
            ours.to_vec1::<u32>().unwrap(),
            theirs.to_vec1::<u32>().unwrap(),
            "{path}: argmax"
        );
    }
    let llm = tiny();
    assert!(
        llm.model.config.rope_scaling.is_some(),
        "fixture exercises llama3 rope scaling"
    );
    assert_eq!(
        llm.model.config.num_kv_heads * 2,
        llm.model.config.num_heads,
        "fixture exercises GQA"
    );
}

#[test]
fn bf16_sharded_checkpoint_loads_and_matches() {
    let llm = load_llm(
        fixture("tiny-llama-bf16").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let f = load_safetensors("tiny-llama-bf16-logits.safetensors");
    let ids = ids_of(&f["ids"]);
    let d = max_abs_diff(&logits_at_every_position(&llm, &ids), &f["logits"]);
    assert!(d <= TOL, "max abs logit difference {d} > {TOL}");
}

/// On every path: prefill then one token at a time gives the full pass's logits (f32: to
/// 1e-5 of the largest; bf16: to 3e-2, the rounding of another summation order).
#[test]
fn kv_cache_and_logit_selection_agree_with_one_full_pass() {
    for (path, llm) in paths() {
        let tol = if path.ends_with("bf16") { 3e-2 } else { 1e-5 };
        cache_agrees(path, &llm, tol);
    }
}

fn cache_agrees(path: &str, llm: &farcer::model::Llm, tol: f32) {
    let ids: Vec<u32> = (0..30).map(|i| (i * 13 + 5) % 260).collect();
    let x = llm.model.embed(&ids).unwrap().unsqueeze(0).unwrap();
    let all: Vec<usize> = (0..30).collect();
    let full = llm
        .model
        .forward(&x, &mut llm.model.new_cache(), &Positions::default(), &all)
        .unwrap()
        .unwrap();
    // Prefill 20, then one at a time.
    let mut cache = llm.model.new_cache();
    let first = llm
        .model
        .forward(
            &x.narrow(1, 0, 20).unwrap(),
            &mut cache,
            &Positions::default(),
            &[3, 19],
        )
        .unwrap()
        .unwrap();
    let full = full.to_dtype(DType::F32).unwrap();
    assert!(
        rel_diff(&first.i((0, 0)).unwrap(), &full.i((0, 3)).unwrap()) <= tol,
        "{path}"
    );
    assert!(
        rel_diff(&first.i((0, 1)).unwrap(), &full.i((0, 19)).unwrap()) <= tol,
        "{path}"
    );
    for t in 20..30 {
        let step = llm
            .model
            .forward(
                &x.narrow(1, t, 1).unwrap(),
                &mut cache,
                &Positions::default(),
                &[0],
            )
            .unwrap()
            .unwrap();
        let d = rel_diff(&step.i((0, 0)).unwrap(), &full.i((0, t)).unwrap());
        assert!(d <= tol, "{path}: position {t}: {d}");
    }
    assert_eq!(cache.len(), 30);
}

#[test]
fn packed_constrained_scoring_equals_scoring_each_label_alone() {
    let llm = tiny();
    let labels: Vec<String> = ["neutral", "joy", "anger", "the end"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cands = LabelTokens::new(&llm, &labels).unwrap();
    assert!(
        cands.seqs.iter().any(|s| s.len() > 3),
        "labels of several tokens"
    );
    let prompt_ids = llm.tokenizer.encode("<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n").unwrap();
    let prompt = llm.model.embed(&prompt_ids).unwrap().unsqueeze(0).unwrap();
    let plain = decode::constrained_plain(&llm, &prompt, &cands).unwrap();
    // The whole prompt as the query on an empty cache, and its last tokens as the query
    // after a cache of the rest: both equal the labels scored one by one.
    let t = prompt_ids.len();
    let mut cache = llm.model.new_cache();
    llm.model
        .forward(
            &prompt.narrow(1, 0, t - 3).unwrap(),
            &mut cache,
            &Positions::default(),
            &[],
        )
        .unwrap();
    let tail = prompt.narrow(1, t - 3, 3).unwrap();
    for (cache, query) in [(llm.model.new_cache(), &prompt), (cache.clone(), &tail)] {
        let fast = decode::score_labels(&llm.model, &cache, query, &cands).unwrap();
        let probs = fast.probs.unwrap();
        for (a, b) in probs.iter().zip(&plain) {
            assert!((a - b).abs() <= 1e-4, "{probs:?} vs {plain:?}");
        }
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
    assert_eq!(cache.len(), t - 3, "scoring adds nothing to the cache");

    // Several queries, each after its own cache (concurrent sessions) or after the same
    // one (concurrent requests after one prompt prefix), in one pass: each gets what it
    // gets alone, on the fused kernels and on candle's op-by-op path (what a GPU runs).
    let mut short = llm.model.new_cache();
    llm.model
        .forward(
            &prompt.narrow(1, 0, t - 6).unwrap(),
            &mut short,
            &Positions::default(),
            &[],
        )
        .unwrap();
    let empty = llm.model.new_cache();
    let q = |n: usize| prompt.narrow(1, t - n, n).unwrap();
    let (q1, q3, q6, q2) = (q(1), q(3), q(6), q(2));
    let queries = [
        (&cache, &q1),
        (&empty, &prompt),
        (&short, &q6),
        (&cache, &q3),
        (&cache, &q2),
    ];
    for backend in [Backend::Kernels, Backend::Candle] {
        let mut llm = tiny();
        llm.model = llm.model.clone().with_backend(backend).unwrap();
        let packed = decode::score_label_queries(&llm.model, &queries, &cands).unwrap();
        assert_eq!(packed.len(), queries.len());
        for ((c, q), p) in queries.iter().zip(&packed) {
            let alone = decode::score_labels(&llm.model, c, q, &cands).unwrap();
            assert_eq!(p.label, alone.label);
            for (a, b) in p.probs.as_ref().unwrap().iter().zip(alone.probs.unwrap()) {
                assert!((a - b).abs() <= 1e-5, "{backend:?}: {p:?} vs alone");
            }
        }
        assert_ne!(
            packed[0].probs, packed[3].probs,
            "different queries get different answers"
        );
        // The whole prompt on an empty cache and its last 6 tokens after the rest are
        // the same question.
        for (a, b) in packed[1]
            .probs
            .iter()
            .flatten()
            .zip(packed[2].probs.iter().flatten())
        {
            assert!((a - b).abs() <= 1e-4, "{backend:?}: {packed:?}");
        }
        assert_eq!((cache.len(), short.len(), empty.len()), (t - 3, t - 6, 0));
    }

    // Non-finite inputs (a NaN in the query) are an error naming a label, not a panic
    // and not an arbitrary answer.
    let nan = (tail * f64::NAN).unwrap();
    let e = decode::score_labels(&llm.model, &cache, &nan, &cands).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
}

/// Model configs whose sizes would divide by zero or index out of range in a forward are
/// refused when read: zero or inconsistent heads, odd head sizes, bad patch sizes.
#[test]
fn unusable_model_configs_are_refused_when_read() {
    let llama = |extra: &str| {
        let text = format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 32{extra}}}"#
        );
        serde_json::from_str::<farcer::model::llama::LlamaConfig>(&text)
            .unwrap()
            .into_config()
    };
    assert!(llama(r#", "num_attention_heads": 4, "num_key_value_heads": 2"#).is_ok());
    for (extra, want) in [
        (r#", "num_attention_heads": 0"#, "num_attention_heads is 0"),
        (
            r#", "num_attention_heads": 4, "num_key_value_heads": 0"#,
            "num_key_value_heads is 0",
        ),
        (
            r#", "num_attention_heads": 4, "num_key_value_heads": 3"#,
            "not a multiple",
        ),
        (r#", "num_attention_heads": 5"#, "not a multiple"),
        (r#", "num_attention_heads": 4, "head_dim": 15"#, "odd"),
        (
            r#", "num_attention_heads": 4, "rope_theta": -1.0"#,
            "rope_theta",
        ),
    ] {
        let e = llama(extra).unwrap_err();
        assert!(e.contains(want), "{extra}: {e}");
    }
    let vit = |extra: &str| {
        let text = format!(
            r#"{{"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128{extra}}}"#
        );
        serde_json::from_str::<farcer::model::vit::ViTConfig>(&text)
            .unwrap()
            .validate()
    };
    assert!(vit(r#", "num_attention_heads": 4"#).is_ok());
    for (extra, want) in [
        (r#", "num_attention_heads": 0"#, "num_attention_heads is 0"),
        (r#", "num_attention_heads": 5"#, "not a multiple"),
        (
            r#", "num_attention_heads": 4, "patch_size": 0"#,
            "patch_size is 0",
        ),
        (
            r#", "num_attention_heads": 4, "image_size": 30, "patch_size": 16"#,
            "not a multiple of patch_size",
        ),
    ] {
        let e = vit(extra).unwrap_err();
        assert!(e.contains(want), "{extra}: {e}");
    }
}

#[test]
fn training_path_gives_the_same_logits_and_input_gradients() {
    let llm = tiny();
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 1) % 260).collect();
    let emb = llm.model.embed(&ids).unwrap().unsqueeze(0).unwrap();
    let at: Vec<usize> = (0..12).collect();
    let fused = llm
        .model
        .forward(&emb, &mut llm.model.new_cache(), &Positions::default(), &at)
        .unwrap()
        .unwrap();
    let var = Var::from_tensor(&emb).unwrap();
    let slow = llm
        .model
        .forward(
            var.as_tensor(),
            &mut llm.model.new_cache(),
            &Positions::default(),
            &at,
        )
        .unwrap()
        .unwrap();
    assert!(max_abs_diff(&fused, &slow) <= 1e-5);
    // Finite differences on one input coordinate of a scalar loss.
    let w = Tensor::arange(0f32, (12 * 268) as f32, &Device::Cpu)
        .unwrap()
        .reshape((1, 12, 268))
        .unwrap()
        .affine(1e-3, -1.0)
        .unwrap()
        .sin()
        .unwrap();
    let loss = |x: &Tensor| -> f64 {
        let l = llm
            .model
            .forward(x, &mut llm.model.new_cache(), &Positions::default(), &at)
            .unwrap()
            .unwrap();
        (l * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let l = llm
        .model
        .forward(
            var.as_tensor(),
            &mut llm.model.new_cache(),
            &Positions::default(),
            &at,
        )
        .unwrap()
        .unwrap();
    let grads = (l * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads
        .get(&var)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let base = emb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for &k in &[5usize, 64 * 3 + 17, 64 * 11 + 63] {
        let h = 1e-2f32;
        let mut p = base.clone();
        p[k] += h;
        let mut m = base.clone();
        m[k] -= h;
        let tp = Tensor::from_vec(p, emb.shape(), &Device::Cpu).unwrap();
        let tm = Tensor::from_vec(m, emb.shape(), &Device::Cpu).unwrap();
        let fd = (loss(&tp) - loss(&tm)) / (2.0 * h as f64);
        let rel = (fd - g[k] as f64).abs() / fd.abs().max(1e-2);
        assert!(
            rel < 2e-2,
            "coordinate {k}: finite difference {fd} vs gradient {}",
            g[k]
        );
    }
}

/// Each frozen layer as one fused op (the default on the CPU) against candle's op-by-op path:
/// logits and input gradients, after a cached prefix and with a non-causal mask (rows may
/// see one later position, as packed label scoring does).
#[test]
fn fused_layers_match_the_op_by_op_path() {
    let llm = tiny();
    let dev = Device::Cpu;
    let prefix: Vec<u32> = (0..5).map(|i| (i * 11 + 3) % 260).collect();
    let ids: Vec<u32> = (0..9).map(|i| (i * 7 + 1) % 260).collect();
    let (p, t) = (prefix.len(), ids.len());
    let allowed: Vec<Vec<bool>> = (0..t)
        .map(|r| {
            (0..p + t)
                .map(|c| c <= p + r || (r == 3 && c == p + 5))
                .collect()
        })
        .collect();
    let mask = farcer::model::llama::mask_from_allowed(&allowed, &dev, DType::F32).unwrap();
    let w = logit_weights(t, true);
    let pos = Positions {
        ids: None,
        mask: Some(&mask),
        grad_from: 0,
    };
    let at: Vec<usize> = (0..t).collect();
    let run = |fused: bool| {
        let (l, x) = forward_after_prefix(&llm, fused, &prefix, &ids, &pos, &at);
        let g = (&l * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (l, g.get(&x).unwrap().clone())
    };
    let (lf, gf) = run(true);
    let (ls, gs) = run(false);
    let (dl, dg) = (max_abs_diff(&lf, &ls), max_abs_diff(&gf, &gs));
    assert!(dl <= 1e-5 && dg <= 1e-4, "logits {dl}, gradients {dg}");
    assert!(
        gs.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-3
    );
}

/// With `grad_from`, the fused backward skips the rows before it: the input gradient of
/// every later row is what the full backward on candle's ops gives, the skipped rows get
/// exactly zero (so the skip was taken), and where skipping would change a gradient (a
/// mask that lets an early row see a later one, or adapters) every row is computed.
#[test]
fn gradient_rows_before_grad_from_are_skipped_without_changing_the_rest() {
    let llm = tiny();
    let dev = Device::Cpu;
    let prefix: Vec<u32> = vec![3, 17, 42, 5];
    let ids: Vec<u32> = (0..12).map(|i| (i * 11 + 2) % 260).collect();
    let (p, t, g) = (prefix.len(), ids.len(), 5);
    // Logits at every row, so that no layer keeps only some rows (which computes every
    // row's gradient itself) and each layer's skip is seen.
    let at: Vec<usize> = (0..t).collect();
    let w = logit_weights(t, false);
    let grad = |llm: &farcer::model::Llm, fused: bool, pos: &Positions| {
        let (l, x) = forward_after_prefix(llm, fused, &prefix, &ids, pos, &at);
        let gs = (&l * &w).unwrap().sum_all().unwrap().backward().unwrap();
        gs.get(&x).unwrap().i(0).unwrap()
    };
    let rows_norm =
        |x: &Tensor, r: std::ops::Range<usize>| max_abs(&x.narrow(0, r.start, r.len()).unwrap());
    let check = |llm: &farcer::model::Llm, mask: Option<&Tensor>, skipped: bool| {
        let full = grad(
            llm,
            false,
            &Positions {
                mask,
                ..Default::default()
            },
        );
        let part = grad(
            llm,
            true,
            &Positions {
                mask,
                grad_from: g,
                ..Default::default()
            },
        );
        let tail = |x: &Tensor| x.narrow(0, g, t - g).unwrap();
        let d = max_abs_diff(&tail(&part), &tail(&full)) / max_abs(&full).max(1.0);
        assert!(d <= 1e-4, "later rows' gradients differ by {d} (relative)");
        assert!(rows_norm(&full, 0..g) > 1e-4, "early rows carry gradient");
        if skipped {
            assert_eq!(rows_norm(&part, 0..g), 0.0, "early rows skipped");
        } else {
            let d = max_abs_diff(&part, &full) / max_abs(&full).max(1.0);
            assert!(d <= 1e-4, "every row computed: differs by {d}");
        }
    };
    // Causal: skipped.
    check(&llm, None, true);
    // Row 2 sees row 7 (after `g`): its state depends on later rows, so nothing is skipped.
    let allowed: Vec<Vec<bool>> = (0..t)
        .map(|r| {
            (0..p + t)
                .map(|c| c <= p + r || (r == 2 && c == p + 7))
                .collect()
        })
        .collect();
    let leaky = farcer::model::llama::mask_from_allowed(&allowed, &dev, DType::F32).unwrap();
    check(&llm, Some(&leaky), false);
    // A mask that keeps early rows among themselves (a packed branch before `g`): skipped.
    let allowed: Vec<Vec<bool>> = (0..t)
        .map(|r| {
            (0..p + t)
                .map(|c| c <= p + r && !(r >= 3 && c == p + 1))
                .collect()
        })
        .collect();
    let sealed = farcer::model::llama::mask_from_allowed(&allowed, &dev, DType::F32).unwrap();
    check(&llm, Some(&sealed), true);
    // Adapters take gradient from every row: nothing is skipped.
    let mut with_lora = tiny();
    with_lora
        .model
        .add_lora(&farcer::model::lora::LoraConfig::default(), 1)
        .unwrap();
    check(&with_lora, None, false);
    // An adapter on the first layer only: the layer above it has none, but its skipped
    // rows would hand the adapter zeros, so it computes every row too.
    let mut low_lora = tiny();
    let (out_dim, in_dim) = (64, 64);
    let cfg = farcer::model::lora::LoraConfig::default();
    let lora = farcer::model::lora::LoraLinear::new(&cfg, in_dim, out_dim, 2, "q", &dev).unwrap();
    low_lora.model.set_lora(0, "q_proj", lora).unwrap();
    check(&low_lora, None, false);
}

/// Asked for logits at a few positions (out of order, one twice), the fused path's last
/// layer carries only those rows past its keys and values: the logits and every row's
/// input gradient still equal candle's op-by-op path, which computes every row.
#[test]
fn last_layer_on_the_asked_rows_only_changes_nothing() {
    let llm = tiny();
    let prefix: Vec<u32> = vec![9, 4, 77];
    let ids: Vec<u32> = (0..11).map(|i| (i * 13 + 5) % 260).collect();
    let at = [9, 2, 9, 5];
    let w = logit_weights(at.len(), true);
    let run = |fused: bool| {
        let (l, x) = forward_after_prefix(&llm, fused, &prefix, &ids, &Positions::default(), &at);
        let g = (&l * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (l, g.get(&x).unwrap().clone())
    };
    let (lf, gf) = run(true);
    let (ls, gs) = run(false);
    assert_eq!(lf.dims(), &[1, at.len(), 268]);
    let (dl, dg) = (max_abs_diff(&lf, &ls), max_abs_diff(&gf, &gs));
    assert!(
        dl <= 1e-5 && dg <= 1e-4 * max_abs(&gs).max(1.0),
        "logits {dl}, gradients {dg}"
    );
    // Every row before the last asked one carries gradient (through keys and values).
    for r in 0..10 {
        assert!(max_abs(&gs.i((0, r)).unwrap()) > 1e-5, "row {r}");
    }
    // A position past the end is refused before anything runs.
    let x = llm.model.embed(&ids).unwrap().unsqueeze(0).unwrap();
    let err = llm
        .model
        .forward(
            &x,
            &mut llm.model.new_cache(),
            &Positions::default(),
            &[3, 11],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("position 11 of 11"), "{err}");
}
