"""The generate module: tasks, prompts, fitting, retrieval modes, and cached greedy decoding."""

import json
import re

import numpy as np
import pytest

from instructretro import data, tokenizer as tk
from instructretro.errors import PipelineError
from instructretro.generate import (
    EncoderNeighbors, Settings, answer_questions, clean_prediction, fit_prompt, Task, parse_task, parse_tasks,
    prompt_budget,
)
from instructretro.prompts import build_prompt, encode_prompt

CL = 8  # chunk length in these tests

FACTS = [f"The city of Town{i} lies on the River{i} and its mayor is Person{i}." for i in range(40)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    text = "\n".join(FACTS * 3 + ["System: User: Assistant: Answer the following question with a short span. "
                                 "What river runs through the city? The answer is"] * 5)
    path.write_bytes(tk.train([text], vocab_size=400, sample_bytes=1_000_000))
    return tk.Tokenizer(path)


class FakeRetriever:
    """Chunk i of the DB is FACTS[i]; search returns the facts that share the most words."""

    def __init__(self, tok):
        self.tok = tok
        self.searches = []

    def search(self, texts, n):
        self.searches.append(list(texts))
        out = np.full((len(texts), n), -1, dtype=np.int64)
        for r, t in enumerate(texts):
            words = set(t.replace("?", " ").replace(".", " ").split())
            scores = [len(words & set(f.replace(".", " ").split())) for f in FACTS]
            best = sorted(range(len(FACTS)), key=lambda i: (-scores[i], i))[:n]
            out[r, : len(best)] = best
        return out

    def chunk_text(self, i, continuation=True):
        return FACTS[i]

    def neighbor_tokens(self, ids):
        ids = np.asarray(ids)
        toks = np.full(ids.shape + (2 * CL,), tk.EOD_ID, dtype=np.int64)
        mask = np.zeros(toks.shape, dtype=bool)
        for idx in np.ndindex(ids.shape):
            if ids[idx] >= 0:
                t = self.tok.encode(FACTS[ids[idx]])[: 2 * CL]
                toks[idx][: len(t)] = t
                mask[idx][: len(t)] = True
        return toks, mask


def test_parse_tasks_defaults_and_errors():
    tasks = parse_tasks({"nq": {"path": "a.jsonl"}, "tqa": {"path": "b.jsonl", "style": "long"}})
    assert [(t.name, t.path, t.style) for t in tasks] == [("nq", "a.jsonl", "short"), ("tqa", "b.jsonl", "long")]
    assert parse_task("nq", {"path": "a.jsonl", "style": "long"}) == Task("nq", "a.jsonl", "long")
    with pytest.raises(PipelineError, match=r"generate\.tasks' is a list; write it as a mapping"):
        parse_tasks([{"name": "nq", "path": "a"}])
    with pytest.raises(PipelineError, match=r"task name '\.\./x'"):
        parse_tasks({"../x": {"path": "a"}})
    with pytest.raises(PipelineError, match=r"generate\.tasks\.x\.style"):
        parse_tasks({"x": {"path": "a", "style": "poem"}})
    with pytest.raises(PipelineError, match=r"generate\.tasks\.x' has unknown keys \['name'\]"):
        parse_tasks({"x": {"name": "x", "path": "a"}})
    with pytest.raises(PipelineError, match=r"generate\.tasks\.x' must be a mapping with a string 'path'"):
        parse_tasks({"x": "a.jsonl"})
    with pytest.raises(PipelineError, match=r"generate\.tasks"):
        parse_tasks({})


def test_prompt_is_the_reference_format():
    p = build_prompt("who is the mayor of Town3", ["ctx one", "ctx two"], "Be short.")
    assert p == ("System: Be short.\n\nctx one\n\nctx two\n\nUser: Answer the following question with a "
                 "short span. who is the mayor of Town3?\n\nAssistant: The answer is")
    assert build_prompt("q?", [], "").startswith("System: \n\nUser: Answer the following question with a short span. q?\n\n")


def test_fit_prompt_drops_contexts_then_cuts(tok):
    q = "What river runs through the city of Town3?"
    ctxs = FACTS[:6]
    full = encode_prompt(tok, q, ctxs, "Be short.")
    ids, n, cut = fit_prompt(tok, q, ctxs, "Be short.", "short", budget=len(full))
    assert (ids, n, cut) == (full, 6, False)
    two = encode_prompt(tok, q, ctxs[:2], "Be short.")
    ids, n, cut = fit_prompt(tok, q, ctxs, "Be short.", "short", budget=len(two) + 1)
    assert (ids, n, cut) == (two, 2, False)
    ids, n, cut = fit_prompt(tok, q, ctxs, "Be short.", "short", budget=5)
    assert n == 0 and cut and len(ids) == 5
    assert ids == encode_prompt(tok, q, [], "Be short.")[-5:]  # the end (answer prefix) is kept
    assert prompt_budget(256, 64, 64) == 192 and prompt_budget(256, 60, 64) == 192
    with pytest.raises(PipelineError, match="max_new_tokens"):
        prompt_budget(64, 64, 64)


@pytest.mark.parametrize(
    "text, style, expected",
    [
        (" Paris.\nUser: next", "short", "Paris."),
        (" Paris", "short", "Paris"),
        ("\n Paris\nmore", "short", "Paris"),
        (" Paris User: who", "short", "Paris"),
        (" It is Paris.\nBecause.\nUser: x", "long", "It is Paris.\nBecause."),
        ("", "short", ""),
        (" The answer is Paris.\n", "short", "Paris."),
        ("The answer is", "short", ""),
    ],
)
def test_clean_prediction(text, style, expected):
    assert clean_prediction(text, style) == expected


def _fake_generate(answer_of, calls=None):
    """A stand-in decoder honouring the contract: left-pad to a chunk boundary, lock-step rows,
    call neighbors_fn(b, j, chunk) when chunk j of row b completes, stop at EOD."""

    def generate(model, prompts, max_new_tokens, eod_id, neighbors_fn=None, pad_id=None):
        width = max(-(-len(p) // CL) * CL for p in prompts)
        rows = [[tk.PAD_ID] * (width - len(p)) + list(p) for p in prompts]
        if neighbors_fn is not None:
            for b, row in enumerate(rows):
                for j in range(width // CL):
                    neighbors_fn(b, j, row[j * CL : (j + 1) * CL])
        outs = []
        for b, p in enumerate(prompts):
            new = answer_of(p)[:max_new_tokens]
            outs.append(new)
            if neighbors_fn is not None:
                full = rows[b] + new
                for j in range(width // CL, len(full) // CL):
                    neighbors_fn(b, j, full[j * CL : (j + 1) * CL])
        if calls is not None:
            calls.append(len(prompts))
        return outs

    return generate


def test_answer_questions_prompt_mode_end_to_end(tok, tmp_path):
    qa = tmp_path / "qa.jsonl"
    recs = [{"question": f"Who is the mayor of Town{i}", "answer": [f"Person{i}"]} for i in (3, 17, 5)]
    recs.append({"question": "Who is the mayor of Town9", "answer": ["Person9"], "ctxs": [{"title": "T", "text": "given passage"}]})
    qa.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = list(data.iter_qa(qa))
    retriever = FakeRetriever(tok)
    seen = {}

    def answer_of(prompt):
        text = tok.decode(prompt)
        seen[text.split("Town")[-1].split("?")[0]] = text
        return tok.encode(" Person" + text.split("Town")[-1].split("?")[0] + "\nUser: more") + [tk.EOD_ID, 5, 6]

    calls = []
    settings = Settings(retrieval="prompt", num_contexts=2, max_new_tokens=64, batch_size=3, system="Be short.")
    answers, counts = answer_questions(None, tok, records, settings, generate_fn=_fake_generate(answer_of, calls),
                                       retriever=retriever, seq_length=512, chunk_length=CL)
    assert [a["prediction"] for a in answers] == ["Person3", "Person17", "Person5", "Person9"]
    assert [a["answer"] for a in answers] == [r["answer"] for r in records]
    assert answers[0]["prompt_chunk_ids"][0] == 3 and len(answers[0]["prompt_chunk_ids"]) == 2
    assert answers[1]["prompt_chunk_ids"][0] == 17
    assert answers[3]["prompt_chunk_ids"] == [] and answers[3]["context_source"] == "given"
    # the texts the prompt held, so a reader (and score's gold_in_context) can check them
    assert answers[0]["contexts"] == [FACTS[i] for i in answers[0]["prompt_chunk_ids"]]
    assert answers[3]["contexts"] == ["T\ngiven passage"]
    assert all("encoder_neighbors" not in a for a in answers)
    assert "T\ngiven passage" in seen["9"] and FACTS[3] in seen["3"]
    assert retriever.searches == [[r["question"] for r in records[:3]]]  # one batched search, ctxs skip it
    assert calls == [3, 1]
    assert counts["questions"] == 4 and counts["prompts_cut"] == 0 and counts["contexts_dropped"] == 0


def test_answer_questions_none_mode_needs_no_retriever(tok):
    records = [{"question": "Who is the mayor of Town1?", "answer": ["Person1"]}]
    settings = Settings(retrieval="none", num_contexts=3, batch_size=4, system="")
    answers, _ = answer_questions(None, tok, records, settings, generate_fn=_fake_generate(lambda p: tok.encode(" x")),
                                  retriever=None, seq_length=256, chunk_length=CL)
    assert answers[0]["prediction"] == "x" and answers[0]["context_source"] == "none"
    assert "contexts" not in answers[0] and "encoder_neighbors" not in answers[0]  # closed-book
    with pytest.raises(PipelineError, match="Retro"):
        answer_questions(None, tok, records, Settings(retrieval="encoder"), generate_fn=None,
                         retriever=FakeRetriever(tok), seq_length=256, chunk_length=CL, num_neighbors=0)


def test_encoder_mode_retrieves_each_chunk_by_its_text(tok):
    records = [{"question": "What river runs through the city of Town7?", "answer": ["River7"]},
               {"question": "Who?", "answer": ["x"]}]
    retriever = FakeRetriever(tok)
    answer = tok.encode(" River7 and the city of Town7 has mayor Person7 and more words here")
    settings = Settings(retrieval="encoder", num_contexts=2, max_new_tokens=2 * CL, batch_size=2, system="")
    answers, counts = answer_questions(None, tok, records, settings, generate_fn=_fake_generate(lambda p: answer),
                                       retriever=retriever, seq_length=256, chunk_length=CL, num_neighbors=2)
    prompts = [encode_prompt(tok, r["question"], [], "", answer_prefix=False) for r in records]
    assert all(tok.decode(p).endswith("Assistant:") for p in prompts)
    width = max(-(-len(p) // CL) * CL for p in prompts)
    for a, prompt in zip(answers, prompts):
        assert a["context_source"] == "none" and a["prompt_chunk_ids"] == []
        # one neighbor list per completed non-padding chunk, in order, each searched by its own text
        full = [tk.PAD_ID] * (width - len(prompt)) + prompt + answer[: 2 * CL]
        chunks = [full[j * CL : (j + 1) * CL] for j in range(len(full) // CL)]
        texts = [tok.decode(c) for c in chunks if tok.decode(c).strip()]
        assert a["encoder_chunk_ids"] == [list(retriever.search([t], 2)[0]) for t in texts]
        # every neighbor the encoder saw, once, with its text
        seen = list(dict.fromkeys(x for ids in a["encoder_chunk_ids"] for x in ids))
        assert a["encoder_neighbors"] == [{"id": x, "text": FACTS[x]} for x in seen]
        assert a["contexts"] == []
    # the first search is the batched prefetch of the prompts' chunks; the answer chunks follow
    assert len(retriever.searches[0]) > 2
    assert any("Town7" in t for s in retriever.searches[1:] for t in s)


def test_encoder_neighbors_prefetch_and_cache(tok):
    retriever = FakeRetriever(tok)
    fn = EncoderNeighbors(retriever, tok, k=3, chunk_length=CL)
    prompt = tok.encode(FACTS[4])
    fn.prefetch([prompt])
    assert len(retriever.searches) == 1
    padded = [tk.PAD_ID] * (-len(prompt) % CL) + prompt
    for j in range(len(padded) // CL):
        out = fn(0, j, padded[j * CL : (j + 1) * CL])
        toks, mask = out
        assert toks.shape == (3, 2 * CL) and mask.shape == (3, 2 * CL)
    assert len(retriever.searches) == 1  # all served from the prefetch
    assert fn(1, 0, [tk.PAD_ID] * CL) is None  # a padding chunk has no neighbors
    assert [j for j, _ in fn.calls[0]] == list(range(len(padded) // CL))


# ----------------------------------------------------------------------------- with the real decoder


@pytest.fixture(scope="module")
def tiny_retro(tok):
    import torch

    from instructretro.model import ModelConfig, Retro

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=2, hidden=32, heads=2, seq_length=256,
                      chunk_length=CL, cca_layers=(1, 2), num_neighbors=2, retro=True)
    return Retro(cfg).double().eval()


@pytest.mark.parametrize("mode", ["both", "none"])
def test_kv_cache_gives_the_same_answers_as_recomputation(tok, tiny_retro, mode):
    from functools import partial

    from instructretro.decoding import greedy_generate

    records = [{"question": "What river runs through the city of Town1?", "answer": ["River1"]},
               {"question": "Who?", "answer": ["x"]}]
    runs = []
    for use_cache in (True, False):
        retriever = FakeRetriever(tok)
        settings = Settings(retrieval=mode, num_contexts=1, max_new_tokens=CL + 3, batch_size=2, system="Short.")
        answers, counts = answer_questions(tiny_retro, tok, records, settings,
                                           generate_fn=partial(greedy_generate, use_cache=use_cache),
                                           retriever=retriever, seq_length=256, chunk_length=CL, num_neighbors=2)
        runs.append((answers, retriever.searches))
    assert runs[0] == runs[1]
    assert counts["new_tokens"] > 0


def test_encoder_retrieval_happens_at_each_chunk_boundary(tok, tiny_retro):
    from instructretro.decoding import greedy_generate

    records = [{"question": "What river runs through the city of Town3?", "answer": ["River3"]},
               {"question": "Who is the mayor of Town12? Tell me now.", "answer": ["Person12"]}]
    raw = {}

    def generate(model, prompts, max_new_tokens, eod_id, neighbors_fn=None, pad_id=None):
        outs = greedy_generate(model, prompts, max_new_tokens, eod_id, neighbors_fn=neighbors_fn)
        raw.update({tuple(p): o for p, o in zip(prompts, outs)})
        return outs

    retriever = FakeRetriever(tok)
    n_new = 2 * CL + 3
    settings = Settings(retrieval="encoder", max_new_tokens=n_new, batch_size=2, system="Short.")
    answers, _ = answer_questions(tiny_retro, tok, records, settings, generate_fn=generate,
                                  retriever=retriever, seq_length=256, chunk_length=CL, num_neighbors=2)
    prompts = [encode_prompt(tok, r["question"], [], "Short.", answer_prefix=False) for r in records]
    width = max(-(-len(p) // CL) * CL for p in prompts)
    prefetched = set(retriever.searches[0])
    for a, p in zip(answers, prompts):
        out = raw[tuple(p)]
        full = [tk.PAD_ID] * (width - len(p)) + p + out
        # prompt chunks at the start, then each generated chunk once the token ending it exists
        # and some token still has to be predicted after it
        asked = [c for c in range(len(full) // CL) if c < width // CL or (c + 1) * CL < width + len(out)]
        texts = [tok.decode(full[c * CL : (c + 1) * CL]) for c in asked]
        texts = [t for t in texts if t.strip()]
        assert len(texts) >= width // CL - (width - len(p)) // CL + (len(out) - 1) // CL - 1
        assert a["encoder_chunk_ids"] == [list(FakeRetriever(tok).search([t], 2)[0]) for t in texts]
        assert all(t in prefetched for t in texts[: -(-len(p) // CL)])  # prompt chunks came from the prefetch


# ----------------------------------------------------------------------------- the stage


def _stage_setup(tmp_path, small_tokenizer, qa_lines, retro=True):
    import torch

    from instructretro.model import ModelConfig, Retro
    from instructretro.checkpoint import export_checkpoint

    vocab = tk.Tokenizer(small_tokenizer).vocab_size
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layers=2, hidden=32, heads=2, seq_length=256, chunk_length=64,
                      cca_layers=(2,), num_neighbors=1, retro=retro)
    export_checkpoint(Retro(cfg), cfg, tmp_path / "ckpt")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(line + "\n" for line in qa_lines))
    (tmp_path / "params.yaml").write_text(f"""
retro: {{chunk_length: 64}}
sft: {{system: "Be short."}}
generate:
  checkpoint: {tmp_path / 'ckpt'}
  tasks:
    nq: {{path: {qa}}}
  retrieval: none
  num_contexts: 2
  max_new_tokens: 5
  batch_size: 2
  max_questions: 0
  system: null
  nprobe: 1
  efsearch: 1
  threads: 1
""")
    return ["--params", tmp_path / "params.yaml", "--tokenizer", small_tokenizer, "--task", "nq",
            "--out", tmp_path / "answers" / "nq.jsonl", "--metrics", tmp_path / "metrics" / "nq.json"]


def test_generate_stage_closed_book_writes_answers_deterministically(tmp_path, small_tokenizer):
    from conftest import read_jsonl, run_stage

    lines = [json.dumps({"question": "who got the first nobel prize in physics", "answer": ["Wilhelm Conrad Röntgen"]}),
             json.dumps({"question": "What river runs through Kiawin?", "answers": ["Luplouv"]}),
             json.dumps({"question": "q3", "answer": "x"})]
    args = _stage_setup(tmp_path, small_tokenizer, lines)
    proc = run_stage("generate.py", *args)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "answers" / "nq.jsonl"
    answers = read_jsonl(out)
    assert [a["question"] for a in answers] == ["who got the first nobel prize in physics", "What river runs through Kiawin?", "q3"]
    assert [a["answer"] for a in answers] == [["Wilhelm Conrad Röntgen"], ["Luplouv"], ["x"]]
    assert all(isinstance(a["prediction"], str) and a["new_tokens"] <= 5 for a in answers)
    assert all(a["context_source"] == "none" and a["prompt_chunk_ids"] == [] for a in answers)
    metrics = json.loads((tmp_path / "metrics" / "nq.json").read_text())
    assert metrics["questions"] == 3 and metrics["prompts_cut"] == 0
    first = out.read_bytes()
    assert run_stage("generate.py", *args).returncode == 0
    assert out.read_bytes() == first


def test_generate_stage_refuses_a_checkpoint_trained_with_another_tokenizer(tmp_path, small_tokenizer):
    """train.json records the tokenizer's content hash: another tokenizer is one line naming
    both; a checkpoint without the record is not checked."""
    from conftest import run_stage
    from instructretro.checkpoint import tokenizer_digest

    args = _stage_setup(tmp_path, small_tokenizer, [json.dumps({"question": "q?", "answer": ["a"]})])
    (tmp_path / "ckpt" / "train.json").write_text(json.dumps(
        {"tokenizer": {"path": "data/tokenizer/spm.model", "sha256": "ab" * 32}}))
    proc = run_stage("generate.py", *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: {tmp_path / 'ckpt'}: trained with tokenizer data/tokenizer/spm.model "
                                   f"(sha256 abababababab), but the tokenizer here is {small_tokenizer} (sha256 "
                                   f"{tokenizer_digest(small_tokenizer)[:12]}); its token ids mean other pieces: use "
                                   "the tokenizer the checkpoint was trained with, or retrain from it")
    (tmp_path / "ckpt" / "train.json").write_text(json.dumps(
        {"tokenizer": {"path": str(small_tokenizer), "sha256": tokenizer_digest(small_tokenizer)}}))
    assert run_stage("generate.py", *args).returncode == 0
    (tmp_path / "ckpt" / "train.json").unlink()  # an old checkpoint: loads unchecked
    assert run_stage("generate.py", *args).returncode == 0


@pytest.mark.parametrize("content, detail", [(b'{"precision": ', "malformed JSON"), (b"\xff\xfe{}", "malformed JSON"),
                                             (b'["bf16"]', "expected a JSON object, got list")])
def test_a_malformed_train_json_is_one_line_naming_it(tmp_path, small_tokenizer, content, detail):
    """Both readers of a checkpoint's train.json (its precision, its tokenizer) refuse a broken
    one in one line naming the file, undecodable bytes included."""
    from instructretro.checkpoint import check_tokenizer, checkpoint_precision

    (tmp_path / "train.json").write_bytes(content)
    for read in (lambda: checkpoint_precision(tmp_path), lambda: check_tokenizer(tmp_path, small_tokenizer)):
        with pytest.raises(PipelineError, match=rf"^{re.escape(str(tmp_path / 'train.json'))}: {detail}"):
            read()


def test_generate_stage_malformed_qa_line_names_file_and_line(tmp_path, small_tokenizer):
    from conftest import run_stage

    lines = [json.dumps({"question": "ok?", "answer": ["a"]}), json.dumps({"question": "no answer"})]
    args = _stage_setup(tmp_path, small_tokenizer, lines)
    proc = run_stage("generate.py", *args)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'qa.jsonl'}:2: 'answer' must be a non-empty list of strings"
    assert not (tmp_path / "answers" / "nq.jsonl").exists()
    proc = run_stage("generate.py", *args[:4], "--task", "tqa", *args[6:])
    assert proc.returncode == 1 and "no task named 'tqa'" in proc.stderr
    (tmp_path / "qa.jsonl").write_text("\n")  # no questions: an error, not a score over 0 questions
    proc = run_stage("generate.py", *args)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'qa.jsonl'}: no questions in the QA file"


def test_the_tokenizer_record_is_the_same_for_the_model_file_and_its_folder(tmp_path, small_tokenizer):
    """Stages name the tokenizer folder (``data/tokenizer``), code may hold the ``spm.model`` inside
    it: both must record one hash, or a checkpoint trained through one is refused through the other."""
    import shutil

    from instructretro.checkpoint import tokenizer_digest

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shutil.copyfile(small_tokenizer, folder / "spm.model")
    assert tokenizer_digest(folder) == tokenizer_digest(small_tokenizer) == tk.Tokenizer(folder).digest
