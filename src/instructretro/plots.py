"""The pipeline's plots as one offline HTML page and a PNG screenshot of it.

``dvc plots show`` writes an HTML page that loads Vega from a CDN. This module renders the same
page with the Vega scripts inlined from local copies (``make vega`` puts them in
``.venv/vega``), so it draws without a network, and takes a screenshot with headless Chromium::

    python -m instructretro.plots --out plots --png docs/plots.png

The page holds every plot of dvc.yaml (the top-level ones first: Retro vs GPT validation loss,
the retrieval controls, recall against nprobe, loss by neighbor overlap; then each stage's
DVCLive curves); the PNG shows
the top-level ones only. A plot whose data file does not exist yet is left out by DVC.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .errors import PipelineError, cli

VEGA_DIR = Path(os.environ.get("VEGA_DIR", Path(".venv") / "vega"))  # make vega
VEGA_SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")  # load order
TOP_LEVEL = ("val_loss_retro_vs_gpt", "retrieval_controls", "recall_vs_nprobe", "loss_by_overlap")  # ids in dvc.yaml
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>InstructRetro plots</title>
{inline_scripts}
<style>body {{ font-family: sans-serif; background: white; display: flex; flex-wrap: wrap; gap: 12px; }}
table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def find_browser() -> str | None:
    """A Chromium-family executable on PATH (``$CHROMIUM`` first), or None."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def vega_scripts(vega_dir: str | os.PathLike = VEGA_DIR) -> list[Path]:
    paths = [Path(vega_dir) / name for name in VEGA_SCRIPTS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PipelineError(f"{missing[0]}: Vega script missing (run `make vega`, which fetches it with npm)")
    return paths


def html_template(vega_dir: str | os.PathLike = VEGA_DIR) -> str:
    """A ``dvc plots show --html-template`` page with the Vega scripts inlined."""
    scripts = "\n".join(f"<script>\n{p.read_text(encoding='utf8')}\n</script>" for p in vega_scripts(vega_dir))
    return PAGE.format(inline_scripts=scripts)


def render_html(repo: str | os.PathLike, out_dir: str | os.PathLike, targets=(),
                vega_dir: str | os.PathLike = VEGA_DIR, dvc: str = "dvc") -> Path:
    """Run ``dvc plots show`` in ``repo`` with the inlined template; return the page's path."""
    out_dir = Path(out_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.html"
        template.write_text(html_template(Path(vega_dir).resolve()), encoding="utf8")
        r = subprocess.run([dvc, "plots", "show", *targets, "--html-template", str(template), "-o", str(out_dir)],
                           cwd=repo, capture_output=True, text=True)
    page = out_dir / "index.html"
    if r.returncode != 0 or not page.is_file():
        raise PipelineError(f"dvc plots show failed in {repo}: {(r.stderr or r.stdout).strip()[-500:]}")
    return page


def screenshot(page: str | os.PathLike, png: str | os.PathLike, width: int = 1000, height: int = 1400,
               browser: str | None = None) -> Path:
    """A PNG of ``page`` from headless Chromium (scripts given 10 s of virtual time to draw)."""
    browser = browser or find_browser()
    if browser is None:
        raise PipelineError("no Chromium found on PATH (run `make browser`, or set $CHROMIUM)")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", "--virtual-time-budget=10000",
               f"--screenshot={png}", Path(page).resolve().as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not png.is_file():
        raise PipelineError(f"{browser} wrote no screenshot: {r.stderr.strip()[-500:]}")
    return png


def read_png(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit RGB or RGBA, non-interlaced PNG as an (H, W, C) uint8 array (no imaging library)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise PipelineError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    channels = {2: 3, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise PipelineError(f"{path}: only 8-bit RGB/RGBA non-interlaced PNGs are read (got depth {depth}, colour {color})")
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    stride = width * channels
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:  # up
            cur = (line + prev) & 0xFF
        elif kind == 1:  # sub: a running sum per channel
            cur = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1) & 0xFF
        else:  # average or Paeth: each byte depends on the one decoded before it
            cur = np.zeros(stride, dtype=np.int32)
            for x in range(stride):
                a = cur[x - channels] if x >= channels else 0
                b = prev[x]
                if kind == 3:
                    cur[x] = (line[x] + (a + b) // 2) & 0xFF
                else:
                    c = prev[x - channels] if x >= channels else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur[x] = (line[x] + pred) & 0xFF
        out[y] = cur
        prev = cur
    return out.reshape(height, width, channels)


def ink(image: np.ndarray) -> dict:
    """How much of a screenshot is drawn: ``non_white`` (any pixel not near white) and
    ``coloured`` (pixels whose channels differ by > 60: plot lines and marks, not black text)."""
    rgb = image[..., :3].astype(np.int16)
    non_white = (rgb.min(axis=-1) < 235).mean()
    coloured = ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 60).mean()
    return {"non_white": float(non_white), "coloured": float(coloured), "std": float(rgb.std())}


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--out", default="plots", help="folder of the HTML page (index.html)")
    ap.add_argument("--png", default="", help="also write a screenshot of the top-level plots here")
    ap.add_argument("--vega", default=str(VEGA_DIR), help="folder holding the Vega scripts")
    args = ap.parse_args(argv)
    dvc = str(Path(sys.executable).parent / "dvc")
    dvc = dvc if Path(dvc).exists() else "dvc"
    page = render_html(args.repo, args.out, vega_dir=args.vega, dvc=dvc)
    print(f"plots: wrote {page}")
    if args.png:
        with tempfile.TemporaryDirectory() as tmp:
            top = render_html(args.repo, tmp, targets=TOP_LEVEL, vega_dir=args.vega, dvc=dvc)
            png = screenshot(top, args.png, width=1300, height=820)
        print(f"plots: wrote {png} ({ink(read_png(png))['coloured']:.1%} of it plot colour)")


if __name__ == "__main__":
    main()
