"""A Hugging Face tokenizer runs the pipeline: its EOS is the end-of-document, its pad (or EOS)
pads, the tokenizer stage copies its tokenizer files only, and bad input is one line naming
the file (no EOS; a vocabulary larger than the model's embedding)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_stage
from instructretro import data
from instructretro.errors import PipelineError
from instructretro.tokenizer import Tokenizer
from test_bad_inputs import assert_one_line_error, write_params
from test_hf_pipeline import EOS, save_llama, train_tokenizer


@pytest.fixture(scope="module")
def hf_folder(small_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    texts = [d.text for d in data.iter_documents(small_world / "documents.jsonl")][:300]
    train_tokenizer(texts, folder, 300)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))  # stands for the weights' side
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_hf_tokenizer_eos_is_the_end_of_document_and_pads_without_a_pad_token(hf_folder, small_world):
    tok = Tokenizer(hf_folder)
    raw = json.loads((hf_folder / "tokenizer.json").read_text())
    eos = next(t["id"] for t in raw["added_tokens"] if t["content"] == EOS)
    assert tok.kind == "hf-tokenizers" and tok.eod_id == eos and tok.pad_id == eos
    for doc in list(data.iter_documents(small_world / "documents.jsonl"))[:50]:
        ids = tok.encode(doc.text)
        assert eos not in ids and tok.decode(ids) == doc.text  # byte-level BPE round-trips, no BOS added
        assert tok.decode(ids + [eos]) == doc.text
    ids, spans = tok.encode_with_offsets("Pumuv was founded in 1263.")
    assert ids == tok.encode("Pumuv was founded in 1263.") and spans.shape == (len(ids), 2)
    assert spans[-1, 1] == len("Pumuv was founded in 1263.")
    # a token that begins inside a character: "é" is two bytes, the second a continuation byte
    cont = tok.continuation_mask
    assert cont.shape == (tok.vocab_size,) and cont.any() and not cont[tok.encode("a")].any()


def test_a_pad_token_is_used_when_the_tokenizer_names_one(hf_folder, tmp_path):
    folder = tmp_path / "padded"
    shutil.copytree(hf_folder, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "pad_token": {"content": "<s>"}}))
    tok = Tokenizer(folder)
    assert tok.pad_id == tok.hf.token_to_id("<s>") != tok.eod_id


def test_tokenizer_stage_copies_the_tokenizer_files_never_the_weights(hf_folder, tmp_path):
    params = write_params(tmp_path, lambda p: p["tokenizer"].update(model=str(hf_folder)))
    out = tmp_path / "tokenizer"
    r = run_stage("tokenizer.py", "--params", params, "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert Tokenizer(out).digest == Tokenizer(hf_folder).digest
    assert "hf-tokenizers" in r.stdout


def test_tokenizer_with_no_eos_is_one_line_naming_the_file(hf_folder, tmp_path):
    folder = tmp_path / "no-eos"
    shutil.copytree(hf_folder, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    params = write_params(tmp_path, lambda p: p["tokenizer"].update(model=str(folder)))
    r = run_stage("tokenizer.py", "--params", params, "--out", tmp_path / "tokenizer")
    assert_one_line_error(r, f"{folder / 'tokenizer_config.json'}: it names no eos_token")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(PipelineError, match="tokenizer_config.json: its eos_token '<|end|>' is not in the vocabulary"):
        Tokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(PipelineError, match="tokenizer_config.json: it names no eos_token"):
        Tokenizer(folder)
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(PipelineError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(folder)


def test_a_vocabulary_larger_than_the_embedding_is_refused_naming_the_tokenizer(hf_folder, tmp_path):
    """pretrain with init_from an HF folder whose embedding has fewer rows than the tokenizer."""
    from instructretro.tokenstore import TokenStoreWriter

    tok = Tokenizer(hf_folder)
    model = tmp_path / "llama"
    save_llama(model, tok.vocab_size - 10, tok.eod_id, seed=0)
    store = TokenStoreWriter(tmp_path / "tokens", tok.vocab_size, tok.eod_id)
    store.add("train", 1, np.arange(5, 70))
    store.add("valid", 2, np.arange(5, 70))
    store.close()
    params = write_params(tmp_path, lambda p: (p["pretrain"].update(init_from=str(model)),
                                                p["model"].update(cca_layers=[2])))
    r = run_stage("pretrain.py", "--params", params, "--tokens", tmp_path / "tokens", "--tokenizer", hf_folder,
                  "--out", tmp_path / "ckpt", "--work", tmp_path / "work", "--live", tmp_path / "live",
                  "--metrics", tmp_path / "m.json")
    assert_one_line_error(r, f"{hf_folder / 'tokenizer.json'}: vocabulary of {tok.vocab_size} tokens is larger "
                             f"than the embedding of {model / 'config.json'} \\({tok.vocab_size - 10} rows\\)")
    with pytest.raises(PipelineError, match="tokenizer.json: vocabulary of"):
        tok.check_fits(tok.vocab_size - 1, "ckpt/config.json")
    tok.check_fits(tok.vocab_size, "ckpt/config.json")


def test_estimate_sizes_the_imported_architecture(tmp_path, capsys):
    """``make estimate HF=<folder>``: the GPT count is transformers' own; Retro adds the preset's
    encoder and CCA on the imported decoder."""
    from transformers import AutoModelForCausalLM

    from instructretro import estimate

    save_llama(tmp_path / "llama", 320, 1, seed=0)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama")).num_parameters()
    gpt = estimate.imported_config(str(tmp_path / "llama"), "tiny", retro=False)
    assert gpt.kv_heads == 2 and estimate.parameter_counts(gpt)["total"] == theirs
    retro = estimate.parameter_counts(estimate.imported_config(str(tmp_path / "llama"), "tiny"))
    assert retro["encoder"] > 0 and retro["cca"] > 0 and retro["total"] > theirs
    assert estimate.main(["--hf", str(tmp_path / "llama"), "--model", "tiny", "--gpus", "1", "--gpu-mem", "80"]) == 0
    assert f"{theirs + retro['encoder'] + retro['cca']:,} parameters" in capsys.readouterr().out


def test_a_sentencepiece_tokenizer_model_in_an_hf_folder(small_tokenizer, small_world, tmp_path):
    """Llama 2's layout: ``tokenizer.model`` (SentencePiece) and no tokenizer.json; the EOS named in
    tokenizer_config.json, the pad of the SentencePiece model."""
    import sentencepiece as spm

    folder = tmp_path / "llama2"
    folder.mkdir()
    shutil.copyfile(small_tokenizer, folder / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": sp.id_to_piece(sp.eos_id())}))
    tok = Tokenizer(folder)
    assert tok.kind == "hf-sentencepiece" and (tok.eod_id, tok.pad_id) == (sp.eos_id(), sp.pad_id())
    text = next(iter(data.iter_documents(small_world / "documents.jsonl"))).text
    assert tok.encode(text) == sp.encode(text) and tok.decode(tok.encode(text) + [tok.eod_id]) == text
