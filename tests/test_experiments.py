"""The counting and model switches of the research probes (experiments/neighbor_overlap.py,
experiments/copy_probe.py, experiments/realtext.py), whose numbers the docs quote."""

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import copy_probe  # noqa: E402
import neighbor_overlap  # noqa: E402
import realtext  # noqa: E402
from instructretro import presets  # noqa: E402
from instructretro.model import Retro  # noqa: E402


def test_overlap_counts_reads_the_neighbors_of_the_last_finished_chunk():
    L = 4
    # two chunks; positions 3..7 read chunk 0's neighbor, which is [5, 6, 5, 7, 9, 9, 9, 9]
    tokens = np.array([1, 1, 1, 5, 5, 2, 8, 8])
    labels = np.array([1, 1, 5, 6, 7, 3, 8, 8])
    facts = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    neighbors = np.array([[[5, 6, 5, 7, 9, 9, 9, 9]], [[0, 0, 0, 0, 0, 0, 0, 0]]])
    mask = np.ones_like(neighbors, dtype=bool)
    counts = defaultdict(float)
    neighbor_overlap.overlap_counts(tokens, labels, facts, neighbors, mask, L, counts)
    assert counts["all", "n"] == 5 and counts["fact", "n"] == 2 and counts["other", "n"] == 3
    # position 3 (token 5 -> 6): 5 is followed by 6 and 7 -> bigram yes, copy mass 1/2, ambiguous
    # position 4 (token 5 -> 7): same occurrences -> bigram yes, copy mass 1/2
    assert counts["fact", "label in nb"] == 2
    assert counts["fact", "bigram in nb"] == 2
    assert counts["fact", "prev-token copy"] == pytest.approx(1.0)
    assert counts["fact", "unambiguous"] == 0
    # positions 5-7: labels 3, 8, 8 are not in the neighbor
    assert counts["other", "label in nb"] == 0 and counts["other", "prev-token copy"] == 0


def test_overlap_counts_ignore_masked_neighbor_tokens():
    # position 2 reads chunk 0's neighbor, whose 4s are masked: its label 4 must not count
    tokens, labels = np.array([0, 0, 0, 4]), np.array([0, 7, 4, 4])
    neighbors = np.array([[[4, 4, 0, 0]], [[0, 0, 0, 0]]])
    mask = np.array([[[False, False, True, True]], [[True] * 4]])
    counts = defaultdict(float)
    neighbor_overlap.overlap_counts(tokens, labels, None, neighbors, mask, 2, counts)
    assert counts["all", "n"] == 3 and counts["all", "label in nb"] == 0
    counts = defaultdict(float)
    neighbor_overlap.overlap_counts(tokens, labels, None, neighbors, np.ones_like(mask), 2, counts)
    assert counts["all", "label in nb"] == 1


def test_previous_token_keys_shift_keys_within_each_neighbor_only():
    config = presets.get("tiny", vocab_size=64, num_neighbors=2, chunk_length=4, seq_length=8)
    torch.manual_seed(0)
    model = Retro(config)
    cca = next(layer.cca for layer in model.layers if layer.cca is not None)
    R = config.neighbor_length
    context = torch.randn(3, 2 * R, config.hidden)  # two neighbors of R tokens, side by side
    k0, v0 = cca.project_kv(context)
    copy_probe.previous_token_keys(cca, R)
    k1, v1 = cca.project_kv(context)
    assert torch.equal(v1, v0)
    for n in range(2):
        assert torch.all(k1[..., n * R, :] == 0)  # the first token of each neighbor has no previous
        assert torch.allclose(k1[..., n * R + 1:(n + 1) * R, :], k0[..., n * R:(n + 1) * R - 1, :])


def test_apply_biases_copies_the_output_layer_and_matches_cca_queries_and_keys():
    config = presets.get("tiny", vocab_size=64)
    torch.manual_seed(0)
    model = Retro(config)
    q_before = [layer.cca.q.weight.clone() for layer in model.layers if layer.cca is not None]
    copy_probe.apply_biases(model, output_from_embedding=True, prev_keys=False, match_init=4.0)
    assert torch.equal(model.lm_head.weight, model.embed.weight)
    assert model.lm_head.weight is not model.embed.weight  # a copy: still two parameters
    h = config.hidden
    for before, layer in zip(q_before, (la for la in model.layers if la.cca is not None)):
        assert torch.allclose(layer.cca.q.weight, 4.0 * before)
        assert torch.equal(layer.cca.kv.weight[:h], layer.cca.q.weight)


@pytest.mark.parametrize("chunk", [16, 64])
def test_probe_neighbors_are_the_chunk_and_its_continuation_moved_by_at_most_shift(chunk):
    seq, shift = 4 * chunk, chunk // 2
    gen = torch.Generator().manual_seed(0)
    x, y, nb, mask = copy_probe.retro_batch(gen, 2, seq, chunk, 512, shift)
    assert nb.shape == (2, seq // chunk, 1, 2 * chunk) and bool(mask.all())
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = torch.cat([x, y[:, -1:]], 1)
    checked = 0
    for b in range(2):
        for c in range(seq // chunk):
            # the neighbor is a window of the stream the text was cut from, starting within
            # -shift..shift of chunk c; where it overlaps the text, it equals the text
            lo = c * chunk
            found = [o for o in range(-shift, shift + 1)
                     if 0 <= lo + o and lo + o + 2 * chunk <= seq + 1
                     and torch.equal(nb[b, c, 0], text[b, lo + o:lo + o + 2 * chunk])]
            inside = 0 <= lo - shift and lo + shift + 2 * chunk <= seq + 1
            assert found or not inside
            checked += inside
    assert checked >= 2
    gen = torch.Generator().manual_seed(0)
    x, y, nb, mask = copy_probe.retro_batch(gen, 2, seq, chunk, 512, 0)
    assert torch.equal(nb[:, 0, 0, :chunk], x[:, :chunk]) and torch.equal(nb[:, 0, 0, chunk:2 * chunk], x[:, chunk:2 * chunk])


def test_realtext_takes_one_document_per_section_of_prose(tmp_path):
    """Sphinx HTML -> one text per h1-h3 section of the main body: code blocks, the navigation
    outside the body, heading links and short sections are left out."""
    page = """<html><body><div class="related">Navigation index modules</div>
    <div class="body" role="main"><section><h1>Intro<a class="headerlink" href="#i">\u00b6</a></h1>
    <p>First paragraph of prose that is long enough.</p><pre>import this</pre><p>Second one.</p>
    <section><h2>Details</h2><p>Only a few words.</p></section></section></div>
    <div class="footer">Copyright</div></body></html>"""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "page.html").write_text(page)
    (tmp_path / "genindex.html").write_text(page)  # indexes are skipped
    docs = realtext.html_documents(tmp_path, min_chars=30)
    assert docs == ["Intro\nFirst paragraph of prose that is long enough.\nSecond one."]
