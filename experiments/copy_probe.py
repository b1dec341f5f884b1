"""Can a model of this size learn to copy within the step budget? A synthetic probe.

Not a test. Retrieval pays off when the model copies what its neighbors say; copying is a
circuit (match the current token in the neighbor, read the token after it) that a network has
to discover. This probe measures whether that happens at all for a preset and budget, with
everything else taken out of the way: uniform random tokens, so nothing can be predicted except
by copying.

- ``--mode retro``: each 64-token chunk's neighbor is the chunk itself plus its true
  continuation (perfect leakage, as with a database that contains the training text). A model
  that has learned to copy through chunked cross-attention drives the loss on every chunk after
  the first towards 0.
- ``--mode gpt``: the same decoder without retrieval reads a random sequence twice in its
  context; a model with an induction (in-context copy) circuit drives the loss on the second
  half towards 0. This is the copying that prompt retrieval (contexts in the prompt) needs.

It prints the loss every ``--every`` steps next to ln(vocab), the loss of a model that copies
nothing::

    .venv/bin/python experiments/copy_probe.py --mode retro --steps 400
    .venv/bin/python experiments/copy_probe.py --mode gpt --steps 600 --lr 8e-3

Three switches change the Retro model of the probe only (the pipeline's model has none of them;
docs/findings.md says what they do together and apart), to test which inductive
biases let a copy by content form quickly:

- ``--output-from-embedding``: the output layer starts as a copy of the input embedding (the two
  stay separate parameters), so "read token t from a neighbor, predict t" needs no learned map
  between two unrelated embedding spaces at the start;
- ``--prev-keys``: in chunked cross-attention each neighbor token's key is computed from the
  token *before* it (values stay the token's own): one attention step is then an induction
  head, "find my token in the neighbor, read the one after it";
- ``--match-init S``: CCA query weights scaled by S and key weights set equal to them, so at
  initialisation a query scores highest the keys made from its own token.

    .venv/bin/python experiments/copy_probe.py --mode retro --shift 32 --vocab 4096 --steps 150 \
        --output-from-embedding --prev-keys --match-init 4
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from instructretro import presets  # noqa: E402
from instructretro.tokenizer import EOD_ID  # noqa: E402


def retro_batch(gen, batch: int, seq: int, chunk: int, vocab: int, shift: int = 0):
    """Random tokens; neighbor of chunk c = chunks c and c + 1 (the continuation), moved by a
    random offset in -shift .. shift tokens per sample and chunk (0: aligned with the text)."""
    if shift == 0:
        t = torch.randint(3, vocab, (batch, seq + chunk), generator=gen)
        t[:, seq:] = EOD_ID
        neighbors = torch.stack([t[:, c * chunk:(c + 2) * chunk] for c in range(seq // chunk)], 1)[:, :, None]
        return t[:, :seq], t[:, 1:seq + 1], neighbors, neighbors != EOD_ID
    t = torch.randint(3, vocab, (batch, shift + seq + chunk + shift), generator=gen)
    offsets = torch.randint(-shift, shift + 1, (batch, seq // chunk), generator=gen)
    rows = torch.arange(batch)[:, None]
    neighbors = torch.stack([
        t[rows, shift + c * chunk + offsets[:, c:c + 1] + torch.arange(2 * chunk)]
        for c in range(seq // chunk)], 1)[:, :, None]
    text = t[:, shift:shift + seq + 1]
    return text[:, :-1], text[:, 1:], neighbors, torch.ones_like(neighbors, dtype=torch.bool)


def previous_token_keys(cca, neighbor_length: int) -> None:
    """Make a CCA module's keys those of the previous token of each neighbor (zero for the
    first): keys are linear in the encoder output, so shifting them is shifting the input."""
    project_kv = cca.project_kv

    def shifted(context):
        k, v = project_kv(context)  # (..., H, S, d), S = neighbors x neighbor_length
        *lead, S, d = k.shape
        k = k.reshape(*lead, S // neighbor_length, neighbor_length, d)
        k = F.pad(k, (0, 0, 1, 0))[..., :neighbor_length, :].reshape(*lead, S, d)
        return k, v

    cca.project_kv = shifted


def apply_biases(model, output_from_embedding: bool, prev_keys: bool, match_init: float) -> None:
    """The probe-only switches of the module docstring, applied to a freshly built model."""
    if output_from_embedding:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.embed.weight)
    hidden = model.config.hidden
    for layer in model.layers:
        if layer.cca is None:
            continue
        if prev_keys:
            previous_token_keys(layer.cca, model.config.neighbor_length)
        if match_init:
            with torch.no_grad():
                layer.cca.q.weight.mul_(match_init)
                layer.cca.kv.weight[:hidden].copy_(layer.cca.q.weight)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("retro", "gpt"), default="retro")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shift", type=int, default=0,
                    help="retro: move each neighbor by a random -shift..shift tokens; gpt: start the repeat at a "
                         "random 0..shift tokens into the first half (copy by content, not position)")
    ap.add_argument("--chunk-length", type=int, default=None,
                    help="override the preset's chunk_length (retro.chunk_length; must divide its seq_length)")
    ap.add_argument("--cca-rotary", type=int, choices=(0, 1), default=1,
                    help="relative positions in CCA (model.cca_rotary; 0 for the ablation)")
    ap.add_argument("--output-from-embedding", action="store_true",
                    help="initialise the output layer as a copy of the input embedding")
    ap.add_argument("--prev-keys", action="store_true", help="CCA keys from the previous neighbor token")
    ap.add_argument("--match-init", type=float, default=0.0, metavar="S",
                    help="CCA query weights x S and key weights equal to them at initialisation (0: off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    config = presets.get(args.preset, vocab_size=args.vocab, retro=args.mode == "retro",
                         cca_rotary=bool(args.cca_rotary), chunk_length=args.chunk_length)
    from instructretro.model import Retro

    model = Retro(config)
    apply_biases(model, args.output_from_embedding, args.prev_keys, args.match_init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    seq, L = config.seq_length, config.chunk_length
    print(f"copy probe: {args.mode}, preset {args.preset} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters), vocab {args.vocab}, batch {args.batch} x {seq}, lr {args.lr}; "
          f"ln(vocab) = {math.log(args.vocab):.3f}")
    t0 = time.time()
    for step in range(1, args.steps + 1):
        if args.mode == "retro":
            x, y, nb, mask = retro_batch(gen, args.batch, seq, L, args.vocab, args.shift)
            logits = model(x, nb, mask)
            scored = slice(L - 1, seq - 1)  # positions that see a neighbor holding their target
        else:
            half = torch.randint(3, args.vocab, (args.batch, seq // 2 + args.shift), generator=gen)
            # the repeat starts at a random offset 0..shift into the first half: the copy source of
            # a token is then found by content (induction), not at a fixed distance
            offsets = torch.randint(0, args.shift + 1, (args.batch, 1), generator=gen)
            repeat = half.gather(1, offsets + torch.arange(seq // 2))
            full = torch.cat([half[:, :seq // 2], repeat], 1)
            x, y = full[:, :-1], full[:, 1:]
            logits = model(x)
            scored = slice(seq // 2 - 1, seq - 1)  # targets in the repeated half
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), y.reshape(-1), reduction="none")
        loss = ce.view(y.shape)[:, scored].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            print(f"step {step:5d}  copyable-token loss {loss.item():.3f}  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
