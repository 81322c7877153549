#!/usr/bin/env python3
"""Reference values for farcer's tests, computed once with PyTorch / transformers /
scikit-learn and committed under tests/fixtures/. Never needed by CI.

Set up a throwaway environment outside the repository, then run:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft gguf safetensors scikit-learn
    /tmp/ref/bin/python tools/make_fixtures.py all --gguf ~/.cache/farcer/models/SmolLM2-135M-Instruct.Q4_1.gguf

Subcommands: tiny-llama, smollm2, templates, metrics, all.
"""
import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def byte_tokenizer():
    """A byte-level BPE tokenizer with the 256 byte symbols, a few merges, and Llama-3's
    special tokens: small enough for a tiny test model, real enough for the pipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    alphabet.sort()
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "r"), ("i", "n"), ("o", "n"), ("Ġ", "a")]:
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def tiny_llama(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tok = byte_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=False,
        bos_token_id=vocab - 5,
        eos_token_id=vocab - 1,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so errors show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(1.0, 0.1)
    out = os.path.join(FIX, "tiny-llama")
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"),
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(out)
    # transformers writes the template to chat_template.jinja; keep it in the config too.
    tc = json.load(open(os.path.join(out, "tokenizer_config.json")))
    tc["chat_template"] = LLAMA3_TEMPLATE
    json.dump(tc, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
    jinja = os.path.join(out, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)

    ids = [(7 * i + 3) % (vocab - 5) for i in range(40)]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    save_file({"ids": torch.tensor(ids, dtype=torch.int64), "logits": logits.float().contiguous()},
              os.path.join(FIX, "tiny-llama-logits.safetensors"))

    # The same weights in bf16, sharded: loading must upcast and read the index.
    out16 = os.path.join(FIX, "tiny-llama-bf16")
    model16 = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    model16.save_pretrained(out16, safe_serialization=True, max_shard_size="100KB")
    fast.save_pretrained(out16)
    tc16 = json.load(open(os.path.join(out16, "tokenizer_config.json")))
    tc16["chat_template"] = LLAMA3_TEMPLATE
    json.dump(tc16, open(os.path.join(out16, "tokenizer_config.json"), "w"), indent=2)
    if os.path.exists(os.path.join(out16, "chat_template.jinja")):
        os.remove(os.path.join(out16, "chat_template.jinja"))
    m32 = LlamaForCausalLM.from_pretrained(out16, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        l16 = m32(torch.tensor([ids])).logits[0]
    save_file({"ids": torch.tensor(ids, dtype=torch.int64), "logits": l16.float().contiguous()},
              os.path.join(FIX, "tiny-llama-bf16-logits.safetensors"))
    print("tiny llama:", out, "vocab", vocab)


def smollm2(args):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    d, f = os.path.split(os.path.abspath(args.gguf))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    ids = json.load(open(os.path.join(FIX, "smollm2-prompt-ids.json")))
    assert len(ids) == 100, len(ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    top_vals, top_ids = logits.topk(20, dim=-1)
    rng = np.random.default_rng(0)
    probe = torch.tensor(sorted(rng.choice(logits.shape[1], 256, replace=False).tolist()))
    save_file({
        "ids": torch.tensor(ids, dtype=torch.int64),
        "top_ids": top_ids.to(torch.int64).contiguous(),
        "top_vals": top_vals.contiguous(),
        "probe_ids": probe.to(torch.int64),
        "probe_vals": logits[:, probe].contiguous(),
    }, os.path.join(FIX, "smollm2-logits.safetensors"))
    print("smollm2 logits: top-1 of last position", int(top_ids[-1, 0]))


def smollm2_tokens(args):
    """Expected token ids for the SmolLM2 tokenizer, from an independent build: the GGUF's
    vocabulary and merges read with the `gguf` package, put into the pipeline SmolLM2's
    tokenizer.json declares (Digits(individual) then ByteLevel without prefix space)."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken

    r = GGUFReader(args.gguf)
    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    toks = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    tt = r.fields["tokenizer.ggml.token_type"]
    types = [int(tt.parts[i][0]) for i in tt.data]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(toks, types) if ty == 3])
    cases = [
        "Hello world",
        "In 2024, 15 people paid $3.50 each.",
        "  two leading spaces and\ttabs\tinside",
        "Emoji 😀👍🏽 and ❤️",
        "Café naïve résumé — “quoted” it’s",
        "<|im_start|>user\nHi!<|im_end|>\n",
        "".join(t for t, ty in zip(toks, types) if ty == 3),
        "Monica: Oh my God!\nRoss: 12345",
    ]
    out = []
    for c in cases:
        e = tok.encode(c, add_special_tokens=False)
        out.append({"text": c, "ids": e.ids, "tokens": e.tokens})
    json.dump(out, open(os.path.join(FIX, "smollm2-tokens.json"), "w"), indent=1, ensure_ascii=False)
    # The 100-token prompt for the logits comparison.
    text = ("<|im_start|>system\nYou are FARCER, a high-quality emotion recognizer.<|im_end|>\n"
            "<|im_start|>user\nDIALOGUE:\nChandler: also I was the point person on my company's transition "
            "from the KL-5 to GR-6 system.\nThe Interviewer: You must've had your hands full.\n"
            "Chandler: That I did. That I did.\nThe Interviewer: So let's talk a little bit about your duties.\n"
            "EMOTION LABEL:<|im_end|>\n<|im_start|>assistant\nneutral<|im_end|>\n")
    ids = tok.encode(text, add_special_tokens=False).ids[:100]
    assert len(ids) == 100, len(ids)
    json.dump(ids, open(os.path.join(FIX, "smollm2-prompt-ids.json"), "w"))
    print("smollm2 tokens: wrote", len(cases), "cases")


