"""The whole pipeline on an imported Hugging Face decoder and its own tokenizer, with real DVC.

A tiny random Llama (transformers, saved as safetensors) and a byte-level BPE tokenizer trained
here with ``tokenizers`` on the test corpus (EOS ``</s>``, no pad token) go in as
``tokenizer.model`` and ``pretrain.init_from``: tokenize, database, neighbors, continued
pretraining, SFT, generate and score all run on them, and ``dvc status`` is then clean. Then
the two invalidation cases: new weights with the same tokenizer rerun pretraining and what
follows, never the database stages; a new tokenizer makes every stage from tokenize stale.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import run_stage
from e2e import copy_repo, dvc, ran_stages

pytestmark = pytest.mark.slow

EOS = "</s>"
DATABASE = {"tokenize@db", "embed", "train-index", "add-index"}
# the stages that read data/tokenizer (dvc.yaml): a new tokenizer makes exactly these stale
READ_TOKENIZER = {"tokenize@db", "tokenize@pretrain", "embed", "query-neighbors", "pretrain", "pretrain-gpt",
                  "sft", "generate@world_qa"}


def train_tokenizer(texts, folder, vocab_size):
    """A byte-level BPE ``tokenizer.json`` with an EOS named in ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": EOS}))
    return tok


def save_llama(folder, vocab_size, eos_id, seed):
    """A tiny random Llama (GQA, rope_theta 1e6) in ``folder`` as config.json + model.safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=1e6, bos_token_id=0, eos_token_id=eos_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)


def _texts(repo):
    for name in ("reference.jsonl", "documents.jsonl"):
        for line in (repo / "data" / "world" / name).read_text().splitlines():
            yield json.loads(line)["text"]


def _set_params(repo, **values):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in values.items():
        section, name = key.split(".")
        params[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _stale(repo) -> set[str]:
    return set(json.loads(dvc(repo, "status", "--json").stdout or "{}"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("hf-pipeline"), {"pretrain.micro_batch": 2, "sft.micro_batch": 2})
    dvc(repo, "repro", "generate-world")
    tok = train_tokenizer(list(_texts(repo)), repo / "hf1", 400)
    vocab = 448  # the embedding may be larger than the tokenizer's vocabulary (padded rows)
    save_llama(repo / "hf1", vocab, tok.token_to_id(EOS), seed=1)
    _set_params(repo, **{"tokenizer.model": "hf1", "pretrain.init_from": "hf1", "model.cca_layers": [2, 4]})
    first = dvc(repo, "repro")
    return repo, tok, first.stdout


def test_every_stage_runs_on_the_imported_model_and_its_tokenizer(built):
    repo, tok, out = built
    from instructretro.checkpoint import tokenizer_digest
    from instructretro.tokenizer import Tokenizer
    from instructretro.tokenstore import TokenStore

    assert {"tokenize@db", "embed", "query-neighbors", "pretrain", "sft", "generate@world_qa",
            "score@world_qa"} <= set(ran_stages(out))
    assert _stale(repo) == set()
    ours = Tokenizer(repo / "data" / "tokenizer")
    assert ours.kind == "hf-tokenizers" and ours.eod_id == tok.token_to_id(EOS) and ours.pad_id == ours.eod_id
    assert sorted(p.name for p in (repo / "data" / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    store = TokenStore(repo / "data" / "tokens" / "pretrain", "train")
    assert store.eod_id == ours.eod_id and store.vocab_size == tok.get_vocab_size()
    text = json.loads((repo / "data" / "world" / "documents.jsonl").read_text().splitlines()[0])["text"]
    assert any(list(store.doc(i)) == tok.encode(text, add_special_tokens=False).ids for i in range(len(store)))

    pretrain = json.loads((repo / "data" / "checkpoints" / "pretrain" / "config.json").read_text())
    assert pretrain["kv_heads"] == 2 and pretrain["norm"] == "rmsnorm" and pretrain["vocab_size"] == 448
    assert pretrain["retro"] and pretrain["cca_gate"] and pretrain["name"] == "tiny"
    for stage in ("pretrain", "sft"):
        info = json.loads((repo / "data" / "checkpoints" / stage / "train.json").read_text())
        assert info["tokenizer"]["sha256"] == tokenizer_digest(repo / "data" / "tokenizer")
    # the imported model evaluated as it is (make eval-ppl CKPT=<HF folder>): Retro with closed gates
    r = run_stage("pretrain.py", "--eval-only", "hf1", "--metrics", "eval.json", cwd=repo)
    assert r.returncode == 0, r.stderr[-2000:]
    evaluated = json.loads((repo / "eval.json").read_text())
    assert evaluated["steps"] == 0 and evaluated["val_loss"] == pytest.approx(evaluated["val_loss_no_retrieval"])
    assert evaluated["val_loss"] > json.loads((repo / "metrics" / "pretrain.json").read_text())["val_loss"]
    # make export-hf of the SFT checkpoint with the pipeline's tokenizer folder: transformers loads both
    r = subprocess.run([sys.executable, "-m", "instructretro.hf", "export", "CKPT=data/checkpoints/sft", "OUT=export",
                        "TOKENIZER=data/tokenizer"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(str(repo / "export"))
    assert exported.config.vocab_size == 448 and exported.config.num_key_value_heads == 2
    assert AutoTokenizer.from_pretrained(str(repo / "export")).encode(text, add_special_tokens=False) == ours.encode(text)
    answers = [json.loads(line) for line in (repo / "data" / "answers" / "world_qa.jsonl").read_text().splitlines()]
    assert answers and all(isinstance(a["prediction"], str) and a["prompt_tokens"] > 0 for a in answers)
    score = json.loads((repo / "metrics" / "score" / "world_qa.json").read_text())
    assert score["count"] == len(answers)


def test_new_weights_rerun_pretraining_and_after_never_the_database(built):
    repo, tok, _ = built
    hf2 = repo / "hf2"
    hf2.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf2 / name).write_bytes((repo / "hf1" / name).read_bytes())
    save_llama(hf2, 448, tok.token_to_id(EOS), seed=2)
    _set_params(repo, **{"tokenizer.model": "hf2", "pretrain.init_from": "hf2"})
    ran = set(ran_stages(dvc(repo, "repro").stdout))
    assert {"pretrain", "pretrain-gpt", "sft", "generate@world_qa"} <= ran
    assert not ran & (DATABASE | {"tokenize@pretrain", "query-neighbors"}), ran  # the tokenizer folder is unchanged
    assert _stale(repo) == set()


def test_a_new_tokenizer_makes_every_stage_from_tokenize_stale(built, tmp_path):
    repo, tok, _ = built
    train_tokenizer(list(_texts(repo))[:200], repo / "hf3", 300)
    save_llama(repo / "hf3", 448, tok.token_to_id(EOS), seed=3)
    _set_params(repo, **{"tokenizer.model": "hf3"})
    ran = ran_stages(dvc(repo, "repro", "tokenizer").stdout)
    assert ran == ["tokenizer"]
    assert _stale(repo) == READ_TOKENIZER
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=repo, check=True)
