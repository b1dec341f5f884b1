"""Shell lines that run DVC stages under the ``deepspeed`` launcher (the Makefile's GPU targets).

``dvc repro`` runs each stage's ``cmd`` as one process. On GPUs the stage scripts of embed,
query-neighbors, pretrain, sft and generate run under ``deepspeed --num_gpus N [--hostfile]``
instead; afterwards ``dvc commit -f`` records the outputs in ``dvc.lock`` as if DVC had run
them. The commands come from ``dvc.yaml`` itself (resolved by DVC, ``foreach`` included), so
paths keep one home. A stage that ``dvc status`` reports up to date is skipped.

    python -m instructretro.launch 'generate@*' 'deepspeed --num_gpus 8' .venv/bin/dvc
"""

from __future__ import annotations

import fnmatch
import shlex
import sys

from .errors import PipelineError, cli


def stage_commands(pattern: str, repo: str = ".") -> list[tuple[str, str]]:
    """``(stage, cmd)`` of every stage in ``dvc.yaml`` whose name matches ``pattern`` (a glob)."""
    from dvc.repo import Repo

    found = [(s.addressing, s.cmd) for s in Repo(repo).index.stages if fnmatch.fnmatch(s.addressing, pattern)]
    if not found:
        raise PipelineError(f"dvc.yaml: no stage matches {pattern!r}")
    return found


def shell_lines(stages: list[tuple[str, str]], launcher: str, dvc: str) -> list[str]:
    """One shell line per stage: skip it when up to date, else run its script under
    ``launcher`` (the leading ``python`` of its cmd replaced) and ``dvc commit -f`` it."""
    lines = []
    for stage, cmd in stages:
        words = shlex.split(cmd)
        if words[0] != "python":
            raise PipelineError(f"dvc.yaml: stage {stage} does not run a python script ({cmd!r})")
        q = shlex.quote(stage)
        run = " ".join([launcher, *map(shlex.quote, words[1:])])
        lines.append(f"if {dvc} status {q} | grep -q 'up to date'; then echo {q}: up to date; "
                     f"else {run} && {dvc} commit -f {q}; fi")
    return lines


@cli
def main(argv=None):
    pattern, launcher, dvc = (argv or sys.argv[1:])[:3]
    print(" && ".join(f"({line})" for line in shell_lines(stage_commands(pattern), launcher, dvc)))


if __name__ == "__main__":
    main()
