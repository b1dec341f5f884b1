"""The server and `ask`: the real server process on a loopback port over a tiny checkpoint and
database, called with real HTTP clients (the `openai` package for the OpenAI endpoints)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from conftest import REPO, read_jsonl, run_stage
from serve_fixture import QUESTIONS, Server, build

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACT = "The zorblat of Quimby Vale is painted ultramarine every winter by the lamplighters."
FACT_QUESTION = "What colour is the zorblat of Quimby Vale painted?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(setup):
    with Server(setup["server_args"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stage_answers(setup):
    out = setup["root"] / "answers.jsonl"
    proc = run_stage("generate.py", *setup["stage_args"], "--task", "qa", "--out", out,
                     "--metrics", setup["root"] / "generate.json")
    assert proc.returncode == 0, proc.stderr
    return read_jsonl(out)


@pytest.fixture(scope="module")
def assistant(setup):
    from instructretro.ask import Assistant

    a = setup["stage_args"]
    return Assistant(a[1], a[3], a[5], a[7], a[9], overlay=str(setup["root"] / "inproc" / "overlay.npz"))


def test_ask_and_server_answer_as_the_generate_stage(setup, server, stage_answers):
    http = httpx.Client(base_url=server.url, timeout=60)
    for want in stage_answers:
        got = http.post("/v1/ask", json={"question": want["question"]}).json()
        assert got["answer"] == want["prediction"]
        assert [c["id"] for c in got["chunks"] if c["used"] == "prompt"] == want["prompt_chunk_ids"]
        assert len(want["prompt_chunk_ids"]) == 2 and [c["text"] for c in got["chunks"]] == want["contexts"]
        assert all(c["source"] == "database" and isinstance(c["score"], float) for c in got["chunks"])
    proc = subprocess.run([sys.executable, "-m", "instructretro.ask", QUESTIONS[1], "--json", *setup["server_args"]],
                          capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    one = json.loads(proc.stdout)
    assert one["answer"] == stage_answers[1]["prediction"] and one["retrieval"] == "prompt"
    assert [c["doc_id"] for c in one["chunks"]] and all(c["text"] for c in one["chunks"])
    from instructretro.ask import format_answer

    plain = format_answer(one)  # what `ask` prints without --json
    assert plain.startswith(one["answer"] + "\n") and f"document {one['chunks'][0]['doc_id']}" in plain


def test_openai_client_completions_chat_models_and_streams(client):
    assert [m.id for m in client.models.list()] == ["instructretro"]
    plain = client.completions.create(model="instructretro", prompt="Entity2 has a", max_tokens=5)
    streamed = client.completions.create(model="instructretro", prompt="Entity2 has a", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert plain.usage.completion_tokens > 0 and plain.choices[0].finish_reason in ("stop", "length")
    used = plain.choices[0].model_extra["retrieval"]
    assert used["mode"] == "prompt" and len(used["chunks"]) == 2 and used["chunks"][0]["doc_id"]
    none = client.completions.create(model="instructretro", prompt="Entity2 has a", max_tokens=5,
                                     extra_body={"retrieval": "none"})
    assert none.choices[0].model_extra["retrieval"] == {"mode": "none", "chunks": []}
    enc = client.completions.create(model="instructretro", prompt="Entity2 has a", max_tokens=5,
                                    extra_body={"retrieval": "encoder"})
    assert {c["used"] for c in enc.choices[0].model_extra["retrieval"]["chunks"]} == {"encoder"}

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    chat = client.chat.completions.create(model="instructretro", messages=messages, max_tokens=6)
    chunks = list(client.chat.completions.create(model="instructretro", messages=messages, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert len(chat.model_extra["retrieval"]["chunks"]) == 2
    one = client.chat.completions.create(model="instructretro", messages=messages, max_tokens=6,
                                         extra_body={"num_contexts": 1})
    assert len(one.model_extra["retrieval"]["chunks"]) == 1


def test_lm_eval_request_shapes(server, setup):
    """The requests lm-evaluation-harness's local-completions / local-chat-completions send, and
    the fields it parses (its remote tokenizer: /tokenizer_info, /tokenize)."""
    import torch

    from instructretro.tokenizer import Tokenizer
    from instructretro.checkpoint import load_model

    http = httpx.Client(base_url=server.url, timeout=60)
    info = http.get("/tokenizer_info").json()
    eos = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [2]
    ctx = http.post("/tokenize", json={"prompt": "Entity2 has a museum near the", "add_special_tokens": False}).json()["tokens"]
    conts = [http.post("/tokenize", json={"prompt": c, "add_special_tokens": False}).json()["tokens"]
             for c in (" mountain", " river built")]
    inputs = [ctx + c for c in conts]
    tok = Tokenizer(setup["root"] / "spm.model")
    assert http.post("/detokenize", json={"tokens": inputs[0]}).json()["prompt"] == tok.decode(inputs[0])
    for max_tokens in (1, 0):
        body = {"model": "instructretro", "prompt": inputs, "temperature": 0, "max_tokens": max_tokens,
                "logprobs": 1, "seed": 1234, "echo": True, "retrieval": "none"}
        out = http.post("/v1/completions", json=body).json()
        choices = sorted(out["choices"], key=lambda c: c["index"])
        assert len(choices) == 2
        model = load_model(setup["root"] / "ckpt").eval()
        for choice, ids in zip(choices, inputs):
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["tokens"]) == len(ids) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["text_offset"][0] == 0
            assert lp["text_offset"] == sorted(lp["text_offset"])
            part = lp["token_logprobs"][len(ctx): len(ids)]  # lm-eval: [ctxlen:-1] with one generated token
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
            want = [float(ref[t - 1, ids[t]]) for t in range(len(ctx), len(ids))]
            np.testing.assert_allclose(part, want, atol=2e-4)
            for t, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
                assert max(top.values()) >= t - 1e-6  # the greedy check lm-eval makes
            if max_tokens:
                assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # generated greedily
    gen = http.post("/v1/completions", json={"model": "instructretro", "prompt": ["Entity2 has a", "Entity5"],
                                              "max_tokens": 12, "temperature": 0, "stop": ["\n\n", "."], "seed": 1234}).json()
    assert [c["index"] for c in gen["choices"]] == [0, 1] and all("." not in c["text"] for c in gen["choices"])
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTIONS[0]}],
                                                   "model": "instructretro", "max_tokens": 8, "temperature": 0,
                                                   "stop": ["<|im_end|>"], "seed": 1234}).json()
    assert isinstance(chat["choices"][0]["message"]["content"], str)


def test_added_document_is_retrieved_answered_persisted_and_deleted(setup, server, assistant):
    http = httpx.Client(base_url=server.url, timeout=60)
    before = http.post("/v1/retrieve", json={"query": FACT_QUESTION, "k": 3}).json()["data"]
    assert all(c["source"] == "database" for c in before)
    added = http.post("/v1/documents", json={"documents": [{"text": FACT, "id": "quimby"}]}).json()
    assert added["data"][0]["id"] == "quimby" and added["data"][0]["chunks"] >= 1
    top = http.post("/v1/retrieve", json={"query": FACT_QUESTION, "k": 3}).json()["data"][0]
    assert top["doc_id"] == "quimby" and top["source"] == "added" and top["score"] > before[0]["score"]
    answer = http.post("/v1/ask", json={"question": FACT_QUESTION}).json()
    assert answer["chunks"][0]["doc_id"] == "quimby" and "Quimby" in answer["chunks"][0]["text"]
    assert (setup["root"] / "serve" / "overlay.npz").is_file()

    with Server(setup["server_args"]) as again:  # a restart reloads the overlay
        h2 = httpx.Client(base_url=again.url, timeout=60)
        assert h2.post("/v1/retrieve", json={"query": FACT_QUESTION, "k": 1}).json()["data"][0]["doc_id"] == "quimby"
        assert h2.get("/v1/documents").json()["data"] == [{"id": "quimby", "chunks": added["data"][0]["chunks"], "chars": len(FACT)}]
        assert h2.delete("/v1/documents/quimby").json()["deleted"] is True
        after = h2.post("/v1/retrieve", json={"query": FACT_QUESTION, "k": 5}).json()["data"]
        assert all(c["source"] == "database" for c in after)
        assert [c["id"] for c in after[:3]] == [c["id"] for c in before]
        assert "Quimby" not in json.dumps(h2.post("/v1/ask", json={"question": FACT_QUESTION}).json()["chunks"])
    from instructretro.overlay import LiveRetriever

    reread = LiveRetriever(assistant.retriever.base, setup["root"] / "serve" / "overlay.npz")
    assert reread.state.ids == [] and len(reread) == reread.n_base  # the deletion is in the file


BAD = [  # (method, path, raw body or JSON, status, words in the message)
    ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/completions", {"prompt": 7}, 400, "'prompt' must be"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ("POST", "/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "'echo' must be a boolean"),
    ("POST", "/v1/completions", {"prompt": "word " * 300}, 400, "the prompt is"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "'max_tokens' is 5000"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "unknown model 'gpt-4'"),
    ("POST", "/v1/completions", {"prompt": [[1, 99999]]}, 400, "outside the vocabulary"),
    ("POST", "/v1/completions", {"prompt": "x", "retrieval": "sometimes"}, 400, "'retrieval' must be one of"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "'messages' must be a list"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "llama"}, 404, "unknown model"),
    ("POST", "/v1/ask", {"question": ""}, 400, "'question' is empty"),
    ("POST", "/v1/retrieve", {"query": "x", "k": 0}, 400, "'k' must be between"),
    ("POST", "/v1/documents", {"documents": [{"text": ""}]}, 400, "empty 'text'"),
    ("POST", "/v1/documents", {"documents": [{"text": "y" * 100_001}]}, 413, "the limit is 100000"),
    ("POST", "/v1/documents", {"documents": []}, 400, "'documents' is empty"),
    ("POST", "/v1/documents", {"docs": []}, 400, "'documents' is required"),
    ("DELETE", "/v1/documents/no-such-doc", None, 404, "no added document with id 'no-such-doc'"),
    ("GET", "/v1/nothing", None, 404, "no route"),
]


def test_bad_input_gets_a_one_sentence_4xx_and_the_server_goes_on(server):
    http = httpx.Client(base_url=server.url, timeout=60)
    for method, path, body, status, words in BAD:
        kw = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
        r = http.request(method, path, **kw)
        assert r.status_code == status, (path, body, r.text)
        message = r.json()["error"]["message"]
        assert words in message and "\n" not in message and message.endswith("."), message
    assert http.get("/health").json()["status"] == "ok"
    assert http.post("/v1/ask", json={"question": QUESTIONS[0]}).status_code == 200


# ----------------------------------------------------------------------------- in the test process


def test_corrupt_overlay_is_a_one_line_error_naming_the_file(assistant, tmp_path):
    from instructretro.errors import PipelineError
    from instructretro.overlay import LiveRetriever

    bad = tmp_path / "overlay.npz"
    for content in (b"PK\x03\x04 not really a zip", b""):
        bad.write_bytes(content)
        with pytest.raises(PipelineError) as exc:
            LiveRetriever(assistant.retriever.base, bad)
        assert str(exc.value).startswith(f"{bad}: corrupt serve overlay") and "\n" not in str(exc.value)
    np.savez(bad, meta=np.array(json.dumps({"ids": ["a"], "texts": []})), tokens=np.zeros(1), offsets=np.zeros(2),
             chunks=np.zeros((0, 3)), embeddings=np.zeros((0, 384)))
    with pytest.raises(PipelineError, match="corrupt serve overlay"):
        LiveRetriever(assistant.retriever.base, bad)


def test_a_failed_document_add_changes_nothing(assistant, monkeypatch):
    from instructretro import overlay

    r = assistant.retriever
    r.add_documents([{"text": "The first added fact: the moon of Quimby is square.", "id": "a"}])
    before_bytes = r.path.read_bytes()
    before = r.search_scored([FACT_QUESTION], 5)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(overlay, "atomic_path", broken)
    with pytest.raises(OSError):
        r.add_documents([{"text": FACT, "id": "b"}])
    monkeypatch.undo()
    assert r.path.read_bytes() == before_bytes and r.state.ids == ["a"]
    after = r.search_scored([FACT_QUESTION], 5)
    assert np.array_equal(before[0], after[0])
    monkeypatch.setattr(r.encoder, "encode", broken)
    with pytest.raises(OSError):
        r.add_documents([{"text": FACT, "id": "b"}])
    monkeypatch.undo()
    assert r.path.read_bytes() == before_bytes and r.state.ids == ["a"]
    assert r.delete_document("a") and not r.delete_document("a")


def test_batched_greedy_equals_decoding_each_request_alone(assistant):
    """Requests queued together decode in one batch; each gets the tokens it gets alone, with
    and without per-chunk retrieval; one more request than the queue holds is Busy."""
    import time

    from instructretro.batching import Batcher, Busy
    from instructretro.decoding import greedy_generate
    from instructretro.generate import EncoderNeighbors

    a = assistant
    tok, model = a.tokenizer, a.model
    prompts = [tok.encode(q) for q in QUESTIONS] + [tok.encode("Entity1 has a"), tok.encode("x")]
    for encoder in (False, True):
        def fn():
            return EncoderNeighbors(a.retriever, tok, a.num_neighbors, a.chunk_length) if encoder else None

        lengths = [9 if encoder else 9 + i % 2 for i in range(len(prompts))]  # without retrieval lengths may differ
        alone = [greedy_generate(model, [p], n, tok.eod_id, neighbors_fn=fn())[0] for p, n in zip(prompts, lengths)]
        entered, release, sizes = threading.Event(), threading.Event(), []

        def gated(model, batch, n, eod, neighbors_fn=None, pad_id=None):
            entered.set()
            release.wait()
            sizes.append(len(batch))
            return greedy_generate(model, batch, n, eod, neighbors_fn=neighbors_fn, pad_id=pad_id)

        batcher = Batcher(model, max_batch=16, max_queue=len(prompts) - 1, decode=gated)
        got = [None] * len(prompts)

        def run(i):
            got[i] = batcher.generate(model, [prompts[i]], lengths[i], tok.eod_id, neighbors_fn=fn())[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        threads[0].start()
        assert entered.wait(30)  # the first request is decoding (held at the gate)
        for t in threads[1:]:
            t.start()
        while batcher.waiting < len(prompts) - 1:  # the others wait in the queue
            time.sleep(0.01)
        with pytest.raises(Busy):
            batcher.generate(model, [prompts[0]], 3, tok.eod_id)
        release.set()
        for t in threads:
            t.join()
        assert got == alone
        assert sizes == [1, len(prompts) - 1]  # the first alone, then the waiting ones in one batch


def test_page_shows_the_answer_and_its_contexts_in_headless_chromium(server, tmp_path):
    from instructretro import plots

    browser = plots.find_browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (`make browser` installs Debian's chromium; or set $CHROMIUM)")
    url = f"{server.url}/?q={QUESTIONS[0].replace(' ', '%20').replace('?', '%3F')}"
    want = httpx.post(server.url + "/v1/ask", json={"question": QUESTIONS[0]}, timeout=60).json()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
              "--window-size=1100,900", "--virtual-time-budget=20000"]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert '<div id="answer">' + _html(want["answer"] or "(empty answer)") + "</div>" in dom
    assert dom.count('class="chunk') == len(want["chunks"]) == 2
    assert all(f"document {c['doc_id']}" in dom for c in want["chunks"])
    png = tmp_path / "page.png"
    subprocess.run(common + [f"--screenshot={png}", url], capture_output=True, text=True, timeout=120)
    ink = plots.ink(plots.read_png(png))
    assert ink["non_white"] > 0.02, ink  # the answer box and the context boxes are drawn


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_concurrent_requests_answer_as_sequential_ones(server):
    http = httpx.Client(base_url=server.url, timeout=120)
    bodies = [{"question": q, "max_tokens": 6} for q in QUESTIONS] + \
             [{"question": q, "max_tokens": 6, "retrieval": "both"} for q in QUESTIONS[:2]]
    alone = [http.post("/v1/ask", json=b).json() for b in bodies]
    together = [None] * len(bodies)

    def run(i):
        together[i] = httpx.post(server.url + "/v1/ask", json=bodies[i], timeout=120).json()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a["answer"] for a in together] == [a["answer"] for a in alone]
    assert [[c["id"] for c in a["chunks"]] for a in together] == [[c["id"] for c in a["chunks"]] for a in alone]


def test_lm_eval_models_against_the_server(server):
    """lm-evaluation-harness's own local-completions / local-chat-completions classes (skipped
    where lm_eval is not installed; it is not a dependency)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="instructretro", max_length=256,
                             max_gen_toks=8, num_concurrent=1, batch_size=2)
    assert lm.tokenizer_backend == "remote"
    reqs = [Instance("loglikelihood", {}, ("Entity2 has a museum near the", c), i)
            for i, c in enumerate((" mountain", " river built"))]
    scores = lm.loglikelihood(reqs)
    assert len(scores) == 2 and all(s < 0 and isinstance(g, bool) for s, g in scores)
    assert len(lm.generate_until([Instance("generate_until", {}, ("Entity2 has a", {"until": ["."]}), 0)])) == 1
    chat = LocalChatCompletion(base_url=server.url + "/v1/chat/completions", model="instructretro", max_gen_toks=8)
    messages = JsonChatStr(json.dumps([{"role": "user", "content": QUESTIONS[0]}]))
    assert isinstance(chat.generate_until([Instance("generate_until", {}, (messages, {"until": ["\n\n"]}), 0)])[0], str)


