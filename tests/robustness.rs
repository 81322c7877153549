//! No input makes farcer panic, hang or allocate without bound: property tests of every
//! file reader (MELD CSV, JSON lines, the training TOML, an LLM's and a ViT's
//! `config.json`, GGUF headers, safetensors headers) on arbitrary bytes and on valid files
//! with random edits, plus the hostile headers each format invites.
//!
//! Unbounded allocation is caught by this binary's allocator: any single allocation above
//! 1 GiB fails, which aborts the test process (the inputs here are a few KiB, so nothing
//! legitimate comes close). A panic fails the property; a hang would stall the suite.

mod common;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use farcer::model::{gguf, llama::LlamaConfig, vit::ViTConfig, weights::WeightFiles};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};

/// The system allocator, refusing any single allocation above 1 GiB.
struct Capped;

const CAP: usize = 1 << 30;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > CAP {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > CAP {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if n > CAP {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Random edits of a valid file: (position, byte, kind) with kind 0 replace, 1 insert,
/// 2 delete, 3 cut the file there.
fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..8)
}

fn mutate(base: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(at, byte, kind) in edits {
        if v.is_empty() {
            v.push(byte);
            continue;
        }
        let i = at % v.len();
        match kind {
            0 => v[i] = byte,
            1 => v.insert(i, byte),
            2 => {
                v.remove(i);
            }
            _ => v.truncate(i),
        }
    }
    v
}

/// Bytes that look like numbers at interesting places: a valid file with one of its
/// little-endian u32/u64 fields replaced by an extreme value.
fn extreme() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u32::MAX as u64),
        Just(u64::MAX),
        Just(1 << 31),
        Just(1 << 40),
        2u64..64,
        Just(1 << 20),
        any::<u64>()
    ]
}

fn poke(base: &[u8], at: usize, wide: bool, v: u64) -> Vec<u8> {
    let mut b = base.to_vec();
    let at = at % b.len().max(1);
    let bytes = if wide {
        v.to_le_bytes().to_vec()
    } else {
        (v as u32).to_le_bytes().to_vec()
    };
    for (k, x) in bytes.into_iter().enumerate() {
        if let Some(slot) = b.get_mut(at + k) {
            *slot = x;
        }
    }
    b
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("farcer-robust-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const MELD_CSV: &str = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\r\n\
1,\"Oh, hi!\",Ross,joy,positive,0,0,1,1,\"00:00:01,500\",\"00:00:02,050\"\r\n\
2,Hey.,Rachel,neutral,neutral,0,1,1,1,\"00:00:02,100\",\"00:00:03,000\"\r\n\
3,It\u{92}s fine.,Monica,sadness,negative,1,0,1,1,\"0:00:04,000\",\"0:00:05,000\"\r\n";

const JSONL: &str = r#"{"id": "a", "utterances": [{"speaker": "Ann", "text": "Hi", "image": "i/1.png", "label": "joy"}, {"speaker": "Bob", "text": "Yo", "clip": "c.mp4", "start": 1.0, "end": 2.0}]}
{"utterances": [{"id": "u", "speaker": "Cy", "text": "Hm", "label": "neutral"}]}
"#;

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn meld_csv_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600), e in edits()) {
        let _ = farcer::data::meld::parse(&bytes, Path::new("x.csv"));
        let _ = farcer::data::meld::parse(&mutate(MELD_CSV.as_bytes(), &e), Path::new("x.csv"));
    }

    #[test]
    fn jsonl_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600), e in edits()) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = farcer::data::jsonl::parse(&text, Path::new("/d"), "x.jsonl");
        let m = mutate(JSONL.as_bytes(), &e);
        let _ = farcer::data::jsonl::parse(&String::from_utf8_lossy(&m), Path::new("/d"), "x.jsonl");
    }

    #[test]
    fn train_toml_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400), e in edits(), which in 0usize..6) {
        let _ = farcer::train::TrainConfig::from_toml(&String::from_utf8_lossy(&bytes), "x.toml");
        let mut shipped: Vec<PathBuf> = std::fs::read_dir(root().join("configs")).unwrap().map(|f| f.unwrap().path()).collect();
        shipped.sort();
        let base = std::fs::read(&shipped[which % shipped.len()]).unwrap();
        let _ = farcer::train::TrainConfig::from_toml(&String::from_utf8_lossy(&mutate(&base, &e)), "x.toml");
    }

    #[test]
    fn model_configs_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), e in edits()) {
        let _ = serde_json::from_slice::<LlamaConfig>(&bytes).map(|c| c.into_config());
        let _ = serde_json::from_slice::<ViTConfig>(&bytes).map(|c| c.validate());
        let base = std::fs::read(fixture("tiny-llama/config.json")).unwrap();
        if let Ok(c) = serde_json::from_slice::<LlamaConfig>(&mutate(&base, &e)) {
            if let Ok(c) = c.into_config() {
                let _ = c.inv_freq();
            }
        }
        let base = std::fs::read(fixture("tiny-vit/config.json")).unwrap();
        let _ = serde_json::from_slice::<ViTConfig>(&mutate(&base, &e)).map(|c| c.validate());
        let base = std::fs::read(fixture("tiny-vit/preprocessor_config.json")).unwrap();
        let _ = serde_json::from_slice::<farcer::vision::Preprocess>(&mutate(&base, &e)).map(|c| c.validate());
    }

    /// Every size field of a Llama config set to any value: refused, or sized so that
    /// nothing built from the config alone can exhaust memory.
    #[test]
    fn llama_config_sizes_are_bounded(
        v in prop::collection::vec(extreme(), 8),
    ) {
        let text = format!(
            r#"{{"hidden_size": {}, "intermediate_size": {}, "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {}, "head_dim": {}, "vocab_size": {}, "max_position_embeddings": {}}}"#,
            v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
        );
        if let Ok(Ok(c)) = serde_json::from_str::<LlamaConfig>(&text).map(|c| c.into_config()) {
            prop_assert!(c.num_layers <= 1 << 12 && c.max_position_embeddings * c.head_dim <= 1 << 28);
            prop_assert!(c.inv_freq().is_ok());
        }
    }
}

