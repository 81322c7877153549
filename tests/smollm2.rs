//! The real default LLM (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading
//! the same GGUF, and its tokenizer rebuilt from GGUF metadata.

mod common;
use candle_core::{DType, Device, IndexOp};
use common::*;
use farcer::model::llama::Positions;

fn llm() -> Option<farcer::model::Llm> {
    let p = default_llm()?;
    Some(farcer::model::load_llm(p.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap())
}

/// transformers dequantizes the same Q4_1 blocks; f32 everywhere; tolerance 1e-3.
fn logits_match_transformers_on_a_100_token_prompt() {
    let Some(llm) = llm() else { return };
    let f = load_safetensors("smollm2-logits.safetensors");
    let ids = ids_of(&f["ids"]);
    assert_eq!(ids.len(), 100);
    let logits = logits_at_every_position(&llm, &ids).i(..100).unwrap();
    let top_ids = f["top_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    let top_vals = f["top_vals"].to_vec2::<f32>().unwrap();
    let probe_ids = ids_of(&f["probe_ids"]);
    let probe_vals = f["probe_vals"].to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for pos in 0..100 {
        let row = logits.i(pos).unwrap().to_vec1::<f32>().unwrap();
        for (id, v) in top_ids[pos].iter().zip(&top_vals[pos]) {
            worst = worst.max((row[*id as usize] - v).abs());
        }
        for (id, v) in probe_ids.iter().zip(&probe_vals[pos]) {
            worst = worst.max((row[*id as usize] - v).abs());
        }
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
        let ours: Vec<i64> = order[..5].iter().map(|&i| i as i64).collect();
        assert_eq!(
            ours,
            top_ids[pos][..5].to_vec(),
            "top-5 tokens differ at position {pos}"
        );
    }
    assert!(worst <= 1e-3, "max abs logit difference {worst}");
}

/// Expected ids for SmolLM2: digits one by one, byte-level, no prefix space. Checked by
/// hand against the vocabulary (`Ġ` is a space, `Ċ` a newline, `ĉ` a tab).
fn tokenizer_ids_follow_smollm_rules_and_round_trip() {
    let Some(llm) = llm() else { return };
    let t = &llm.tokenizer;
    // "Hello" at the start has no prefix space; " world" carries its space.
    assert_eq!(t.encode("Hello world").unwrap(), vec![19556, 905]);
    let year = t.encode("In 2024").unwrap();
    let toks: Vec<String> = year.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
    assert_eq!(toks, ["In", "Ġ", "2", "0", "2", "4"]);
    assert_eq!(t.encode("<|im_start|>user\n").unwrap(), vec![1, 4093, 198]);
    assert_eq!(t.encode("\t").unwrap(), vec![197]); // `ĉ`, byte 0x09
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-tokens.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 8);
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = t.encode(text).unwrap();
        assert_eq!(got, want, "ids of {text:?}");
        assert_eq!(
            t.decode(&got, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    for s in [
        "",
        " ",
        "  a  b  ",
        "x\r\ny",
        "née 1984 — ok?",
        "日本語のテキスト",
        "🎉🎉",
    ] {
        assert_eq!(
            t.decode(&t.encode(s).unwrap(), false).unwrap(),
            s,
            "round trip of {s:?}"
        );
    }
    assert_eq!(llm.end_of_turn, 2, "<|im_end|> ends an assistant turn");
}

/// The real model's shapes (9 query heads on 3 key heads, head size 64) through the
/// fused layers against the op-by-op path, after a cached prefix longer than the new
/// positions, with more new rows than one attention block: logits (so probabilities) and
/// input gradients within 1e-4.
fn fused_layers_match_the_op_by_op_path_on_smollm2() {
    let Some(llm) = llm() else { return };
    let prefix: Vec<u32> = (0..150).map(|i| (i * 37 + 11) % 49000).collect();
    let ids: Vec<u32> = (0..90).map(|i| (i * 53 + 7) % 49000).collect();
    let at: Vec<usize> = vec![70, 85, 89];
    let run = |fused: bool| {
        let pos = Positions::default();
        let (l, x) = forward_after_prefix(&llm, fused, &prefix, &ids, &pos, &at);
        let lp = farcer::model::llama::log_softmax(&l).unwrap();
        let loss = lp.i((0, .., 1000)).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        (l, g.get(&x).unwrap().clone())
    };
    let (lf, gf) = run(true);
    let (ls, gs) = run(false);
    let (dl, dg) = (max_abs_diff(&lf, &ls), max_abs_diff(&gf, &gs));
    let scale = gs
        .abs()
        .unwrap()
        .max_keepdim(2)
        .unwrap()
        .max_keepdim(1)
        .unwrap();
    eprintln!("logits {dl}, gradients {dg}, gradient scale {scale}");
    assert!(dl <= 1e-4 && dg <= 1e-4, "logits {dl}, gradients {dg}");
}

/// The LM head read from the GGUF's Q8_0 blocks: its rows are bit for bit the f32 copy
/// candle dequantized, and its product and input gradient match the f32 product's within
/// 1e-5 of their size (f32 sums in another order).
fn lm_head_reads_its_q8_blocks_as_the_f32_copy() {
    let Some(p) = default_llm() else { return };
    let g = farcer::model::gguf::load(&p, &Device::Cpu, DType::F32).unwrap();
    let name = "model.embed_tokens.weight";
    let (head, q) = g
        .head_q8
        .as_ref()
        .expect("SmolLM2's GGUF stores its embeddings in Q8_0");
    assert_eq!(head, name, "the head is the tied embeddings");
    let w = &g.tensors[name];
    // Every row, bit for bit.
    let want = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let got = q.row_values(0, 49152);
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let x0: Vec<f32> = (0..3 * 576)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let r: Vec<f32> = (0..3 * 49152)
        .map(|i| ((i * 13) % 29) as f32 / 14.0 - 1.0)
        .collect();
    let r = candle_core::Tensor::from_vec(r, (3, 49152), &Device::Cpu).unwrap();
    let run = |quantized: bool| {
        let x = candle_core::Tensor::from_vec(x0.clone(), (3, 576), &Device::Cpu).unwrap();
        let x = candle_core::Var::from_tensor(&x).unwrap();
        let y = if quantized {
            farcer::model::frozen::matmul_t_q8(x.as_tensor(), q).unwrap()
        } else {
            let be = farcer::model::frozen::Backend::Kernels;
            farcer::model::frozen::matmul_t(be, x.as_tensor(), w).unwrap()
        };
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(&x).unwrap().clone())
    };
    let ((yq, gq), (yf, gf)) = (run(true), run(false));
    let (dy, dg) = (max_abs_diff(&yq, &yf), max_abs_diff(&gq, &gf));
    let (sy, sg) = (max_abs(&yf).max(1.0), max_abs(&gf).max(1.0));
    assert!(dy <= 1e-5 * sy, "logits differ by {dy} (largest {sy})");
    assert!(
        dg <= 1e-5 * sg,
        "input gradients differ by {dg} (largest {sg})"
    );
    let llm = llm().unwrap();
    assert!(
        llm.model.has_lm_head_q8(),
        "the loaded model reads the Q8_0 blocks"
    );
}

fn main() -> std::process::ExitCode {
    common::harness::main(tests![
        logits_match_transformers_on_a_100_token_prompt.needs_default_llm(),
        tokenizer_ids_follow_smollm_rules_and_round_trip.needs_default_llm(),
        fused_layers_match_the_op_by_op_path_on_smollm2.needs_default_llm(),
        lm_head_reads_its_q8_blocks_as_the_f32_copy.needs_default_llm(),
    ])
}
