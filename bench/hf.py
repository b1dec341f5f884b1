"""An imported Hugging Face decoder: our model against transformers' on the same weights (CPU).

Not a test. Builds a random Llama-family model with transformers (GQA, rope_theta 1e6; nothing
downloaded), saves it, imports it with ``hf.load_hf_model`` and, in one process with the two
models timed in interleaved rounds (median per model), measures

- forward + backward tokens/s on a fixed batch (cross-entropy loss, no optimizer step);
- cached greedy decoding tokens/s: ours ``decoding.greedy_generate`` with the KV cache against
  transformers' ``generate`` (greedy, its own cache), same prompt, same number of new tokens
  (both checked to produce the same tokens).

Prints tokens/s per model (median round, wall clock) and the ratios ours / transformers by wall
clock and by process CPU time (with one thread, the CPU time is what a round costs without the
waits that other processes on a shared machine add); goal >= 1.0.

    OMP_NUM_THREADS=1 .venv/bin/python bench/hf.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/hf.py --family qwen2 --hidden 512 --layers 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from instructretro import hf
from instructretro.decoding import greedy_generate


def build(family: str, args):
    import transformers

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.heads // 2, max_position_embeddings=4096, rope_theta=1e6,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "mistral": transformers.MistralConfig}[family](**common)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", choices=["llama", "qwen2", "mistral"])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    theirs = build(args.family, args)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = hf.load_hf_model(folder, chunk_length=args.prompt, seq_length=args.seq)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=gen)
    generation = transformers.GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                               do_sample=False, eos_token_id=None, pad_token_id=0)

    def train_ours():
        logits = ours(batch[:, :-1])
        F.cross_entropy(logits.reshape(-1, args.vocab), batch[:, 1:].reshape(-1)).backward()

    def train_theirs():
        logits = theirs(batch[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, args.vocab), batch[:, 1:].reshape(-1)).backward()

    decoded = {}

    def decode_ours():
        decoded["ours"] = greedy_generate(ours, prompt.tolist(), args.new_tokens, eod_id=-1)[0]

    def decode_theirs():
        with torch.no_grad():
            out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=generation)
        decoded["theirs"] = out[0, args.prompt:].tolist()

    ours.train(), theirs.train()
    times = {name: [] for name in ("train ours", "train theirs", "decode ours", "decode theirs")}
    for fn in (train_ours, train_theirs):  # warm-up
        fn()
    for _ in range(args.rounds):
        times["train ours"].append(timed(train_ours))
        times["train theirs"].append(timed(train_theirs))
    ours.eval(), theirs.eval()
    decode_ours(), decode_theirs()
    for _ in range(args.rounds):
        times["decode ours"].append(timed(decode_ours))
        times["decode theirs"].append(timed(decode_theirs))
    same = decoded["ours"] == decoded["theirs"]
    train_tokens, decode_tokens = args.batch * args.seq, args.new_tokens
    rate = {k: (train_tokens if k.startswith("train") else decode_tokens) / statistics.median(w for w, _ in v)
            for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    n = sum(p.numel() for p in ours.parameters())
    print(f"{args.family}: {args.layers} layers, hidden {args.hidden}, heads {args.heads} (kv {args.heads // 2}), "
          f"vocab {args.vocab}, {n:,} params; threads {torch.get_num_threads()}; median of {args.rounds} rounds")
    print(f"forward+backward batch {args.batch}x{args.seq}: ours {rate['train ours']:,.0f} tok/s, "
          f"transformers {rate['train theirs']:,.0f} tok/s, ratio {rate['train ours'] / rate['train theirs']:.2f}x "
          f"(CPU time {cpu['train theirs'] / cpu['train ours']:.2f}x)")
    print(f"cached greedy decode, prompt {args.prompt}, {args.new_tokens} new tokens: ours "
          f"{rate['decode ours']:,.0f} tok/s, transformers {rate['decode theirs']:,.0f} tok/s, ratio "
          f"{rate['decode ours'] / rate['decode theirs']:.2f}x (CPU time "
          f"{cpu['decode theirs'] / cpu['decode ours']:.2f}x); same tokens: {same}")


if __name__ == "__main__":
    main()
