#!/usr/bin/env python3
"""The same cases as `farcer bench`, in PyTorch / transformers / PEFT, on the same machine:
the same GGUF loaded in f32 (transformers dequantizes it), 2 threads, frozen weights with
requires_grad=False, and the exact token ids farcer used (`farcer bench --dump-inputs`).

Two ways where the method matters:
- "authors": as the authors' code does it: the full prompt every training step, one
  forward pass per label token feeding back its own argmax (no teacher forcing), greedy
  decoding without a KV cache;
- "plain": the best plain PyTorch way: teacher forcing in one pass, logits only where
  needed (`logits_to_keep`), no gradient for frozen weights.

Raw-kernel cases compare against "plain"; method cases against "authors".

    farcer bench --dump-inputs /tmp/bench-inputs.json
    /tmp/ref/bin/python tools/bench_reference.py --inputs /tmp/bench-inputs.json --json /tmp/torch.json

Each case runs in its own process so the peak memory (ru_maxrss) is its own.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = ["prefill-512", "proj-step-128", "proj-step-512", "lora-step-512", "farcer-step-7shot",
         "farcer-step-7shot-plain", "eval-greedy-authors", "vit-b16", "vit-s14"]


def load_llm(gguf):
    import torch
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(os.path.abspath(gguf))
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def timed(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run_case(case, a, inputs):
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if case.startswith("vit"):
        from transformers import ViTConfig, ViTForImageClassification, ViTModel
        if case == "vit-b16":
            vm = ViTForImageClassification(ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                     intermediate_size=3072, image_size=224, patch_size=16)).eval()
            body = vm.vit
        else:
            body = ViTModel.from_pretrained(a.vit_s).eval()
        px = torch.randn(8, 3, 224, 224)
        with torch.no_grad():
            s = timed(lambda: body(px, output_hidden_states=True).hidden_states[-1][:, 0], a.reps)
        return dict(what="CLS vectors of 8 images (224x224)", seconds=s, units=8, unit="images")

    m = load_llm(a.gguf)
    emb = m.get_input_embeddings()
    ids = torch.tensor(inputs["ids_512"])
    targets = torch.tensor(inputs["targets"])
    proj = torch.nn.Linear(inputs["vision_dim"], m.config.hidden_size)

    def embeds_with_image(tok, pos):
        e = emb(tok)
        img = proj(torch.ones(1, inputs["vision_dim"]))
        return torch.cat([e[:pos], img, e[pos + 1:]], 0).unsqueeze(0)

    def step(n, model):
        x = embeds_with_image(ids[:n], min(inputs["image_pos"], n // 2))
        k = len(targets)
        logits = model(inputs_embeds=x, logits_to_keep=k).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()

    if case == "prefill-512":
        with torch.no_grad():
            x = emb(ids).unsqueeze(0)
            s = timed(lambda: m(inputs_embeds=x, logits_to_keep=1), a.reps)
        return dict(what="forward over 512 tokens, logits at the last", seconds=s, units=512, unit="tokens")
    if case in ("proj-step-128", "proj-step-512"):
        n = 128 if case.endswith("128") else 512
        s = timed(lambda: step(n, m), a.reps)
        return dict(what=f"forward + backward, {n} positions, one projected image", seconds=s, units=n, unit="tokens")
    if case == "lora-step-512":
        from peft import LoraConfig, get_peft_model
        pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"]))
        for n_, p in pm.named_parameters():
            if "lora_B" in n_:
                torch.nn.init.constant_(p, 0.01)
        pm.train()
        s = timed(lambda: step(512, pm), a.reps)
        return dict(what="LoRA (r 8, q k v) + projection step, 512 positions", seconds=s, units=512, unit="tokens")

    prefix = torch.tensor(inputs["farcer_prefix"])

    def sample_embeds(pieces):
        parts = [emb(prefix)]
        for t in pieces:
            if t == -1:
                parts.append(proj(torch.randn(1, inputs["vision_dim"])))
            else:
                parts.append(emb(torch.tensor([t])))
        return torch.cat(parts, 0).unsqueeze(0)

    if case == "farcer-step-7shot":
        # The authors' way: the whole prompt every step, one full forward per label token,
        # feeding back the argmax token.
        def authors():
            for pieces, tgt in inputs["farcer_samples"]:
                generated = []
                for t in tgt:
                    # The whole prompt (with the projected images) plus the tokens the
                    # model produced so far, through the LLM again for every label token.
                    x = sample_embeds(pieces)
                    if generated:
                        x = torch.cat([x, emb(torch.tensor(generated)).unsqueeze(0)], 1)
                    logits = m(inputs_embeds=x, logits_to_keep=1).logits[0, -1]
                    loss = torch.nn.functional.cross_entropy(logits.unsqueeze(0), torch.tensor([t]))
                    loss.backward()
                    generated.append(int(logits.argmax()))
        s = timed(authors, a.reps)
        n = len(inputs["farcer_samples"])
        return dict(what=f"{n} base-FARCER training steps, 7-shot, the authors' way", seconds=s, units=n, unit="samples")
    if case == "farcer-step-7shot-plain":
        def plain():
            for pieces, tgt in inputs["farcer_samples"]:
                x = torch.cat([sample_embeds(pieces), emb(torch.tensor(tgt[:-1])).unsqueeze(0)], 1)
                logits = m(inputs_embeds=x, logits_to_keep=len(tgt)).logits[0]
                torch.nn.functional.cross_entropy(logits, torch.tensor(tgt)).backward()
        s = timed(plain, a.reps)
        n = len(inputs["farcer_samples"])
        return dict(what=f"{n} base-FARCER training steps, 7-shot, teacher forcing, full prompt", seconds=s, units=n, unit="samples")
    if case == "eval-greedy-authors":
        eot = inputs["end_of_turn"]

        def authors():
            with torch.no_grad():
                for pieces in inputs["eval_samples"]:
                    x = sample_embeds(pieces)
                    for _ in range(5):
                        nxt = m(inputs_embeds=x, logits_to_keep=1).logits[0, -1].argmax()
                        if int(nxt) == eot:
                            break
                        x = torch.cat([x, emb(nxt).view(1, 1, -1)], 1)
        s = timed(authors, a.reps)
        n = len(inputs["eval_samples"])
        return dict(what=f"{n} samples, 7-shot, greedy decoding without a KV cache (authors)", seconds=s, units=n, unit="samples")
    raise SystemExit(f"unknown case {case}")


def sweep(a, inputs):
    """Per dialogue length: one training sample and one prediction, the authors' way."""
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = load_llm(a.gguf)
    emb = m.get_input_embeddings()
    proj = torch.nn.Linear(inputs["vision_dim"], m.config.hidden_size)
    prefix = torch.tensor(inputs["farcer_prefix"])
    eot = inputs["end_of_turn"]

    def embeds(pieces, extra):
        parts = [emb(prefix)]
        for t in pieces:
            parts.append(proj(torch.randn(1, inputs["vision_dim"])) if t == -1 else emb(torch.tensor([t])))
        if extra:
            parts.append(emb(torch.tensor(extra)))
        return torch.cat(parts, 0).unsqueeze(0)

    out = []
    for n, pieces, tgt in inputs["sweep"]:
        def train():
            gen = []
            for t in tgt:
                logits = m(inputs_embeds=embeds(pieces, gen), logits_to_keep=1).logits[0, -1]
                torch.nn.functional.cross_entropy(logits.unsqueeze(0), torch.tensor([t])).backward()
                gen.append(int(logits.argmax()))

        def predict():
            with torch.no_grad():
                gen = []
                for _ in range(5):
                    nxt = int(m(inputs_embeds=embeds(pieces, gen), logits_to_keep=1).logits[0, -1].argmax())
                    if nxt == eot:
                        break
                    gen.append(nxt)
        out.append(dict(utterances=n, tokens=len(pieces), train_seconds=timed(train, a.reps), predict_seconds=timed(predict, a.reps)))
        print(f"{n:>10} {len(pieces):>8} {out[-1]['train_seconds']:>14.3f} {out[-1]['predict_seconds']:>14.3f}", flush=True)
    return out