def templates(args):
    from transformers import PreTrainedTokenizerFast
    from gguf import GGUFReader

    r = GGUFReader(args.gguf)
    f = r.fields["tokenizer.chat_template"]
    smol_template = bytes(f.parts[f.data[0]]).decode("utf-8")
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(FIX, "tiny-llama", "tokenizer.json"),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    convs = [
        [{"role": "system", "content": "You are FARCER.\nRules:\n1. One label."},
         {"role": "user", "content": "DIALOGUE:\nAnn: Hi!\nEMOTION LABEL:"},
         {"role": "assistant", "content": "joy"},
         {"role": "user", "content": "DIALOGUE:\nBob:  Oh no.  \nEMOTION LABEL:"}],
        [{"role": "user", "content": "  padded question  "}],
    ]
    out = []
    for name, tmpl in [("llama3", LLAMA3_TEMPLATE), ("smollm2", smol_template)]:
        for i, c in enumerate(convs):
            for gen in [True, False]:
                text = tok.apply_chat_template(c, chat_template=tmpl, tokenize=False, add_generation_prompt=gen)
                out.append({"template": name, "conversation": i, "add_generation_prompt": gen, "text": text})
    json.dump({"templates": {"llama3": LLAMA3_TEMPLATE, "smollm2": smol_template},
               "conversations": convs, "cases": out},
              open(os.path.join(FIX, "chat-templates.json"), "w"), indent=1, ensure_ascii=False)
    print("templates: wrote", len(out), "cases")


def metrics(args):
    from sklearn.metrics import precision_recall_fscore_support, f1_score, accuracy_score, confusion_matrix

    labels = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    rng = random.Random(0)
    cases = []
    for n, p_invalid in [(50, 0.0), (200, 0.1), (31, 0.3)]:
        gold = [rng.choice(labels[:6] if n == 31 else labels) for _ in range(n)]  # n=31: a label with no support
        pred = [("invalid" if rng.random() < p_invalid else (g if rng.random() < 0.5 else rng.choice(labels)))
                for g in gold]
        p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
        cases.append({
            "labels": labels, "gold": gold, "pred": pred,
            "precision": [100 * x for x in p], "recall": [100 * x for x in r], "f1": [100 * x for x in f],
            "support": [int(x) for x in s],
            "weighted_f1": 100 * f1_score(gold, pred, labels=labels, average="weighted", zero_division=0),
            "macro_f1": 100 * f1_score(gold, pred, labels=labels, average="macro", zero_division=0),
            "accuracy": 100 * accuracy_score(gold, pred),
            "confusion": confusion_matrix(gold, pred, labels=labels).tolist(),
        })
    json.dump(cases, open(os.path.join(FIX, "metrics-sklearn.json"), "w"), indent=1)
    print("metrics: wrote", len(cases), "cases")


