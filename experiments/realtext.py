"""Retro against GPT on real English text: the Python documentation as both corpora.

Not a test. ``data`` converts an installed copy of the Python HTML documentation (Debian:
``apt-get install python3-doc``, ``/usr/share/doc/python3.11/html``) into JSON lines, one
document per section (prose only: code blocks, tables of contents and indexes are left out),
and runs the pipeline's upstream stages on it in a scratch folder with the repo's params,
except ``corpus.db = corpus.pretrain = <that file>`` and ``tokenize.db_valid_fraction`` = the
pretrain value (the database is the training split of the pretraining corpus, as in the
reference). ``run`` trains arms of the pretrain stage (``run_pretrain``, the stage's own code)
on those inputs, one process, and appends each arm's metrics and validation curve to
``<out>/runs.jsonl``; ``table`` prints them as markdown, mean over seeds per arm.

Arms: ``gpt``; ``retro`` (the pipeline's model with ``pretrain.retrieval_warmup`` 0: encoder and
CCA at the schedule's learning rate from the first step); ``retro-rwarmN`` (``retrieval_warmup``
N: their learning rate ramps in over the first N steps; the default run's is 100);
``retro-gate`` (``model.cca_gate``: each CCA output scaled by tanh of a scalar that starts at 0);
``retro-gate-0.1`` (the same, the scalar starting at 0.1, patched in for the run only);
``retro-gate-lrN`` (the gates at N times the learning rate, patched in for the run only); ``retro-detach`` (``model.encoder_embedding_grad``
false: the encoder reads the decoder's token embedding without training it);
``retro-detach-all`` (that, and the decoder states the encoder reads as context detached too:
the encoder's gradient trains only the encoder; patched in for the run only);
``retro-zero-cca`` (CCA output projections start at zero, patched in for the run only). Every
Retro run also records, per step and CCA layer, the norm of what CCA adds to the residual
stream over the norm of that stream (``cca_ratio``).

    .venv/bin/python experiments/realtext.py data --html /usr/share/doc/python3.11/html --out /work/realtext-data
    .venv/bin/python experiments/realtext.py run --out /work/realtext-data --arms retro gpt --seeds 1234 1 2 --steps 400
    .venv/bin/python experiments/realtext.py table --out /work/realtext-data
    .venv/bin/python experiments/realtext.py data-world --out /work/world-data    # the same arms on the default world
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- HTML to documents

_SKIP = {"pre", "script", "style", "table", "nav", "footer"}
_BLOCK = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "blockquote", "div", "section"}
_HEAD = {"h1", "h2", "h3"}


class _Sections(html.parser.HTMLParser):
    """Text of the main body of a Sphinx page, split at h1-h3 headings."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = []
        self.skip = 0
        self.in_body = 0
        self.depth = 0
        self.buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            self.depth += 1
            if a.get("role") == "main" and not self.in_body:
                self.in_body = self.depth
        if tag in _SKIP:
            self.skip += 1
        if tag in _HEAD:
            self._flush()
            self.sections.append([])
        elif tag in _BLOCK:
            self._flush()

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        if tag == "a" and self._in_headerlink:
            self.skip = max(0, self.skip - 1)
            self._in_headerlink = False
        if tag in _BLOCK or tag in _HEAD:
            self._flush()
        if tag == "div":
            if self.in_body == self.depth:
                self.in_body = 0
            self.depth -= 1

    _in_headerlink = False

    def handle_data(self, data):
        if self.in_body and not self.skip:
            self.buf.append(data)

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        self.buf = []
        if text and self.sections:
            self.sections[-1].append(text)


class _Parser(_Sections):
    def handle_starttag(self, tag, attrs):
        if tag == "a" and "headerlink" in (dict(attrs).get("class") or ""):
            self._in_headerlink = True
            self.skip += 1
            return
        super().handle_starttag(tag, attrs)


def html_documents(folder: Path, min_chars: int = 600) -> list[str]:
    """One text per h1-h3 section of every page (sorted paths), sections of ``min_chars`` or more."""
    docs = []
    for path in sorted(folder.rglob("*.html")):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(("genindex", "py-modindex", "search", "_", "whatsnew/changelog")):
            continue
        p = _Parser()
        p.feed(path.read_text(encoding="utf-8", errors="replace"))
        p._flush()
        for sec in p.sections:
            text = "\n".join(sec).replace("\u00b6", "").strip()
            if len(text) >= min_chars:
                docs.append(text)
    return docs