/// A whole LLM folder (the tiny fixture) whose `config.json` is edited at random: loading
/// it gives a model or an error, never a panic (sizes that pass the checks but do not
/// match the weights are caught by the shapes of the tensors).
#[test]
fn llm_folders_with_edited_configs_never_panic() {
    let dir = scratch("llm-dir");
    for f in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let base = std::fs::read(fixture("tiny-llama/config.json")).unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(config(24));
    runner
        .run(&edits(), |e| {
            std::fs::write(dir.join("config.json"), mutate(&base, &e)).unwrap();
            let _ = farcer::model::load_llm(dir.to_str().unwrap(), &Device::Cpu, DType::F32);
            Ok(())
        })
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small safetensors file of a few tensors in several dtypes.
fn safetensors_bytes() -> Vec<u8> {
    let dev = Device::Cpu;
    let ts = [
        (
            "a",
            Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        ),
        ("b", Tensor::ones(5, DType::BF16, &dev).unwrap()),
        ("c", Tensor::new(&[1u32, 2, 3], &dev).unwrap()),
    ];
    safetensors::serialize(ts.iter().map(|(n, t)| (*n, t)), None).unwrap()
}

/// Opens a safetensors file with farcer's reader and reads every tensor; also parses the
/// bytes with candle's in-memory reader (checkpoints and the image-vector cache).
fn read_safetensors(path: &Path) -> Result<usize, String> {
    let bytes = std::fs::read(path).unwrap();
    let _ = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu);
    let w = WeightFiles::open(&[path.to_path_buf()]).map_err(|e| e.to_string())?;
    let names: Vec<String> = w.names().into_iter().map(String::from).collect();
    for n in &names {
        w.load(n, &Device::Cpu).map_err(|e| e.to_string())?;
    }
    Ok(names.len())
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn safetensors_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        e in edits(),
        at in any::<usize>(), wide in any::<bool>(), v in extreme(),
    ) {
        let dir = std::env::temp_dir().join(format!("farcer-robust-st-prop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.safetensors");
        let base = safetensors_bytes();
        for b in [bytes.clone(), mutate(&base, &e), poke(&base, at, wide, v), poke(&base, 0, true, v)] {
            std::fs::write(&f, &b).unwrap();
            let _ = read_safetensors(&f);
        }
    }

    #[test]
    fn gguf_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        e in edits(),
        at in any::<usize>(), wide in any::<bool>(), v in extreme(),
    ) {
        let dir = std::env::temp_dir().join(format!("farcer-robust-gguf-prop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.gguf");
        let base = gguf_bytes(&[]);
        let mut magic_bytes = b"GGUF\x03\x00\x00\x00".to_vec();
        magic_bytes.extend(&bytes);
        for b in [bytes.clone(), magic_bytes, mutate(&base, &e), poke(&base, at, wide, v)] {
            std::fs::write(&f, &b).unwrap();
            let _ = gguf::load(&f, &Device::Cpu, DType::F32);
        }
    }
}