def vit(args):
    """A tiny random ViT (ViTForImageClassification, with a classifier head farcer ignores),
    a PNG, the processor's pixel values for it, and the hidden states."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                    image_size=32, patch_size=8, num_labels=7, layer_norm_eps=1e-12)
    model = ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 0.05)
    out = os.path.join(FIX, "tiny-vit")
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc = ViTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, resample=2,
                             image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    proc.save_pretrained(out)
    # A smooth 80x60 picture (downscaling a smooth image keeps resize filters comparable).
    yy, xx = np.mgrid[0:60, 0:80]
    img = np.stack([(xx * 3) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(FIX, "tiny-vit-image.png"))
    px = proc(Image.open(os.path.join(FIX, "tiny-vit-image.png")), return_tensors="pt")["pixel_values"]
    gen = torch.Generator().manual_seed(1)
    rand_px = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        o = model.vit(rand_px, output_hidden_states=True)
    save_file({"image_pixels": px.contiguous(), "pixels": rand_px.contiguous(),
               "hidden_before_norm": o.hidden_states[-1].contiguous(),
               "last_hidden_state": o.last_hidden_state.contiguous()},
              os.path.join(FIX, "tiny-vit-outputs.safetensors"))
    print("tiny vit:", out)



def farcer_like(lm, in_dim, layers=1):
    import torch
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm
            mods = []
            for i in range(layers):
                last = i == layers - 1
                mods.append(torch.nn.Linear(in_dim, lm.config.hidden_size if last else in_dim))
                if not last:
                    mods += [torch.nn.GELU(), torch.nn.Dropout(0.05)]
            self.mp = torch.nn.Sequential(*mods)
    return Wrapper()


PEFT_IDS = [(5 * i + 11) % 260 for i in range(24)]
PEFT_VEC = [((i * 7) % 13) / 13.0 - 0.5 for i in range(16)]


def peft(args):
    """PEFT -> farcer: a LoRA adapter (q, k, v; r 4) with the projection as a module to
    save, made by PEFT on the tiny Llama, and the logits / projection output it gives.
    farcer -> PEFT: if tests/fixtures/peft-from-farcer/ exists (written by
    `cargo test --release --test lora -- --ignored write_farcer_adapter`), load it in PEFT
    and record PEFT's logits for it."""
    import torch
    from transformers import LlamaForCausalLM
    from peft import LoraConfig, get_peft_model, PeftModel
    from safetensors.torch import save_file

    torch.manual_seed(3)
    lm = LlamaForCausalLM.from_pretrained(os.path.join(FIX, "tiny-llama"), dtype=torch.float32).eval()
    model = farcer_like(lm, 16)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"],
                     modules_to_save=["mp.0"], bias="none")
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.2)
            if "modules_to_save" in n:
                p.normal_(0.0, 0.3)
    pm.eval()
    out = os.path.join(FIX, "peft-from-python")
    pm.save_pretrained(out)
    if os.path.exists(os.path.join(out, "README.md")):
        os.remove(os.path.join(out, "README.md"))  # a generated model card, not a fixture
    ids = torch.tensor([PEFT_IDS])
    vec = torch.tensor([PEFT_VEC])
    with torch.no_grad():
        logits = pm.base_model.model.lm(ids).logits[0]
        proj = pm.base_model.model.mp(vec)
    save_file({"ids": ids[0].contiguous(), "logits": logits.contiguous(), "vec": vec.contiguous(), "proj": proj.contiguous()},
              os.path.join(FIX, "peft-from-python-outputs.safetensors"))
    print("peft: wrote", out)

    theirs = os.path.join(FIX, "peft-from-farcer")
    if os.path.isdir(theirs):
        lm2 = LlamaForCausalLM.from_pretrained(os.path.join(FIX, "tiny-llama"), dtype=torch.float32).eval()
        base = farcer_like(lm2, 16)
        loaded = PeftModel.from_pretrained(base, theirs).eval()
        with torch.no_grad():
            logits = loaded.base_model.model.lm(ids).logits[0]
            proj = loaded.base_model.model.mp(vec)
        save_file({"logits": logits.contiguous(), "proj": proj.contiguous()},
                  os.path.join(FIX, "peft-from-farcer-peft-outputs.safetensors"))
        print("peft: loaded farcer's adapter and recorded its outputs")


def peft_text(args):
    """farcer -> PEFT for a text-only fine-tuned model (`kind = "text-lora"`): load the
    plain adapter that `cargo test --release --test lora -- --ignored write_text_lora_adapter`
    writes to tests/fixtures/peft-text-lora/ (LoRA on all seven decoder projections) onto
    the tiny Llama with PeftModel.from_pretrained, as it is, and record its logits."""
    import torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    from safetensors.torch import save_file

    base = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "tiny-llama"), dtype=torch.float32).eval()
    loaded = PeftModel.from_pretrained(base, os.path.join(FIX, "peft-text-lora")).eval()
    ids = torch.tensor([PEFT_IDS])
    with torch.no_grad():
        logits = loaded(ids).logits[0]
    save_file({"logits": logits.contiguous()}, os.path.join(FIX, "peft-text-lora-peft-outputs.safetensors"))
    print("peft-text: loaded farcer's text-only adapter and recorded its logits")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["tiny-llama", "smollm2", "templates", "metrics", "vit", "peft", "peft-text", "all"])
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/farcer/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()
    os.makedirs(FIX, exist_ok=True)
    steps = {"tiny-llama": [tiny_llama], "smollm2": [smollm2_tokens, smollm2], "templates": [templates],
             "metrics": [metrics], "vit": [vit], "peft": [peft], "peft-text": [peft_text]}
    todo = [f for k in (steps if args.what == "all" else [args.what]) for f in steps[k]]
    for f in todo:
        f(args)


if __name__ == "__main__":
    sys.exit(main())