def write_corpus(html_dir: Path, out: Path, max_docs: int, max_chars: int) -> Path:
    """JSON lines of at most ``max_docs`` sections (evenly spread over the docs, each cut at
    ``max_chars``) at ``out/corpus.jsonl``."""
    docs = html_documents(html_dir)
    if not docs:
        raise SystemExit(f"{html_dir}: no HTML sections found (apt-get install python3-doc?)")
    step = max(1, len(docs) // max_docs)
    chosen, seen = [], set()
    for text in docs[::step][:max_docs]:
        text = text[:max_chars]
        if text not in seen:
            seen.add(text)
            chosen.append(text)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in chosen:
            f.write(json.dumps({"text": text}) + "\n")
    print(f"realtext: {len(docs)} sections, kept {len(chosen)} ({sum(map(len, chosen)) / 1e6:.2f} M chars) -> {path}",
          file=sys.stderr)
    return path


def scratch_params(out: Path, corpus: Path) -> Path:
    """The repo's params with both corpora on ``corpus`` and the database as its train split."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["corpus"]["db"] = p["corpus"]["pretrain"] = str(corpus)
    p["tokenize"]["db_valid_fraction"] = p["tokenize"]["pretrain_valid_fraction"]
    path = out / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def stage(script: str, *args: str) -> None:
    cmd = [sys.executable, str(REPO / "stages" / script), *args]
    print("realtext:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=REPO, check=True)


def build_data(args) -> None:
    out = Path(args.out)
    corpus = write_corpus(Path(args.html), out, args.max_docs, args.max_chars)
    build_stages(out, str(scratch_params(out, corpus)))


def build_world(args) -> None:
    """The default generated world and the repo's params (corpora pointed into ``--out``)."""
    out = Path(args.out)
    stage("generate_world.py", "--params", str(REPO / "params.yaml"), "--out", str(out / "world"))
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["corpus"]["db"] = str(out / "world" / "reference.jsonl")
    p["corpus"]["pretrain"] = str(out / "world" / "documents.jsonl")
    (out / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    build_stages(out, str(out / "params.yaml"))


def build_stages(out: Path, params: str) -> None:
    """tokenizer .. query-neighbors of the pipeline, outputs under ``out``."""
    d = lambda *p: str(out.joinpath(*p))  # noqa: E731
    stage("tokenizer.py", "--params", params, "--out", d("tokenizer"))
    for which in ("db", "pretrain"):
        stage("tokenize_corpus.py", which, "--params", params, "--tokenizer", d("tokenizer"),
              "--out", d("tokens", which), "--metrics", d("metrics", f"tokenize_{which}.json"))
    stage("embed.py", "--params", params, "--db", d("tokens", "db"), "--tokenizer", d("tokenizer"),
          "--out", d("db", "embeddings.h5"), "--work", d("work", "embed"), "--metrics", d("metrics", "embed.json"))
    stage("train_index.py", "--params", params, "--embeddings", d("db", "embeddings.h5"),
          "--out", d("index", "trained.faiss"), "--metrics", d("metrics", "train_index.json"))
    stage("add_index.py", "--params", params, "--embeddings", d("db", "embeddings.h5"),
          "--trained", d("index", "trained.faiss"), "--out", d("index", "populated"),
          "--metrics", d("metrics", "add_index.json"))
    stage("query_neighbors.py", "--params", params, "--pretrain", d("tokens", "pretrain"),
          "--tokenizer", d("tokenizer"), "--embeddings", d("db", "embeddings.h5"),
          "--index", d("index", "populated"), "--out", d("neighbors", "neighbors.h5"),
          "--work", d("work", "query"), "--metrics", d("metrics", "query_neighbors.json"),
          "--recall-nprobe", d("metrics", "recall_nprobe.csv"))


# ----------------------------------------------------------------------------- training arms

ARMS = ("gpt", "retro", "retro-gate", "retro-gate-0.1", "retro-gate-lr10", "retro-gate-lr100", "retro-rwarm50",
        "retro-rwarm100", "retro-rwarm200", "retro-detach", "retro-detach-all", "retro-zero-cca")


class ResidualProbe:
    """Per training step, for each CCA layer: the norm of what CCA adds to the residual stream
    against the norm of the residual stream it is added to (``ratioN``, layer N); for every
    layer the same for its self-attention against the layer's input (``attn_ratioN``), GPT
    included. Frobenius norms over the positions from the end of the first chunk on, where CCA
    can be non-zero."""

    def __init__(self, model, chunk_length: int):
        self.rows: list[dict] = []
        self.current: dict = {}
        self.start = chunk_length - 1
        for i, layer in enumerate(model.layers):
            layer.norm1.register_forward_pre_hook(self._hook(f"in{i + 1}", pre=True))
            layer.attn.register_forward_hook(self._hook(f"attn{i + 1}"))
            if layer.cca is None:
                continue
            layer.cca_norm.register_forward_pre_hook(self._hook(f"x{i + 1}", pre=True))
            layer.cca.proj.register_forward_hook(self._hook(f"cca{i + 1}", gate=layer.cca_gate))

    def _hook(self, name, pre=False, gate=None):
        def hook(module, inputs, output=None):
            if not module.training or not torch.is_grad_enabled():
                return
            t = (inputs[0] if pre else output).detach()[:, self.start:]
            if gate is not None:  # what reaches the residual stream
                t = t * torch.tanh(gate.detach())
            self.current[name] = self.current.get(name, 0.0) + float(t.float().pow(2).sum())
        return hook

    def end_step(self, step: int) -> None:
        if self.current:
            row = {"step": step}
            for name in sorted(self.current):
                if name.startswith("cca"):
                    i = name[3:]
                    row[f"ratio{i}"] = (self.current[name] / max(self.current[f"x{i}"], 1e-30)) ** 0.5
                elif name.startswith("attn"):
                    i = name[4:]
                    row[f"attn_ratio{i}"] = (self.current[name] / max(self.current[f"in{i}"], 1e-30)) ** 0.5
            self.rows.append(row)
        self.current = {}


def run_arm(root: Path, arm: str, seed: int, steps: int, lr: float, clip: float, eval_interval: int) -> dict:
    """One pretrain run of ``arm`` on the data in ``root``: the stage's own ``run_pretrain`` with
    the scratch params and the overrides; returns its record (metrics, curves)."""
    import torch
    from dvclive import Live  # noqa: F401  (run_pretrain opens the log)

    from instructretro import model as M, params as P, presets, train as T
    from instructretro.pretrain import preset_training, run_pretrain
    from instructretro.pretrain_data import PretrainInputs
    from instructretro.tokenstore import TokenStore
    sys.path.insert(0, str(REPO / "stages"))
    from pretrain import model_config_from_params  # the stage script's own translation

    p = P.load(str(root / "params.yaml"))
    p.data["pretrain"].setdefault("retrieval_warmup", 0)  # scratch params written before the key existed
    vocab = TokenStore(str(root / "tokens" / "pretrain"), "train").vocab_size
    config = model_config_from_params(p, vocab, gpt=arm == "gpt")
    if arm.startswith("retro-gate"):
        config.cca_gate = True
    if arm in ("retro-detach", "retro-detach-all"):  # the encoder reads the token embedding, does not train it
        config.encoder_embedding_grad = False
    preset = presets.training(config.name)
    recipe = presets.device_recipe(config.name, gpu=torch.cuda.is_available())
    defaults = preset_training(preset, 1, p.get("pretrain.micro_batch", (int, type(None))), recipe)
    cfg = T.TrainConfig.from_params(p, "pretrain", {k: v for k, v in defaults.items() if v is not None})
    cfg.steps, cfg.seed, cfg.lr, cfg.min_lr, cfg.clip = steps, seed, lr, lr / 10, clip
    cfg.eval_interval, cfg.save_interval = eval_interval, 10**9
    # retro-rwarmN: encoder and CCA ramp in over N steps (pretrain.retrieval_warmup); every other arm: no ramp
    cfg.retrieval_warmup = int(arm.rsplit("rwarm", 1)[1]) if "rwarm" in arm else 0
    inputs = PretrainInputs(str(root / "tokens" / "pretrain"), str(root / "neighbors" / "neighbors.h5"),
                            str(root / "tokens" / "db"), str(root / "db" / "embeddings.h5"),
                            str(root / "tokenizer"), "")
    tag = f"{arm}-s{seed}-n{steps}-lr{lr:g}-c{clip:g}"
    live_dir = root / "runs" / tag
    probes: list[ResidualProbe] = []
    saved_build, saved_train = T.build_engine, T.train

    def build_engine(model, c):
        if arm == "retro-gate-0.1":  # the gates start at 0.1, so CCA writes at a tenth of its strength
            for layer in model.layers:
                if layer.cca is not None:
                    layer.cca_gate.data.fill_(0.1)
        if arm == "retro-zero-cca":
            for layer in model.layers:
                if layer.cca is not None:
                    layer.cca.proj.weight.data.zero_()
        probes.append(ResidualProbe(model, config.chunk_length))
        return saved_build(model, c)

    def train(engine, c, batch_fn, loss_fn, *args, **kwargs):
        if probes:
            def counted(step, micro, _fn=batch_fn):
                if micro == 0 and step > 0:
                    probes[0].end_step(step)
                return _fn(step, micro)
            batch_fn = counted
        out = saved_train(engine, c, batch_fn, loss_fn, *args, **kwargs)
        if probes:
            probes[0].end_step(c.steps)
        return out

    saved_groups = T.param_groups

    def param_groups(model, weight_decay, retrieval_apart=False):  # retro-gate-lrN: the gates learn N times faster
        groups = saved_groups(model, weight_decay, retrieval_apart)
        gates = {id(p) for name, p in model.named_parameters() if name.endswith(".cca_gate")}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in gates]
        scale = float(arm.rsplit("-lr", 1)[1])
        return groups + [{"params": [p for name, p in model.named_parameters() if name.endswith(".cca_gate")],
                          "weight_decay": 0.0, "lr": lr * scale, "retrieval": True}]

    T.build_engine, T.train = build_engine, train
    if "-lr" in arm:
        T.param_groups = param_groups
    saved_encode = M.Retro._encode
    if arm == "retro-detach-all":  # nor the decoder states it reads as context
        M.Retro._encode = lambda self, h, step: saved_encode(self, h.detach(), step)
    t0 = time.time()
    try:
        torch.manual_seed(seed)
        metrics = run_pretrain(inputs, config, cfg, None, root / "work" / "pretrain", str(live_dir))
    finally:
        T.build_engine, T.train, T.param_groups = saved_build, saved_train, saved_groups
        M.Retro._encode = saved_encode
    curves = {}
    for sub, name in (("val", "loss"), ("train", "loss"), ("train", "grad_norm"), ("train", "grad_norm_decoder"),
                      ("train", "grad_norm_retrieval")):
        path = live_dir / "plots" / "metrics" / sub / f"{name}.tsv"
        if path.is_file():
            rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
            curves[f"{sub}/{name}"] = {int(a): float(b) for a, b in rows}
    return {"arm": arm, "seed": seed, "steps": steps, "lr": lr, "clip": clip, "seconds": round(time.time() - t0),
            "val_loss": metrics["val_loss"], "val_loss_shuffled": metrics["val_loss_shuffled"],
            "val_loss_no_retrieval": metrics["val_loss_no_retrieval"], "curves": curves,
            "cca_ratio": probes[0].rows if probes else []}


def run_arms(args) -> None:
    root = Path(args.out)
    for seed in args.seeds:
        for arm in args.arms:
            for lr in args.lr:
                rec = run_arm(root, arm, seed, args.steps, lr, args.clip, args.eval_interval)
                with open(root / "runs.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"realtext: {arm} seed {seed} lr {lr:g} clip {args.clip:g} {args.steps} steps: "
                      f"val_loss {rec['val_loss']:.4f} (shuffled {rec['val_loss_shuffled']}, "
                      f"no retrieval {rec['val_loss_no_retrieval']}) in {rec['seconds']} s", file=sys.stderr)


def table(args) -> None:
    """Markdown: one row per (arm, steps, lr, clip), val_loss per seed and the mean."""
    import statistics

    recs = [json.loads(line) for line in open(Path(args.out) / "runs.jsonl")]
    groups: dict[tuple, dict] = {}
    for r in recs:
        groups.setdefault((r["arm"], r["steps"], r["lr"], r["clip"]), {})[r["seed"]] = r
    seeds = sorted({r["seed"] for r in recs}, key=lambda s: (s != 1234, s))
    print("| arm | steps | lr | clip | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | no retrieval (mean) |")
    print("|---|---|---|---|" + "---|" * (len(seeds) + 2))
    for (arm, steps, lr, clip), by_seed in sorted(groups.items()):
        vals = [by_seed[s]["val_loss"] if s in by_seed else None for s in seeds]
        got = [v for v in vals if v is not None]
        alone = [by_seed[s]["val_loss_no_retrieval"] for s in by_seed if by_seed[s]["val_loss_no_retrieval"]]
        print(f"| {arm} | {steps} | {lr:g} | {clip:g} | " + " | ".join(f"{v:.4f}" if v else "" for v in vals)
              + f" | {statistics.mean(got):.4f} | " + (f"{statistics.mean(alone):.4f}" if alone else "") + " |")


def curves(args) -> None:
    """Per run: validation loss at each evaluation, and at the same steps the gradient norms
    (total, decoder, retrieval; the mean over the steps since the last evaluation) and the CCA
    ratios (mean per layer over the same steps)."""
    recs = [json.loads(line) for line in open(Path(args.out) / "runs.jsonl")]
    for r in recs:
        c = r["curves"]
        print(f"\n{r['arm']} seed {r['seed']} lr {r['lr']:g} clip {r['clip']:g}: val_loss {r['val_loss']:.4f}")
        evals = sorted(int(k) for k in c.get("val/loss", {}))
        prev = 0
        for step in evals:
            def mean(key):
                vals = [v for k, v in c.get(key, {}).items() if prev < int(k) <= step]
                return sum(vals) / len(vals) if vals else float("nan")
            ratios = {}
            for row in r["cca_ratio"]:
                if prev < row["step"] <= step:
                    for k, v in row.items():
                        if k != "step":
                            ratios.setdefault(k, []).append(v)
            ratio = "  ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(ratios.items()))
            print(f"  step {step:4d}  val {c['val/loss'][str(step)]:.4f}  train {mean('train/loss'):.4f}  "
                  f"|g| {mean('train/grad_norm'):.3f}  dec {mean('train/grad_norm_decoder'):.3f}  "
                  f"ret {mean('train/grad_norm_retrieval'):.3f}  {ratio}")
            prev = step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("data", help="HTML docs -> corpus.jsonl -> tokenizer .. neighbors in --out")
    a.add_argument("--html", default="/usr/share/doc/python3.11/html")
    a.add_argument("--out", required=True)
    a.add_argument("--max-docs", type=int, default=1000)
    a.add_argument("--max-chars", type=int, default=3000)
    w = sub.add_parser("data-world", help="the default generated world -> tokenizer .. neighbors in --out")
    w.add_argument("--out", required=True)
    r = sub.add_parser("run", help="train arms on the data in --out; append to <out>/runs.jsonl")
    r.add_argument("--out", required=True)
    r.add_argument("--arms", nargs="+", choices=ARMS, default=["retro", "gpt"])
    r.add_argument("--seeds", nargs="+", type=int, default=[1234])
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--lr", nargs="+", type=float, default=[4e-3])
    r.add_argument("--clip", type=float, default=1.0)
    r.add_argument("--eval-interval", type=int, default=50)
    t = sub.add_parser("table", help="markdown table of <out>/runs.jsonl")
    t.add_argument("--out", required=True)
    t.add_argument("--curves", action="store_true", help="per run: val loss, gradient norms, CCA ratios")
    args = ap.parse_args(argv)
    if args.cmd == "data":
        build_data(args)
    elif args.cmd == "data-world":
        build_world(args)
    elif args.cmd == "run":
        run_arms(args)
    elif args.curves:
        curves(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
