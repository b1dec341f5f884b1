"""Stage sft-blend@<name>: check one dataset of the SFT blend and record its content.

dvc.yaml runs one such stage per entry of ``sft.blend`` (``foreach``), each depending on its
own file and its own entry ``sft.blend.<name>``. It parses every record of the file in the
entry's format (a malformed record is one line naming the file and line, before any upstream
stage's long work) and writes ``data/sft-blend/<name>.json``: the entry, the record count and a
hash of the file's bytes. The sft stage depends on the folder ``data/sft-blend``, so adding,
removing or editing a blend entry reruns sft, a file outside the blend does not, and dvc.yaml
never names a blend file.
"""

from __future__ import annotations

import argparse

from instructretro import blend as B, data, params as P
from instructretro.errors import PipelineError, cli
from instructretro.io import write_json


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", help="the entry of sft.blend")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", required=True, help="data/sft-blend/<name>.json")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    value = p.get(f"sft.blend.{args.name}", default=None)  # this entry only (its DVC param)
    if value is None:
        raise PipelineError(f"{p.source}: no entry 'sft.blend.{args.name}'")
    (entry,) = B.parse_blend({args.name: value}, p.source)
    records = sum(1 for _ in data.iter_conversations(entry.path, entry.format))
    write_json(args.out, B.blend_stamp(entry, records))
    print(f"sft-blend@{args.name}: {entry.path} ({entry.format}), {records} records")


if __name__ == "__main__":
    main()
