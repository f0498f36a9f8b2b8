"""Saved runs of checkpoint format version 1 still load: every method's checkpoint, written by the code of that
format (``tests/compat/make_v1.py``), rebuilds to a model that gives the recorded logits, alone and as a named task
on a shared backbone. Parameter names, the ``mode`` / ``mode_options`` keys and option keys are the file format."""

from pathlib import Path

import pytest
import torch

import peft
from conftest import images
from peft.finetune.checkpoint import save_atomic
from peft.finetune.rebuild import load_model_from_checkpoint, load_tasks

HERE = Path(__file__).resolve().parent / "compat"
RUNS = torch.load(HERE / "runs_v1.pt", weights_only=True)


def test_every_method_of_format_1_has_a_saved_run():
    """The thirteen methods of format 1 (a method added later needs no entry; its runs are of a later code)."""
    assert {r["checkpoint"]["mode"] for r in RUNS.values()} == {
        "head", "mlp", "full", "bitfit", "vpt", "vpt-shallow", "adaptformer", "adapter", "lora", "dora", "fact-tt",
        "ssf", "rlrr"} <= set(peft.METHODS)


@pytest.mark.parametrize("key", sorted(RUNS))
def test_v1_checkpoint_rebuilds_the_same_model(tmp_path, key):
    run = RUNS[key]
    path = save_atomic(run["checkpoint"], tmp_path / key / "best.pt")
    model, meta = load_model_from_checkpoint(path.parent, weights=HERE / "base_v1.npz")
    assert meta["mode"] == run["checkpoint"]["mode"]
    with torch.no_grad():
        torch.testing.assert_close(model(images()), run["logits"], rtol=1e-5, atol=1e-6)


def test_v1_checkpoints_share_one_backbone(tmp_path):
    """Named tasks on one backbone; FacT adds a module (``model.fact``) that exists only while its task is active."""
    paths = [save_atomic(RUNS[k]["checkpoint"], tmp_path / k / "best.pt") for k in ("rlrr", "lora-noah", "vpt", "fact-tt")]
    model, metas = load_tasks(paths, weights=HERE / "base_v1.npz")
    for key in ("rlrr", "lora-noah", "vpt", "fact-tt"):
        peft.set_adapter(model, key)
        with torch.no_grad():
            torch.testing.assert_close(model(images()), RUNS[key]["logits"], rtol=1e-5, atol=1e-6)
        assert hasattr(model, "fact") == (key == "fact-tt")