# --- `--shape`: the GPU cases at a model shape (scripts/gpu-check) -----------------------

SHAPE_CASES = ["prefill-512", "farcer-step-7shot", "lora-step-7shot", "eval-constrained-7shot",
               "farcer-step-7shot-authors", "eval-greedy-authors"]


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_on(fn, reps, device):
    """`timed`, finishing the device's work before each clock read."""
    def run():
        fn()
        sync(device)
    return timed(run, reps)


def run_shape_case(case, a, inputs):
    """The work of `farcer bench --shape` in plain PyTorch: the same shape with random
    weights made on the device (frozen, requires_grad=False), the same token ids.

    - "plain" (the cases farcer's are compared with): the 7-shot prefix computed once and
      reused through past_key_values (a copy per step), teacher forcing in one
      pass, logits only where the answer is predicted (`logits_to_keep`), the loss in f32;
    - "authors": the whole prompt every step, one forward per answer token feeding back
      its argmax; greedy decoding of up to 5 tokens without a KV cache.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    c = inputs["config"]
    cfg = LlamaConfig(**{k: v for k, v in c.items() if v is not None and k != "rope_parameters"})
    cfg.initializer_range = 0.02
    t0 = time.perf_counter()
    # Made directly in the dtype on the device (no f32 copy of 8B weights first).
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with dev:
        m = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(default)
    for p in m.parameters():
        p.requires_grad_(False)
    sync(a.device)
    build = time.perf_counter() - t0
    emb = m.get_input_embeddings()
    T = lambda ids: torch.tensor(ids, device=dev)
    dim = inputs["vision_dim"]
    proj = torch.nn.Linear(dim, cfg.hidden_size, device=dev)  # trainable, f32
    suffix, pos, answer = inputs["suffix_ids"], inputs["image_pos"], inputs["answer_ids"]
    tag = f" [{inputs['shape']} {a.dtype} on {a.device}; model built in {build:.1f} s]"

    def sample_embeds(extra):
        img = proj(torch.ones(1, dim, device=dev)).to(dtype)
        return torch.cat([emb(T(suffix[:pos])), img, emb(T(suffix[pos + 1:] + extra))], 0).unsqueeze(0)

    def prefix_cache(model):
        with torch.no_grad():
            return model(input_ids=T(inputs["prefix_ids"]).unsqueeze(0), use_cache=True, logits_to_keep=1).past_key_values

    n_pre = len(inputs["prefix_ids"])

    def back_to(pkv, n):
        # Drop what a step appended (a negative crop works in transformers 4 and 5).
        extra = pkv.get_seq_length() - n
        if extra > 0:
            pkv.crop(-extra)

    def step(model, prefix_pkv):
        # A fresh copy of the cached prefix each step: the step appends to it with a graph.
        pkv = copy.deepcopy(prefix_pkv)
        x = sample_embeds(answer[:-1])
        logits = model(inputs_embeds=x, past_key_values=pkv, use_cache=True, logits_to_keep=len(answer)).logits[0]
        torch.nn.functional.cross_entropy(logits.float(), T(answer)).backward()

    if case == "prefill-512":
        x = emb(T(inputs["prefill_ids"])).unsqueeze(0)
        with torch.no_grad():
            s = timed_on(lambda: m(inputs_embeds=x, logits_to_keep=1, use_cache=False), a.reps, a.device)
        return dict(what="forward over 512 tokens, logits at the last" + tag, seconds=s, units=512, unit="tokens")
    if case == "farcer-step-7shot":
        pkv = prefix_cache(m)
        s = timed_on(lambda: step(m, pkv), a.reps, a.device)
        return dict(what="base-FARCER (projection) training step, prefix cached (past_key_values), teacher forcing, logits_to_keep" + tag,
                    seconds=s, units=1, unit="samples")
    if case == "lora-step-7shot":
        # LoRA changes the prefix, so the whole prompt runs with a graph every step.
        from peft import LoraConfig, get_peft_model
        pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]))
        for n_, p in pm.named_parameters():
            if "lora_B" in n_:
                torch.nn.init.constant_(p, 0.01)
        if a.checkpointing:
            pm.gradient_checkpointing_enable()
            pm.enable_input_require_grads()
        pm.train()

        def lora_step():
            x = torch.cat([emb(T(inputs["prefix_ids"])).unsqueeze(0), sample_embeds(answer[:-1])], 1)
            logits = pm(inputs_embeds=x, use_cache=False, logits_to_keep=len(answer)).logits[0]
            torch.nn.functional.cross_entropy(logits.float(), T(answer)).backward()
        s = timed_on(lora_step, a.reps, a.device)
        ck = ", gradient checkpointing" if a.checkpointing else ""
        return dict(what=f"LoRA (r 8, q k v) + projection training step, the whole 7-shot prompt, teacher forcing, logits_to_keep{ck}" + tag,
                    seconds=s, units=1, unit="samples")
    if case == "eval-constrained-7shot":
        pkv = prefix_cache(m)

        def score():
            # The sample once after the prefix, then each label's tokens after that.
            with torch.no_grad():
                out = m(inputs_embeds=sample_embeds([]), past_key_values=pkv, use_cache=True, logits_to_keep=1)
                n_q = n_pre + len(suffix)
                for seq in inputs["label_seqs"]:
                    m(input_ids=T(seq[:-1]).unsqueeze(0), past_key_values=pkv, use_cache=True, logits_to_keep=len(seq) - 1) if len(seq) > 1 else None
                    back_to(pkv, n_q)
                back_to(pkv, n_pre)
                return out
        s = timed_on(score, a.reps, a.device)
        return dict(what="constrained evaluation of one sample, prefix and sample cached, one pass per label" + tag,
                    seconds=s, units=1, unit="samples")
    prefix = inputs["prefix_ids"]
    if case == "farcer-step-7shot-authors":
        def authors():
            generated = []
            for t in answer:
                x = torch.cat([emb(T(prefix)).unsqueeze(0), sample_embeds(generated)], 1)
                logits = m(inputs_embeds=x, logits_to_keep=1, use_cache=False).logits[0, -1]
                torch.nn.functional.cross_entropy(logits.float().unsqueeze(0), T([t])).backward()
                generated.append(int(logits.argmax()))
        s = timed_on(authors, a.reps, a.device)
        return dict(what="base-FARCER training step, the authors' way (whole prompt per answer token)" + tag,
                    seconds=s, units=1, unit="samples")
    if case == "eval-greedy-authors":
        def greedy():
            with torch.no_grad():
                x = torch.cat([emb(T(prefix)).unsqueeze(0), sample_embeds([])], 1)
                for _ in range(5):
                    nxt = m(inputs_embeds=x, logits_to_keep=1, use_cache=False).logits[0, -1].argmax()
                    x = torch.cat([x, emb(nxt).view(1, 1, -1)], 1)
        s = timed_on(greedy, a.reps, a.device)
        return dict(what="one sample, greedy decoding of 5 tokens without a KV cache (authors)" + tag,
                    seconds=s, units=1, unit="samples")
    raise SystemExit(f"unknown shape case {case}; cases: {', '.join(SHAPE_CASES)}")


def peak_mib(device):
    """Host peak RSS (ru_maxrss); the GPU's is read from outside (NVML) by scripts/gpu-check."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/farcer/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--vit-s", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "vit-small-dinov2"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--sweep", action="store_true", help="time per dialogue length (writes --json)")
    ap.add_argument("--shape", help="the GPU cases at a model shape; --inputs from `farcer bench --shape S --dump-inputs`")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="f32, bf16 or f16 (default: bf16 on cuda, f32 on the CPU)")
    ap.add_argument("--checkpointing", action="store_true", help="--shape lora-step-7shot with gradient checkpointing")
    a = ap.parse_args()
    inputs = json.load(open(a.inputs))
    if a.shape:
        return shape_main(a, inputs)
    # Same work as farcer by construction: its token ids; the counts are checked here.
    assert len(inputs["ids_512"]) == 512, "inputs from another farcer version"
    n_prompt = sum(len(p) for p, _ in inputs["farcer_samples"])
    print(f"inputs: 512 synthetic ids, prefix {len(inputs['farcer_prefix'])} tokens, "
          f"{len(inputs['farcer_samples'])} samples with {n_prompt} suffix positions "
          f"({sum(t == -1 for p, _ in inputs['farcer_samples'] for t in p)} image slots)", file=sys.stderr)
    if a.sweep:
        pts = sweep(a, inputs)
        if a.json:
            json.dump(pts, open(a.json, "w"), indent=1)
        return
    if a.case:
        r = run_case(a.case, a, inputs)
        r.update(case=a.case, repetitions=a.reps, per_second=r["units"] / r["seconds"], threads=a.threads,
                 peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(r))
        return
    results = []
    print(f"{'case':<28} {'seconds':>10} {'per second':>14} {'peak MiB':>10}  what")
    for c in a.cases.split(","):
        p = subprocess.run([sys.executable, __file__, "--case", c] + sys.argv[1:], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{c:<28} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{c:<28} {r['seconds']:>10.3f} {r['per_second']:>10.1f} {r['unit'][:3]:<3} {r['peak_mib']:>10.0f}  {r['what']}")
        results.append(r)
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)