def test_a_full_queue_answers_503_with_retry_after(assistant):
    """The server's own app on uvicorn in this process, its decoder held at a gate: one request
    decoding, one waiting (the queue holds one), the next is refused with 503 and Retry-After."""
    import time

    import uvicorn

    from instructretro.decoding import greedy_generate
    from instructretro.serve import Service, create_app
    from serve_fixture import free_port

    encode = assistant.retriever.encode
    svc = Service(assistant, max_batch=1, max_queue=1)
    entered, release = threading.Event(), threading.Event()

    def gated(model, prompts, n, eod, neighbors_fn=None, pad_id=None):
        entered.set()
        release.wait()
        return greedy_generate(model, prompts, n, eod, neighbors_fn=neighbors_fn, pad_id=pad_id)

    svc.batcher.decode = gated
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.config.port}/v1/completions"
        body = {"prompt": "Entity2 has a", "max_tokens": 2, "retrieval": "none"}
        codes = []
        first = threading.Thread(target=lambda: codes.append(httpx.post(url, json=body, timeout=60).status_code))
        first.start()
        assert entered.wait(30)
        second = threading.Thread(target=lambda: codes.append(httpx.post(url, json=body, timeout=60).status_code))
        second.start()
        while svc.batcher.waiting < 1:
            time.sleep(0.01)
        busy = httpx.post(url, json=body, timeout=60)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["message"].startswith("the server is busy")
        release.set()
        first.join()
        second.join()
        assert codes == [200, 200]
    finally:
        release.set()
        server.should_exit = True
        thread.join()
        assistant.retriever.encode = encode
