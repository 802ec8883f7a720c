"""Train the small Llama-style causal LM that ``benchmarks/seer.py --parts lm`` sparsifies.

    python benchmarks/seer_lm.py [--out /tmp/seer-lm] [--minutes 12] [--threads 2]

Data: the built-in English text (train half), tokenized with demo:minilm's WordPiece tokenizer and
re-indexed to the tokens the text uses (a compact vocabulary, so the output layer stays small). Model:
``LlamaForCausalLM`` with 4 layers, width 256, 4 query heads sharing 2 K/V heads (GQA), head dim 64,
RoPE, tied embeddings. Training: random 1024-token windows, batch 4, AdamW 3e-3 with warm-up and a
cosine decay, bf16 autocast (AMX), until ``--minutes`` of wall time. Writes the model (safetensors)
and ``seer_lm.json`` (vocabulary map, steps, final loss, seconds) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: keep this folder off the path
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/seer-lm"))
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edgecompress.models.demo import minilm_dir

    tok_dir = str(minilm_dir())
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    from edgecompress.data.text import builtin_texts

    def token_stream(tokenizer, split):  # as benchmarks/seer_quality.py: the built-in text, one stream
        texts = builtin_texts()
        chosen = texts[: len(texts) // 2] if split == "train" else texts[len(texts) // 2 :]
        return [t for row in tokenizer(chosen, add_special_tokens=False)["input_ids"] for t in row]

    streams = {s: token_stream(tok, s) for s in ("train", "test")}
    used = sorted(set(streams["train"]) | set(streams["test"]))
    mapping = {t: i for i, t in enumerate(used)}
    train = torch.tensor([mapping[t] for t in streams["train"]])
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(used), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    budget, t0, step, losses = args.minutes * 60, time.perf_counter(), 0, []
    gen = torch.Generator().manual_seed(0)
    est_steps = None
    while time.perf_counter() - t0 < budget:
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seq] for s in starts])
        frac = (time.perf_counter() - t0) / budget
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(round(float(loss), 4))
        if step % 10 == 0:
            print(
                f"step {step} loss {float(loss):.3f} lr {lr:.2e} {time.perf_counter() - t0:.0f} s", flush=True
            )
        est_steps = step
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(args.out, safe_serialization=True)
    meta = {
        "tokenizer": tok_dir, "vocab": {str(t): i for t, i in mapping.items()}, "steps": est_steps,
        "seconds": round(time.perf_counter() - t0, 1), "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1),
        "train_tokens": len(train), "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")},
        "command": "python " + " ".join(sys.argv),
    }  # fmt: skip
    (args.out / "seer_lm.json").write_text(json.dumps(meta))
    print(json.dumps({k: v for k, v in meta.items() if k != "vocab"}))


if __name__ == "__main__":
    main()