def shape_main(a, inputs):
    if inputs.get("shape") != a.shape:
        raise SystemExit(f"--inputs are for shape {inputs.get('shape')!r}, not {a.shape!r}")
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "f32")
    if a.case:
        r = run_shape_case(a.case, a, inputs)
        r.update(case=a.case, repetitions=a.reps, per_second=r["units"] / r["seconds"], threads=a.threads,
                 peak_mib=peak_mib(a.device))
        if a.device.startswith("cuda"):
            import torch
            # PyTorch's own account, beside the NVML reading gpu-check takes.
            r.update(torch_max_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                     torch_max_reserved_mib=torch.cuda.max_memory_reserved() / 2**20)
        print(json.dumps(r))
        return
    cases = SHAPE_CASES if a.cases == ",".join(CASES) else a.cases.split(",")
    results = []
    print(f"{'case':<28} {'seconds':>10} {'host MiB':>10}  what")
    for c in cases:
        p = subprocess.run([sys.executable, __file__, "--case", c] + sys.argv[1:], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{c:<28} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{c:<28} {r['seconds']:>10.4f} {r['peak_mib']:>10.0f}  {r['what']}", flush=True)
        results.append(r)
        if a.json:
            json.dump(results, open(a.json + ".tmp", "w"), indent=1)
            os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