#[test]
fn safetensors_headers_are_checked_against_the_file() {
    let dir = scratch("st");
    let f = dir.join("m.safetensors");
    let base = safetensors_bytes();
    std::fs::write(&f, &base).unwrap();
    assert_eq!(read_safetensors(&f), Ok(3));
    let fail = |b: &[u8], want: &str| {
        std::fs::write(&f, b).unwrap();
        let e = read_safetensors(&f).unwrap_err();
        assert!(
            e.contains("m.safetensors") && e.contains(want),
            "{want}: {e}"
        );
    };
    fail(&base[..5], "too short");
    fail(
        &poke(&base, 0, true, u64::MAX),
        "the header claims 18446744073709551615 bytes",
    );
    fail(
        &poke(&base, 0, true, base.len() as u64 - 8),
        "not a safetensors header",
    );
    fail(
        &base[..base.len() - 1],
        "bytes of tensor data, the file holds",
    );
    let mut longer = base.clone();
    longer.push(0);
    fail(&longer, "truncated or damaged");
    // A file cut short after it was opened: an I/O error naming it, not SIGBUS (which is
    // what a memory map gives).
    std::fs::write(&f, &base).unwrap();
    let w = WeightFiles::open(std::slice::from_ref(&f)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(40)
        .unwrap();
    let e = w.load("c", &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("m.safetensors") && e.contains("truncated while loading"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small GGUF in llama layout (metadata, one F32 and one Q8_0 tensor), with `extra`
/// metadata added.
fn gguf_bytes(extra: &[(&str, gguf_file::Value)]) -> Vec<u8> {
    use gguf_file::Value as V;
    let mut meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.embedding_length", V::U32(32)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(1)),
        ("llama.feed_forward_length", V::U32(64)),
        ("llama.block_count", V::U32(1)),
        ("llama.vocab_size", V::U32(4)),
        ("llama.context_length", V::U32(64)),
        (
            "tokenizer.ggml.tokens",
            V::Array(vec![V::String("a".into()), V::String("b".into())]),
        ),
    ];
    meta.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    let dev = Device::Cpu;
    let emb = Tensor::arange(0f32, 128., &dev)
        .unwrap()
        .reshape((4, 32))
        .unwrap();
    let norm =
        QTensor::quantize(&Tensor::ones(32, DType::F32, &dev).unwrap(), GgmlDType::F32).unwrap();
    let emb = QTensor::quantize(&emb, GgmlDType::Q8_0).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(
        &mut out,
        &meta_refs,
        &[("token_embd.weight", &emb), ("output_norm.weight", &norm)],
    )
    .unwrap();
    out.into_inner()
}

/// Fields of a GGUF header that, left unchecked, panic inside the parser or make it read
/// or allocate past the file.
#[test]
fn gguf_headers_are_checked_against_the_file() {
    use gguf_file::Value as V;
    let dir = scratch("gguf");
    let f = dir.join("m.gguf");
    let base = gguf_bytes(&[]);
    std::fs::write(&f, &base).unwrap();
    let (ct, _) = gguf::read_content(&f).unwrap();
    assert_eq!(ct.tensor_infos.len(), 2);
    let fail = |b: &[u8], want: &str| {
        std::fs::write(&f, b).unwrap();
        let e = match gguf::read_content(&f) {
            Ok(_) => panic!("{want}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("m.gguf") && e.contains(want), "{want}: {e}");
    };
    // An alignment of 0 makes candle divide by zero.
    fail(
        &gguf_bytes(&[("general.alignment", V::U32(0))]),
        "general.alignment is 0",
    );
    // Counts far beyond the file (tensor count at byte 8, metadata count at 16).
    fail(
        &poke(&base, 8, true, 1 << 40),
        "the header claims 1099511627776 tensors",
    );
    fail(&poke(&base, 16, true, u64::MAX), "metadata entries");
    // The first key's length (byte 24) beyond the file.
    fail(&poke(&base, 24, true, 1 << 33), "8589934592 bytes needed");
    // Cut short, anywhere in the header.
    fail(&base[..60], "the file ends");
    // Tensor data beyond the end of the file.
    fail(&base[..base.len() - 8], "ends past the end of the file");
    // A tensor whose shape overflows: find the Q8_0 tensor's first dimension (32) after
    // its name and make it enormous.
    let name = b"token_embd.weight";
    let at = base.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4;
    assert_eq!(&base[at..at + 8], &32u64.to_le_bytes());
    fail(&poke(&base, at, true, 1 << 62), "overflows");
    fail(&poke(&base, at, true, 33), "not whole blocks");
    // Arrays nested deeper than anyone writes.
    let mut deep = V::U8(1);
    for _ in 0..80 {
        deep = V::Array(vec![deep]);
    }
    fail(&gguf_bytes(&[("x.deep", deep)]), "nested deeper");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unusable sizes are refused when a model is loaded, through every way in: a Hugging
/// Face folder's config.json, GGUF metadata, and a ViT folder's config.json (each error
/// names the file).
#[test]
fn unusable_model_configs_are_refused_through_every_loading_path() {
    // Hugging Face folder (the tiny Llama with one field changed).
    let dir = scratch("cfg-llm");
    for f in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tiny-llama/config.json")).unwrap()).unwrap();
    let cases: [(&[(&str, serde_json::Value)], &str); 7] = [
        (
            &[("num_attention_heads", 0.into())],
            "num_attention_heads is 0",
        ),
        (
            &[("num_key_value_heads", 0.into())],
            "num_key_value_heads is 0",
        ),
        (
            &[("num_key_value_heads", 3.into())],
            "not a multiple of num_key_value_heads",
        ),
        (
            &[
                ("head_dim", serde_json::Value::Null),
                ("num_attention_heads", 5.into()),
            ],
            "hidden_size 64 is not a multiple of num_attention_heads 5",
        ),
        (
            &[("num_hidden_layers", (1u64 << 40).into())],
            "num_hidden_layers 1099511627776 is larger",
        ),
        (
            &[
                ("max_position_embeddings", (1u64 << 23).into()),
                ("head_dim", 64.into()),
            ],
            "rotary tables",
        ),
        (
            &[("vocab_size", (-1).into())],
            "invalid value: integer `-1`, expected usize at line 1 column",
        ),
    ];
    for (changes, want) in cases {
        let mut c = base.clone();
        for (k, v) in changes {
            c[*k] = v.clone();
        }
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let e = match farcer::model::load_llm(dir.to_str().unwrap(), &Device::Cpu, DType::F32) {
            Ok(_) => panic!("{want}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("config.json") && e.contains(want), "{want}: {e}");
    }
    std::fs::copy(fixture("tiny-llama/config.json"), dir.join("config.json")).unwrap();
    assert!(farcer::model::load_llm(dir.to_str().unwrap(), &Device::Cpu, DType::F32).is_ok());

    // GGUF metadata.
    use gguf_file::Value as V;
    let f = dir.join("m.gguf");
    std::fs::write(&f, gguf_bytes(&[])).unwrap();
    assert!(gguf::load(&f, &Device::Cpu, DType::F32).is_ok());
    for (key, v, want) in [
        (
            "llama.attention.head_count",
            V::U32(0),
            "num_attention_heads is 0",
        ),
        (
            "llama.attention.head_count_kv",
            V::U32(0),
            "num_key_value_heads is 0",
        ),
        (
            "llama.attention.head_count",
            V::U32(3),
            "embedding_length) 32 is not a multiple of num_attention_heads (head_count) 3",
        ),
        ("llama.embedding_length", V::U32(0), "hidden_size is 0"),
        (
            "llama.block_count",
            V::I32(-1),
            "block_count` is not a whole number",
        ),
        (
            "llama.context_length",
            V::U64(1 << 40),
            "max_position_embeddings",
        ),
    ] {
        // Later keys win in candle's map, so the override is appended.
        std::fs::write(&f, gguf_bytes(&[(key, v)])).unwrap();
        let e = match gguf::load(&f, &Device::Cpu, DType::F32) {
            Ok(_) => panic!("{key}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("m.gguf") && e.contains(want), "{key}: {e}");
    }

    // ViT folder.
    let vdir = scratch("cfg-vit");
    for f in std::fs::read_dir(fixture("tiny-vit")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, vdir.join(f.file_name().unwrap())).unwrap();
    }
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tiny-vit/config.json")).unwrap()).unwrap();
    for (k, v, want) in [
        ("num_attention_heads", 0, "num_attention_heads is 0"),
        (
            "num_attention_heads",
            5,
            "hidden_size 48 is not a multiple of num_attention_heads 5",
        ),
        ("patch_size", 0, "patch_size is 0"),
        ("patch_size", 7, "not a multiple of patch_size"),
        ("image_size", 1 << 20, "image_size 1048576 is larger"),
    ] {
        let mut c = base.clone();
        c[k] = v.into();
        std::fs::write(vdir.join("config.json"), c.to_string()).unwrap();
        let e = match farcer::vision::VisionEncoder::load(
            vdir.to_str().unwrap(),
            &Device::Cpu,
            false,
        ) {
            Ok(_) => panic!("{k}={v}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("config.json") && e.contains(want),
            "{k}={v}: {e}"
        );
    }
    std::fs::copy(fixture("tiny-vit/config.json"), vdir.join("config.json")).unwrap();
    let pre: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("tiny-vit/preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    for (k, v, want) in [
        ("image_mean", serde_json::json!([0.5]), "need 3 values"),
        ("image_std", serde_json::json!([0.5, 0.0, 0.5]), "not 0"),
        (
            "size",
            serde_json::json!({"shortest_edge": 100000}),
            "sizes must be 1..=4096",
        ),
    ] {
        let mut p = pre.clone();
        p[k] = v;
        std::fs::write(vdir.join("preprocessor_config.json"), p.to_string()).unwrap();
        let e = match farcer::vision::VisionEncoder::load(
            vdir.to_str().unwrap(),
            &Device::Cpu,
            false,
        ) {
            Ok(_) => panic!("{k}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("preprocessor_config.json") && e.contains(want),
            "{k}: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&vdir);
}

/// Deep nesting is an error, not a stack overflow, in every text format.
#[test]
fn deep_nesting_is_an_error() {
    let deep = |open: &str, n: usize| open.repeat(n);
    let _ = farcer::data::jsonl::parse(&deep("[", 100_000), Path::new("."), "x.jsonl").unwrap_err();
    let _ = farcer::data::jsonl::parse(
        &format!(r#"{{"utterances": {}"#, deep("[", 100_000)),
        Path::new("."),
        "x.jsonl",
    )
    .unwrap_err();
    for toml in [
        format!("kind = {}", deep("[", 100_000)),
        format!("kind = {}", deep("{a=", 100_000)),
        deep("[a.", 10_000),
    ] {
        let _ = farcer::train::TrainConfig::from_toml(&toml, "x.toml").unwrap_err();
    }
    let _ = serde_json::from_str::<LlamaConfig>(&format!(
        r#"{{"rope_scaling": {}"#,
        deep("{\"a\":", 100_000)
    ))
    .unwrap_err();
    let _ =
        farcer::data::meld::parse(deep("\"", 100_000).as_bytes(), Path::new("x.csv")).unwrap_err();
}

/// A small PNG and JPEG to edit.
fn image_bytes(format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

proptest! {
    #![proptest_config(config(256))]

    /// Image files (what data names): arbitrary and edited PNG/JPEG bytes decode or fail,
    /// and a header claiming more pixels than allowed is refused before decoding.
    #[test]
    fn images_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        e in edits(),
        at in 0usize..40, v in extreme(),
        jpeg in any::<bool>(),
    ) {
        let limits = farcer::limits::InputLimits::default();
        let base = image_bytes(if jpeg { image::ImageFormat::Jpeg } else { image::ImageFormat::Png });
        for b in [bytes.clone(), mutate(&base, &e), poke(&base, at, false, v)] {
            if let Ok(img) = farcer::limits::decode_image(&b, Path::new("x.png"), &limits) {
                prop_assert!(img.width() as u64 * img.height() as u64 <= limits.max_image_pixels);
            }
        }
    }
}
