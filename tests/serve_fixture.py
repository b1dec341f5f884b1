"""A tiny servable setup: tokenizer, database (tokens, embeddings, Flat index), a random tiny Retro
checkpoint, a QA file and a params.yaml whose generate section points at them.

Used by tests/test_serve.py and bench/serve.py. ``server_args`` are the paths the ask/serve
command lines take; ``stage_args`` the same paths for stages/generate.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16

QUESTIONS = ["What does Entity2 have near the river?", "When was the tower of Entity5 built?",
             "Who has a garden near the bridge?", "What is near the church of Entity7?"]


def build(root: Path, n_docs: int = 30, retrieval: str = "prompt", max_new_tokens: int = 8) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from test_embed import make_store, make_texts, shared_encoder

    from instructretro import tokenizer as tk
    from instructretro.embed import embed_database
    from instructretro.index import populate, train_index, write_index
    from instructretro.model import ModelConfig, Retro
    from instructretro.checkpoint import export_checkpoint

    root = Path(root)
    tok = root / "spm.model"
    texts = make_texts(n_docs, seed=3, words_per_doc=(20, 60))
    make_store(root / "db", texts, tok)
    embed_database(root / "db", tok, shared_encoder(), CHUNK, 64, root / "emb.h5", root / "work")
    trained, _ = train_index(root / "emb.h5", "Flat", 1000, 0)
    write_index(populate(trained, root / "emb.h5", 100), root / "pop.faiss")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tk.Tokenizer(tok).vocab_size, n_layers=2, hidden=32, heads=2, seq_length=256,
                      chunk_length=CHUNK, cca_layers=(2,), num_neighbors=2, retro=True)
    export_checkpoint(Retro(cfg), cfg, root / "ckpt")
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": ["x"]}) + "\n" for q in QUESTIONS))
    (root / "params.yaml").write_text(f"""
retro: {{chunk_length: {CHUNK}}}
embed: {{encoder: "", precision: float32, batch_size: 32, gpu_batch_size: 64, max_length: 256}}
sft: {{system: "Be short."}}
generate:
  checkpoint: {root / 'ckpt'}
  tasks:
    qa: {{path: {qa}}}
  retrieval: {retrieval}
  num_contexts: 2
  max_new_tokens: {max_new_tokens}
  batch_size: 4
  max_questions: 0
  system: null
  nprobe: 1
  efsearch: 16
  threads: 1
""")
    paths = {"--params": root / "params.yaml", "--tokenizer": tok, "--db-tokens": root / "db",
             "--embeddings": root / "emb.h5", "--index": root / "pop.faiss"}
    return {"root": root, "texts": texts, "qa": qa,
            "stage_args": [str(x) for kv in paths.items() for x in kv],
            "server_args": [str(x) for kv in paths.items() for x in kv] + ["--overlay", str(root / "serve" / "overlay.npz")]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m instructretro.serve`` on a free loopback port, stopped on exit."""

    def __init__(self, args: list[str], extra: list[str] = (), threads: int = 1, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # the server's output goes to a file: a pipe nobody reads would block it once full
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log")
        self.proc = subprocess.Popen([sys.executable, "-m", "instructretro.serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--threads", str(threads), *args, *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
