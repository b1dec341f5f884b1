"""Presets build on the meta device with the documented sizes; overrides and errors."""

import pytest
import torch

from instructretro import presets
from instructretro.errors import PipelineError
from instructretro.model import Retro

# (Retro, GPT) parameter counts at each preset's vocab, as documented in presets.py / docs/model.md
DOCUMENTED = {
    "tiny": (2_380_032, 1_804_544),
    "100m": (114_871_296, 91_264_512),
    "843m": (877_520_896, 823_232_512),
    "2b": (2_906_714_112, 2_655_260_672),
    "4b": (5_620_311_040, 5_070_361_600),
    "43b": (48_461_856_768, 42_825_433_088),
}


@pytest.mark.parametrize("name", presets.NAMES)
def test_preset_builds_on_meta_with_documented_size(name):
    with torch.device("meta"):
        retro = Retro(presets.get(name))
        gpt = Retro(presets.get(name, retro=False))
    counts = (retro.num_parameters(), gpt.num_parameters())
    c = retro.config
    print(f"{name}: layers {c.n_layers} hidden {c.hidden} heads {c.heads} ffn {c.ffn_hidden} "
          f"vocab {c.vocab_size} cca {c.cca_layers} -> Retro {counts[0]:,} GPT {counts[1]:,}")
    assert counts == DOCUMENTED[name]
    assert all(p.is_meta for p in retro.parameters())


def test_reference_architectures():
    for name, shape in {"843m": (24, 1024, 16), "2b": (32, 2048, 32), "4b": (48, 2560, 32),
                        "43b": (48, 8192, 64)}.items():
        c = presets.get(name)
        assert (c.n_layers, c.hidden, c.heads) == shape
        assert c.seq_length == 4096 and c.rotary_percent == 0.5 and c.encoder_layers == 2
        assert c.ffn_hidden == int(8 * c.hidden / 3 / 64) * 64
        assert c.cca_layers[0] == (9 if c.n_layers > 15 else 6)
    tiny = presets.get("tiny")
    assert tiny.retro and tiny.cca_layers and tiny.name == "tiny"


def test_overrides_and_errors():
    c = presets.get("tiny", vocab_size=8000, retro=False, num_neighbors=None, cca_layers=[1, 3])
    assert (c.vocab_size, c.retro, c.num_neighbors, c.cca_layers) == (8000, False, 1, (1, 3))
    with pytest.raises(PipelineError, match="model.name"):
        presets.get("huge")
    with pytest.raises(PipelineError, match="model.dropout"):
        presets.get("tiny", dropout=0.1)
    with pytest.raises(PipelineError, match="model.hidden"):
        presets.get("tiny", hidden=130)


def test_training_defaults_are_fresh_dicts_with_the_reference_values():
    t = presets.training("843m")
    assert (t["global_batch"], t["lr"], t["min_lr"], t["weight_decay"], tuple(t["betas"])) == \
        (128, 2.5e-5, 2.5e-6, 0.1, (0.9, 0.95))
    t["lr"] = 1.0
    assert presets.training("843m")["lr"] == 2.5e-5
    s = presets.sft("843m")
    assert (s["global_batch"], s["lr"], s["lr_schedule"], s["iterations"], tuple(s["betas"]),
            s["weight_decay"], s["grad_clip"]) == (128, 5e-6, "constant", 1000, (0.9, 0.98), 0.01, 1.0)
    for name in presets.NAMES:
        assert presets.training(name)["lr"] > 0 and presets.sft(name)["lr"] > 0
