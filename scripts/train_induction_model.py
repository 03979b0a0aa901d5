"""Train the induction positive-control model shipped in ``tests/data/induction_model/``.

The model is a two-layer, attention-only LLaMA (``transformers.LlamaForCausalLM``): 4 heads of
dimension 16 per layer, ``d_model`` 64, rotary positions, RMSNorm, vocabulary 64. Its MLPs exist
(so every causalpatch method and adapter sees an ordinary LLaMA) but their weights are zero and
frozen, so each MLP outputs exactly 0 and the model is attention-only.

Training data: ``[BOS] a_1 .. a_n a_1 .. a_n f_1 .. f_m`` with BOS = token 1, ``a`` drawn
without replacement from the content tokens 2..63, ``n`` uniform in ``[N_MIN, N_MAX]`` per
sequence (so no fixed offset solves the task) and random filler ``f`` up to a fixed length. The
loss is the cross-entropy of the predictable tokens only: ``a_2 .. a_n`` of the repeat, each
predicted from the position of the token before it. Held-out accuracy (argmax on those
positions) is measured on sequences drawn from a different generator.

Deterministic: fixed seeds, one torch thread, ``torch.use_deterministic_algorithms(True)``.

Usage::

    python scripts/train_induction_model.py                 # writes tests/data/induction_model/
    python scripts/train_induction_model.py --out /tmp/m    # elsewhere

It prints the training time and writes ``training.json`` (settings, final loss, held-out
accuracy, time) beside the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "tests" / "data" / "induction_model"

VOCAB = 64
BOS = 1
FIRST_CONTENT = 2          # tokens 2..63 are content; 0 is padding in the tests' tokenizer
N_MIN, N_MAX = 4, 16       # length of the repeated segment
LENGTH = 1 + 2 * N_MAX     # every training sequence has this many tokens
SEED = 0
HEADS = 4
HELDOUT_SEED = 12345


def config() -> transformers.LlamaConfig:
    """The model's configuration (attention-only: the MLP is present but zero)."""
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=4, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=64 // HEADS, max_position_embeddings=64,
        tie_word_embeddings=False, initializer_range=0.02, pad_token_id=0, bos_token_id=BOS,
        eos_token_id=0, attention_dropout=0.0)


def batch(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training sequences ``[size, LENGTH]`` and the loss mask ``[size, LENGTH - 1]``
    (True where the next token is a predictable repeat token)."""
    ids = torch.randint(FIRST_CONTENT, VOCAB, (size, LENGTH), generator=gen)
    ids[:, 0] = BOS
    mask = torch.zeros(size, LENGTH - 1, dtype=torch.bool)
    lengths = torch.randint(N_MIN, N_MAX + 1, (size,), generator=gen)
    for row, n in enumerate(lengths.tolist()):
        seg = FIRST_CONTENT + torch.randperm(VOCAB - FIRST_CONTENT, generator=gen)[:n]
        ids[row, 1:1 + n] = seg
        ids[row, 1 + n:1 + 2 * n] = seg
        # logits at position p predict token p + 1; the repeat's tokens 2..n sit at 2 + n .. 2n
        mask[row, 1 + n:2 * n] = True
    return ids, mask


def masked_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and argmax accuracy over the masked positions."""
    logits = model(input_ids=ids).logits[:, :-1]
    target = ids[:, 1:]
    loss = F.cross_entropy(logits[mask], target[mask])
    acc = (logits[mask].argmax(-1) == target[mask]).float().mean()
    return loss, acc


def head_norms(model: transformers.LlamaForCausalLM) -> torch.Tensor:
    """``[n_layers, n_heads]``: the norm of each head's weights (its rows of the query, key and
    value projections and its columns of the output projection). Their sum is a group-lasso
    penalty: a head the task does not need is driven to zero as a whole, so it neither writes
    to the residual stream nor keeps an attention pattern of its own."""
    cfg = model.config
    rows = []
    for layer in model.model.layers:
        attn = layer.self_attn
        per_head = [attn.q_proj.weight.view(cfg.num_attention_heads, -1),
                    attn.k_proj.weight.view(cfg.num_attention_heads, -1),
                    attn.v_proj.weight.view(cfg.num_attention_heads, -1),
                    attn.o_proj.weight.view(cfg.hidden_size, cfg.num_attention_heads,
                                            cfg.head_dim).transpose(0, 1)
                    .reshape(cfg.num_attention_heads, -1)]
        rows.append(sum(w.pow(2).sum(-1) for w in per_head).sqrt())
    return torch.stack(rows)


def train(steps: int, batch_size: int, lr: float, head_penalty: float) -> tuple[transformers.LlamaForCausalLM, dict]:
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(config())
    params = []
    for name, p in model.named_parameters():
        if ".mlp." in name:
            torch.nn.init.zeros_(p)       # attention-only: the MLP outputs exactly 0
            p.requires_grad_(False)
        else:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    history = []
    for step in range(steps):
        ids, mask = batch(gen, batch_size)
        loss, acc = masked_loss(model, ids, mask)
        opt.zero_grad()
        (loss + head_penalty * head_norms(model).sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4),
                            "accuracy": round(acc.item(), 4)})
            print(f"step {step:5d}  loss {loss.item():.4f}  acc {acc.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        ids, mask = batch(torch.Generator().manual_seed(HELDOUT_SEED), 2000)
        loss, acc = masked_loss(model, ids, mask)
    return model, {"history": history, "heldout_sequences": 2000,
                   "heldout_predictions": int(mask.sum()), "heldout_loss": loss.item(),
                   "heldout_accuracy": acc.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--head-penalty", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    model, stats = train(args.steps, args.batch_size, args.lr, args.head_penalty)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "generation_config.json").unlink(missing_ok=True)
    info = {
        "command": "python scripts/train_induction_model.py"
                   + ("" if args.out == OUT else f" --out {args.out}"),
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "head_penalty": args.head_penalty, "seed": SEED,
        "heldout_seed": HELDOUT_SEED, "segment_length": [N_MIN, N_MAX], "sequence_length": LENGTH,
        "bos": BOS, "content_tokens": [FIRST_CONTENT, VOCAB - 1], "threads": 1,
        "seconds": round(seconds, 1), "torch": torch.__version__,
        "transformers": transformers.__version__, "machine": platform.processor() or platform.machine(),
        **stats,
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"held-out accuracy {stats['heldout_accuracy']:.4f}, loss {stats['heldout_loss']:.4f}; "
          f"{seconds:.1f} s on one thread -> {args.out}")


if __name__ == "__main__":
    main()
