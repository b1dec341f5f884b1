"""The plots page: dvc.yaml's top-level plots hold the Retro-vs-GPT curves, the retrieval
controls, recall against nprobe and loss by neighbor overlap (stage leakage), and `dvc plots show` renders them in a real browser
(headless Chromium) to a screenshot that is not blank."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from instructretro import plots

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
VEGA = Path(os.environ.get("VEGA_DIR", REPO / ".venv" / "vega"))


def _tsv(path: Path, field: str, values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"step\t{field}\n" + "".join(f"{50 * (i + 1)}\t{v}\n" for i, v in enumerate(values)))


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory):
    """dvc.yaml and params.yaml of the repo with synthetic DVCLive logs and a recall table, in
    the places the pretrain, pretrain-gpt and query-neighbors stages write them."""
    root = tmp_path_factory.mktemp("plots")
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / f, root / f)
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True)
    steps = np.arange(1, 9)
    retro = 0.7 + 1.8 / steps
    val = root / "dvclive" / "pretrain" / "plots" / "metrics" / "val"
    _tsv(val / "loss.tsv", "loss", retro)
    _tsv(val / "loss_shuffled.tsv", "loss_shuffled", retro + 0.02)
    _tsv(val / "loss_no_retrieval.tsv", "loss_no_retrieval", retro + 0.01)
    _tsv(root / "dvclive" / "pretrain-gpt" / "plots" / "metrics" / "val" / "loss.tsv", "loss", retro + 0.03)
    (root / "metrics").mkdir()
    (root / "metrics" / "recall_nprobe.csv").write_text("nprobe,recall_at_k\n1,0.41\n4,0.78\n16,0.95\n64,1.0\n")
    (root / "metrics" / "leakage.csv").write_text(  # what stages/leakage.py writes: one row per non-empty bucket
        "overlap,retro_loss,gpt_loss,retro_loss_shuffled\n12.5,0.63,0.64,0.65\n25,0.83,0.84,0.85\n100,0.1,0.9,0.8\n")
    return root


def test_top_level_plots_read_the_training_curves_and_recall(plots_repo):
    r = subprocess.run([DVC, "plots", "show", "--json", *plots.TOP_LEVEL], cwd=plots_repo,
                       capture_output=True, text=True, check=True)
    data = {k: v[0]["content"]["data"]["values"] for k, v in json.loads(r.stdout)["data"].items()}
    assert {v["filename"] for v in data["val_loss_retro_vs_gpt"]} == {
        "pretrain/plots/metrics/val/loss.tsv", "pretrain-gpt/plots/metrics/val/loss.tsv"}
    assert {v["filename::field"] for v in data["retrieval_controls"]} == {
        "loss.tsv::loss", "loss_shuffled.tsv::loss_shuffled", "loss_no_retrieval.tsv::loss_no_retrieval"}
    assert all(v["step"] for v in data["retrieval_controls"])
    assert [(v["nprobe"], v["recall_at_k"]) for v in data["recall_vs_nprobe"]] == [
        ("1", "0.41"), ("4", "0.78"), ("16", "0.95"), ("64", "1.0")]
    by_field = {}
    for v in data["loss_by_overlap"]:
        by_field.setdefault(v["field"], []).append((v["overlap"], v[v["field"]]))
    assert by_field == {"retro_loss": [("12.5", "0.63"), ("25", "0.83"), ("100", "0.1")],
                        "gpt_loss": [("12.5", "0.64"), ("25", "0.84"), ("100", "0.9")],
                        "retro_loss_shuffled": [("12.5", "0.65"), ("25", "0.85"), ("100", "0.8")]}


def _png(image: np.ndarray, filters) -> bytes:
    """A PNG of ``image`` (H, W, C uint8) whose rows use the given filter types."""
    h, w, c = image.shape
    rows, prev = [], np.zeros(w * c, dtype=np.int32)
    for y in range(h):
        line, kind = image[y].reshape(-1).astype(np.int32), filters[y % len(filters)]
        left = np.concatenate([np.zeros(c, dtype=np.int32), line[:-c]])
        upleft = np.concatenate([np.zeros(c, dtype=np.int32), prev[:-c]])
        if kind == 0:
            enc = line
        elif kind == 1:
            enc = line - left
        elif kind == 2:
            enc = line - prev
        elif kind == 3:
            enc = line - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            enc = line - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        rows.append(bytes([kind]) + (enc & 0xFF).astype(np.uint8).tobytes())
        prev = line

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 8, 6 if c == 4 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [3, 4])
def test_read_png_undoes_every_row_filter(tmp_path, channels):
    image = np.random.default_rng(0).integers(0, 256, (10, 7, channels), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(_png(image, [0, 1, 2, 3, 4]))
    assert np.array_equal(plots.read_png(path), image)


def test_ink_tells_a_drawn_line_from_a_blank_page():
    page = np.full((50, 50, 3), 255, dtype=np.uint8)
    assert plots.ink(page)["coloured"] == 0 and plots.ink(page)["non_white"] == 0
    page[25, :] = (148, 93, 214)  # a line in the first colour of DVC's palette
    page[10, 5:15] = 0  # black text is not plot colour
    ink = plots.ink(page)
    assert ink["coloured"] == pytest.approx(1 / 50) and ink["non_white"] > ink["coloured"]


def _browser_and_vega():
    browser = plots.find_browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (`make browser` installs Debian's chromium; or set $CHROMIUM)")
    if not all((VEGA / name).is_file() for name in plots.VEGA_SCRIPTS):
        pytest.skip(f"no Vega scripts in {VEGA} (`make vega` fetches them with npm)")
    return browser


@pytest.mark.slow
def test_plots_page_renders_in_headless_chromium(plots_repo, tmp_path):
    browser = _browser_and_vega()
    page = plots.render_html(plots_repo, tmp_path / "page", targets=plots.TOP_LEVEL, vega_dir=VEGA, dvc=DVC)
    text = page.read_text()
    assert "cdn.jsdelivr" not in text and all(f'id = "{p}"' in text for p in plots.TOP_LEVEL)
    ink = plots.ink(plots.read_png(plots.screenshot(page, tmp_path / "shot.png", browser=browser)))
    assert ink["coloured"] > 0.001, f"the screenshot shows no plot lines: {ink}"
    assert ink["non_white"] > 0.01, ink

    # the same page without its Vega scripts draws nothing: what the check above tells apart
    bare = tmp_path / "bare.html"
    bare.write_text(text.replace("vegaEmbed(", "void("))
    blank = plots.ink(plots.read_png(plots.screenshot(bare, tmp_path / "bare.png", browser=browser)))
    assert blank["coloured"] < 0.0002, blank
