//! LoRA: a fresh adapter changes nothing, merging changes nothing, and adapters cross
//! between farcer and Python's PEFT in both directions (fixtures by tools/make_fixtures.py).

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use farcer::model::dropout::Dropout;
use farcer::model::llama::Positions;
use farcer::model::lora::LoraConfig;
use farcer::model::peft::{load_peft, save_peft};
use farcer::model::projection::{Projection, ProjectionConfig};

const PEFT_IDS: fn() -> Vec<u32> = || (0..24).map(|i| (5 * i + 11) % 260).collect();

fn tiny() -> farcer::model::Llm {
    farcer::model::load_llm(
        fixture("tiny-llama").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn randomise_b(llm: &farcer::model::Llm, seed: u64) {
    let mut r = farcer::util::Rng::new(seed);
    for (name, v) in llm.model.lora_vars() {
        if name.contains("lora_B") {
            let n = v.elem_count();
            let data: Vec<f32> = (0..n).map(|_| (r.normal() * 0.2) as f32).collect();
            v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn fresh_adapters_change_nothing_and_merging_changes_nothing() {
    let base = tiny();
    let ids = PEFT_IDS();
    let want = logits_at_every_position(&base, &ids);
    let mut llm = tiny();
    let cfg = LoraConfig {
        target_modules: ALL_MODULES.map(String::from).to_vec(),
        ..Default::default()
    };
    let vars = llm.model.add_lora(&cfg, 0).unwrap();
    assert_eq!(vars.len(), 2 * 7 * 2);
    // The base model runs each layer as one fused op and the adapted one op by op, so
    // the two agree to rounding (f32 summation order), not bit for bit.
    let d = max_abs_diff(&logits_at_every_position(&llm, &ids), &want);
    assert!(
        d <= 1e-5,
        "B = 0: the model is unchanged (max difference {d})"
    );
    randomise_b(&llm, 1);
    let adapted = logits_at_every_position(&llm, &ids);
    assert!(
        max_abs_diff(&adapted, &want) > 1e-2,
        "the adapters do something"
    );
    llm.model.merge_lora().unwrap();
    assert!(!llm.model.has_lora());
    let d = max_abs_diff(&logits_at_every_position(&llm, &ids), &adapted);
    assert!(d <= 1e-5, "merged vs adapters: {d}");
}

/// PEFT -> farcer: an adapter PEFT saved (on the authors' `lm` + `mp` wrapper) gives
/// PEFT's logits and projection output here (f32, tolerance 1e-4).
#[test]
fn loads_an_adapter_made_by_peft() {
    let mut llm = tiny();
    let (cfg, saved) = load_peft(&fixture("peft-from-python"), &mut llm.model).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 8.0));
    let f = load_safetensors("peft-from-python-outputs.safetensors");
    let ids = ids_of(&f["ids"]);
    // On the fused kernels and on candle's op-by-op path (what a GPU runs).
    for fused in [true, false] {
        llm.model = llm.model.clone().with_backend(backend(fused)).unwrap();
        let d = max_abs_diff(&logits_at_every_position(&llm, &ids), &f["logits"]);
        assert!(d <= 1e-4, "fused {fused}: logits differ from PEFT's by {d}");
    }
    let proj = fixture_projection(0);
    proj.load_tensors(&saved).unwrap();
    let d = max_abs_diff(&proj.forward(&f["vec"], None).unwrap(), &f["proj"]);
    assert!(d <= 1e-5, "projection differs by {d}");
}

/// The tiny Llama with adapters (dropout 0.3) on all seven projections, their B
/// matrices randomised from `seed_b`; and the adapters' variables.
fn tiny_with_every_adapter(seed_b: u64) -> (farcer::model::Llm, Vec<(String, candle_core::Var)>) {
    let mut llm = tiny();
    let cfg = LoraConfig {
        dropout: 0.3,
        target_modules: ALL_MODULES.map(String::from).to_vec(),
        ..Default::default()
    };
    let vars = llm.model.add_lora(&cfg, 3).unwrap();
    randomise_b(&llm, seed_b);
    (llm, vars)
}

/// The projection of the PEFT fixtures: 16 -> 64, one layer, dropout 0.3, seeded.
fn fixture_projection(seed: u64) -> Projection {
    let cfg = ProjectionConfig {
        layers: 1,
        dropout: 0.3,
        in_dim: 16,
        out_dim: 64,
    };
    Projection::new(cfg, seed, &Device::Cpu).unwrap()
}

fn farcer_adapter() -> (farcer::model::Llm, Projection, LoraConfig) {
    let mut llm = tiny();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        ..Default::default()
    };
    llm.model.add_lora(&cfg, 5).unwrap();
    randomise_b(&llm, 6);
    let proj = fixture_projection(7);
    (llm, proj, cfg)
}

/// Writes the farcer -> PEFT fixture (run once, then `tools/make_fixtures.py peft`).
#[test]
#[ignore]
fn write_farcer_adapter() {
    let (llm, proj, cfg) = farcer_adapter();
    let dir = fixture("peft-from-farcer");
    std::fs::create_dir_all(&dir).unwrap();
    save_peft(
        &dir,
        &cfg,
        &llm.model.lora_vars(),
        Some(&proj),
        "tests/fixtures/tiny-llama",
    )
    .unwrap();
}

/// farcer -> PEFT: PEFT loaded the adapter farcer writes (recorded by the tools script);
/// its logits and projection output equal farcer's, and farcer still writes that adapter.
#[test]
fn peft_loads_the_adapter_farcer_writes() {
    let (llm, proj, cfg) = farcer_adapter();
    let tmp = std::env::temp_dir().join(format!("farcer-peft-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    save_peft(
        &tmp,
        &cfg,
        &llm.model.lora_vars(),
        Some(&proj),
        "tests/fixtures/tiny-llama",
    )
    .unwrap();
    let ours = candle_core::safetensors::load(tmp.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let committed = candle_core::safetensors::load(
        fixture("peft-from-farcer/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours.len(), committed.len());
    for (k, v) in &ours {
        assert_eq!(max_abs_diff(v, &committed[k]), 0.0, "{k}");
    }
    let peft = load_safetensors("peft-from-farcer-peft-outputs.safetensors");
    let d = max_abs_diff(
        &logits_at_every_position(&llm, &PEFT_IDS()),
        &peft["logits"],
    );
    assert!(
        d <= 1e-4,
        "PEFT's logits for farcer's adapter differ by {d}"
    );
    let vec: Vec<f32> = (0..16)
        .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let vec = Tensor::from_vec(vec, (1, 16), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&proj.forward(&vec, None).unwrap(), &peft["proj"]) <= 1e-5);
    std::fs::remove_dir_all(tmp).unwrap();
}

/// With adapters on q, k, v each layer runs as one fused op with the adapters inside;
/// against candle's op-by-op path, with dropout on (both draw the same masks from the same
/// seed):
/// logits, and the gradients of every adapter weight and of the input embeddings.
#[test]
fn fused_layers_with_adapters_match_the_op_by_op_path() {
    // Adapters on all seven projections: each is added at its own place inside the fused
    // layer op (q/k/v, o, gate/up, down), with dropout.
    let (llm, vars) = tiny_with_every_adapter(4);
    let ids = PEFT_IDS();
    let w = logit_weights(ids.len(), false);
    let run = |fused: bool| {
        let model = llm.model.clone().with_backend(backend(fused)).unwrap();
        let x = candle_core::Var::from_tensor(&model.embed(&ids).unwrap().unsqueeze(0).unwrap())
            .unwrap();
        let at: Vec<usize> = (0..ids.len()).collect();
        let l = model
            .forward_train(
                x.as_tensor(),
                &mut model.new_cache(),
                &Positions::default(),
                &at,
                &mut Dropout::new(5),
            )
            .unwrap()
            .unwrap();
        let g = (&l * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut grads = vec![g.get(&x).unwrap().clone()];
        grads.extend(vars.iter().map(|(_, v)| g.get(v).unwrap().clone()));
        (l, grads)
    };
    let (lf, gf) = run(true);
    let (ls, gs) = run(false);
    let dl = max_abs_diff(&lf, &ls);
    assert!(dl <= 1e-5, "logits differ by {dl}");
    // Against an independent implementation, gradients agree to 1e-4 of their size.
    for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
        let d = max_abs_diff(a, b);
        let scale = max_abs(b).max(1.0);
        assert!(
            d <= 1e-4 * scale,
            "gradient {i} differs by {d} (largest {scale})"
        );
    }
    let nonzero = gs[1..]
        .iter()
        .filter(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        })
        .count();
    assert_eq!(nonzero, vars.len(), "every adapter weight gets a gradient");
}

/// The seven decoder projections PEFT can adapt.
const ALL_MODULES: [&str; 7] = farcer::model::lora::PROJECTIONS;

/// A text-only adapter (as `kind = "text-lora"` saves it) on every decoder projection.
fn text_adapter() -> (farcer::model::Llm, LoraConfig) {
    let mut llm = tiny();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.05,
        target_modules: ALL_MODULES.iter().map(|s| s.to_string()).collect(),
    };
    llm.model.add_lora(&cfg, 11).unwrap();
    randomise_b(&llm, 12);
    (llm, cfg)
}

/// Writes the text-only farcer -> PEFT fixture (run once, then
/// `tools/make_fixtures.py peft-text`).
#[test]
#[ignore]
fn write_text_lora_adapter() {
    let (llm, cfg) = text_adapter();
    let dir = fixture("peft-text-lora");
    std::fs::create_dir_all(&dir).unwrap();
    save_peft(
        &dir,
        &cfg,
        &llm.model.lora_vars(),
        None,
        "tests/fixtures/tiny-llama",
    )
    .unwrap();
}

/// text-lora -> PEFT -> farcer, on every projection: PEFT loaded the plain adapter farcer
/// writes onto `AutoModelForCausalLM` as it is (recorded by the tools script) and gives
/// farcer's logits (f32, 1e-4); farcer still writes that adapter to the bit, and reading
/// it back gives the same logits (1e-5).
#[test]
fn peft_loads_the_plain_adapter_farcer_writes_on_every_projection() {
    let (llm, cfg) = text_adapter();
    let tmp = std::env::temp_dir().join(format!("farcer-peft-text-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    save_peft(
        &tmp,
        &cfg,
        &llm.model.lora_vars(),
        None,
        "tests/fixtures/tiny-llama",
    )
    .unwrap();
    let ours = candle_core::safetensors::load(tmp.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let committed = candle_core::safetensors::load(
        fixture("peft-text-lora/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours.len(), 2 * 7 * 2);
    assert_eq!(ours.len(), committed.len());
    for (k, v) in &ours {
        assert!(k.starts_with("base_model.model.model.layers."), "{k}");
        assert_eq!(max_abs_diff(v, &committed[k]), 0.0, "{k}");
    }
    let want = logits_at_every_position(&llm, &PEFT_IDS());
    let peft = load_safetensors("peft-text-lora-peft-outputs.safetensors");
    let d = max_abs_diff(&want, &peft["logits"]);
    assert!(d <= 1e-4, "farcer's logits differ from PEFT's by {d}");
    let mut back = tiny();
    let (read, saved) = load_peft(&fixture("peft-text-lora"), &mut back.model).unwrap();
    assert!(saved.is_empty(), "a text-only adapter saves no projection");
    assert_eq!(read.target_modules, cfg.target_modules);
    let d = max_abs_diff(&logits_at_every_position(&back, &PEFT_IDS()), &want);
    assert!(d <= 1e-5, "read back: {d}");
    std::fs::remove_dir_all(tmp).unwrap();
}

/// Recomputing each layer in the backward (candle's op-by-op path, what a GPU runs when a
/// pass's activations would not fit) gives the gradients of keeping the activations: the
/// input's and every adapter's, with adapter dropout on (the recomputation replays the
/// same masks), after a cached prefix and without one. The logits are the same values.
#[test]
fn recomputed_layers_give_the_same_gradients() {
    use farcer::model::llama::Recompute;
    let (llm, vars) = tiny_with_every_adapter(6);
    let ids = PEFT_IDS();
    let (pre, rest) = ids.split_at(10);
    let run = |recompute: Recompute, cached: bool| {
        let model = llm
            .model
            .clone()
            .with_backend(backend(false))
            .unwrap()
            .with_recompute(recompute);
        let mut cache = model.new_cache();
        let ids = if cached {
            let p = model.embed(pre).unwrap().unsqueeze(0).unwrap();
            model
                .forward(&p, &mut cache, &Positions::default(), &[])
                .unwrap();
            rest
        } else {
            &ids[..]
        };
        let x = candle_core::Var::from_tensor(&model.embed(ids).unwrap().unsqueeze(0).unwrap())
            .unwrap();
        let at: Vec<usize> = (0..ids.len()).collect();
        let l = model
            .forward_train(
                x.as_tensor(),
                &mut cache,
                &Positions::default(),
                &at,
                &mut Dropout::new(9),
            )
            .unwrap()
            .unwrap();
        let w = l.ones_like().unwrap().cumsum(2).unwrap().sin().unwrap();
        let g = (&l * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut grads = vec![g.get(&x).unwrap().clone()];
        grads.extend(vars.iter().map(|(_, v)| g.get(v).unwrap().clone()));
        (l, grads)
    };
    for cached in [false, true] {
        let (lk, gk) = run(Recompute::Never, cached);
        let (lr, gr) = run(Recompute::Always, cached);
        assert_eq!(
            max_abs_diff(&lk, &lr),
            0.0,
            "cached {cached}: the same forward"
        );
        for (i, (a, b)) in gk.iter().zip(&gr).enumerate() {
            let d = max_abs_diff(a, b);
            let scale = max_abs(a);
            assert!(scale > 0.0, "gradient {i} is zero");
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "cached {cached}: gradient {i} differs by {d} (largest {scale})"
            );
        }
    }
}
