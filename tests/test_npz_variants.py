"""Every file Google's code writes, at every resolution, and crafted files: fidelity and failing well.

- Position-embedding resize "google" equals ``scipy.ndimage.zoom(order=1)`` (the independent reference, a test-only
  dependency) at several grid pairs, growing, shrinking and non-square; logits at a new resolution equal a float64
  numpy forward of Google's pipeline (zoomed grid) to 1e-5.
- The pre-linen numbering, the linen names and the ``opt/target/`` prefix load to the same model; unknown namings
  and big_vision files get an error that says what is known; optimizer state is never decompressed.
- An all-zero head warns once. Crafted headers, random header corruptions and random truncations always give a
  ``CheckpointError`` naming the file, quickly and in bounded memory (a subprocess under an address-space limit).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vit
from loaders import CheckpointError, load_npz, read_npz, save_npz
from loaders.npz import NAMINGS, ZERO_HEAD_MESSAGE
from npz_factory import google_params, write_google_npz
from google_reference import ODD, google_forward
from google_reference import images as _images
from google_reference import rel_err as _rel_err

scipy_ndimage = pytest.importorskip("scipy.ndimage", reason="scipy (test extra) is the independent resize reference")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = vit.get_config("testing")  # 32 px, patch 8: a 4x4 grid


def zoom_reference(pos: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Google's load_pretrained: keep CLS, scipy.ndimage.zoom(grid, (gh/g, gw/g, 1), order=1)."""
    g = int(round((pos.shape[1] - 1) ** 0.5))
    grid = pos[0, 1:].reshape(g, g, -1).astype(np.float64)
    zoomed = scipy_ndimage.zoom(grid, (gh / g, gw / g, 1), order=1)
    assert zoomed.shape[:2] == (gh, gw)
    return np.concatenate([pos[:, :1], zoomed.reshape(1, gh * gw, -1)], axis=1)


@pytest.mark.parametrize("old, new", [(4, (6, 6)), (14, (24, 24)), (14, (7, 7)), (6, (10, 4)), (5, (3, 8)),
                                      (7, (7, 12))])
def test_google_resize_equals_scipy_zoom(old, new):
    pos = np.random.default_rng(old).standard_normal((1, 1 + old * old, 5)).astype(np.float32)
    got = vit.resample_pos_embed(torch.from_numpy(pos), new, method="google").double().numpy()
    np.testing.assert_allclose(got, zoom_reference(pos, *new), rtol=0, atol=1e-6)
    timm = vit.resample_pos_embed(torch.from_numpy(pos), new, method="bilinear").double().numpy()
    assert np.abs(timm - zoom_reference(pos, *new)).max() > 1e-3  # the two resamplings really differ


def test_resize_methods_keep_cls_and_reject_unknown():
    pos = torch.randn(1, 17, 3)
    for method in vit.model.RESIZE_METHODS:
        out = vit.resample_pos_embed(pos, 6, method=method)
        assert out.shape == (1, 37, 3) and torch.equal(out[:, :1], pos[:, :1])
    with pytest.raises(ValueError, match="google, bilinear, bicubic"):
        vit.resample_pos_embed(pos, 6, method="nearest")


@pytest.mark.parametrize("image_size", [40, 16])
def test_logits_at_another_resolution_equal_googles_pipeline(tmp_path, image_size):
    params = write_google_npz(tmp_path / "ckpt.npz", ODD, seed=5)
    model = load_npz(tmp_path / "ckpt.npz", image_size=image_size)  # 24 px (6x6) -> 40 px (10x10) or 16 px (4x4)
    g = image_size // ODD.patch_size
    reference = dict(params)
    reference["Transformer/posembed_input/pos_embedding"] = zoom_reference(
        params["Transformer/posembed_input/pos_embedding"], g, g)
    images = _images(model.config)
    with torch.no_grad():
        logits = model(images).numpy()
    assert _rel_err(logits, google_forward(reference, images.numpy())) <= 1e-5


def _rename(params: dict, naming: str) -> dict:
    old, new = NAMINGS["pre-linen"], NAMINGS[naming]
    out = {}
    for k, v in params.items():
        for part in ("norm1", "attn", "norm2", "mlp"):
            k = k.replace(f"/{old[part]}/", f"/{new[part]}/")
        out[k] = v
    return out


def _write(path, params, prefix=""):
    with open(path, "wb") as f:
        np.savez(f, **{prefix + k: v for k, v in params.items()})


def test_linen_names_and_prefix_load_the_same_model(tmp_path):
    params = google_params(CONFIG, seed=2)
    _write(tmp_path / "pre.npz", params)
    linen = _rename(params, "linen")
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel" in linen
    assert "Transformer/encoderblock_1/LayerNorm_1/scale" in linen and "Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias" in linen
    _write(tmp_path / "linen.npz", linen)
    _write(tmp_path / "prefixed.npz", {**linen, **{f"opt/state/{k}": v for k, v in linen.items()}}, "")
    with zipfile.ZipFile(tmp_path / "prefixed.npz", "a") as z:  # optimizer moments beside opt/target/
        for k, v in linen.items():
            buf = io.BytesIO()
            np.save(buf, v)
            z.writestr(f"opt/target/{k}.npy", buf.getvalue())
    reference = load_npz(tmp_path / "pre.npz").state_dict()
    for name in ("linen.npz",):
        state = load_npz(tmp_path / name).state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    save_npz(load_npz(tmp_path / "linen.npz"), tmp_path / "out_linen.npz", naming="linen")
    assert set(read_npz(tmp_path / "out_linen.npz")) == set(linen)


# The four sub-modules of encoder block i under each naming, written out here from REFERENCE §8 (Google's
# vit_jax/checkpoint.py reads both) and NOT taken from loaders.npz_table.NAMINGS: a table whose load and save are
# wrong the same way (norm1 <-> norm2 swapped) round-trips perfectly, so only an independent list can see it.
BLOCK_PARTS = {
    "pre-linen": {"norm1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_1", "norm2": "LayerNorm_2",
                  "mlp": "MlpBlock_3"},
    "linen": {"norm1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0", "norm2": "LayerNorm_1",
              "mlp": "MlpBlock_0"},
}


def _google_keys(naming: str) -> dict:
    """npz_factory's keys (pre-linen, its own hand-written list) renamed by BLOCK_PARTS."""
    pre, new = BLOCK_PARTS["pre-linen"], BLOCK_PARTS[naming]
    out = {}
    for k, v in google_params(CONFIG, seed=4).items():
        parts = k.split("/")
        if len(parts) > 2 and parts[1].startswith("encoderblock_"):
            parts[2] = new[next(p for p, name in pre.items() if name == parts[2])]
        out["/".join(parts)] = v
    return out


@pytest.mark.parametrize("naming", ["pre-linen", "linen"])
def test_every_block_key_reaches_its_own_module_on_load_and_on_save(tmp_path, naming):
    params = _google_keys(naming)
    _write(tmp_path / "in.npz", params)
    model = load_npz(tmp_path / "in.npz")
    parts = BLOCK_PARTS[naming]
    for i, block in enumerate(model.blocks):
        key = f"Transformer/encoderblock_{i}/{{}}".format
        for module in ("norm1", "norm2"):  # LayerNorm scale/bias: no layout change
            norm = getattr(block, module)
            assert np.array_equal(norm.weight.detach().numpy(), params[key(f"{parts[module]}/scale")]), (i, module)
            assert np.array_equal(norm.bias.detach().numpy(), params[key(f"{parts[module]}/bias")]), (i, module)
        q = params[key(f"{parts['attn']}/query/kernel")]  # (D, H, Dh) -> (H*Dh, D)
        assert np.array_equal(block.attn.q.weight.detach().numpy(), q.reshape(q.shape[0], -1).T), i
        fc1 = params[key(f"{parts['mlp']}/Dense_0/kernel")]  # (D, M) -> (M, D)
        assert np.array_equal(block.mlp.fc1.weight.detach().numpy(), fc1.T), i
    save_npz(model, tmp_path / "out.npz", naming=naming)
    written = read_npz(tmp_path / "out.npz")
    assert sorted(written) == sorted(params)
    for k, v in params.items():
        assert np.array_equal(written[k], v), k


def test_opt_target_reads_only_the_model_arrays(tmp_path, monkeypatch):
    params = google_params(CONFIG, seed=2)
    moments = {f"opt/state/param_states/{k}/grad_ema": v for k, v in params.items()}
    _write(tmp_path / "opt.npz", {**{f"opt/target/{k}": v for k, v in params.items()}, **moments})
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, m, *a, **k: (opened.append(getattr(m, "filename", m)),
                                                                          real_open(self, m, *a, **k))[1])
    model = load_npz(tmp_path / "opt.npz")
    assert opened and all(name.startswith("opt/target/") for name in opened)  # moments never decompressed
    assert torch.equal(model.head.bias, torch.from_numpy(params["head/bias"]))


def test_unknown_naming_and_big_vision_are_named(tmp_path):
    params = google_params(CONFIG, seed=2)
    odd = {k.replace("MultiHeadDotProductAttention_1", "SelfAttention_7"): v for k, v in params.items()}
    _write(tmp_path / "odd.npz", odd)
    with pytest.raises(CheckpointError, match=r"match no known naming \(pre-linen: .*linen: .*MlpBlock_0"):
        load_npz(tmp_path / "odd.npz")
    bv = {k: v for k, v in _rename(params, "linen").items() if "encoderblock_" not in k}
    bv["pos_embedding"] = bv.pop("Transformer/posembed_input/pos_embedding")[:, 1:]
    bv.update({f"Transformer/encoderblock/{k.split('/', 2)[2]}": np.stack([v, v])
               for k, v in _rename(params, "linen").items() if "encoderblock_0/" in k})
    _write(tmp_path / "bv.npz", bv)
    with pytest.raises(CheckpointError, match="big_vision checkpoint .*without a CLS slot"):
        load_npz(tmp_path / "bv.npz")
    _write(tmp_path / "params.npz", {f"params/{k}": v for k, v in _rename(params, "linen").items()})
    with pytest.raises(CheckpointError, match=r"big_vision checkpoint \(params/ prefix"):  # as timm recognises it
        load_npz(tmp_path / "params.npz")
    unscanned = _rename(params, "linen")  # blocks named like Google's linen code, positions big_vision's way
    unscanned["pos_embedding"] = unscanned.pop("Transformer/posembed_input/pos_embedding")[:, 1:]
    _write(tmp_path / "unscanned.npz", unscanned)
    with pytest.raises(CheckpointError, match="big_vision checkpoint"):
        load_npz(tmp_path / "unscanned.npz")


def test_all_zero_head_warns_once(tmp_path, caplog):
    params = google_params(CONFIG, seed=2)
    params["head/kernel"][:] = 0
    params["head/bias"][:] = 0
    _write(tmp_path / "i21k.npz", params)
    with caplog.at_level(logging.WARNING, logger="loaders.npz"):
        model = load_npz(tmp_path / "i21k.npz")
        load_npz(tmp_path / "i21k.npz", num_classes=3)  # a new head: nothing to warn about
    assert caplog.text.count(ZERO_HEAD_MESSAGE) == 1 and not model.head.weight.any()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loaders.npz"):
        load_npz(write_google_npz(tmp_path / "ok.npz", CONFIG) and tmp_path / "ok.npz")
    assert ZERO_HEAD_MESSAGE not in caplog.text


def _npy_bytes(array: np.ndarray, shape=None) -> bytes:
    """An .npy member whose header may claim another shape than the data it holds."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": tuple(array.shape if shape is None else shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(array.tobytes())
    return buf.getvalue()


def _crafted(path, params, key, claimed_shape, compress=True):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for k, v in params.items():
            z.writestr(f"{k}.npy", _npy_bytes(v, claimed_shape if k == key else None))


def test_a_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    params = google_params(CONFIG, seed=2)
    path = tmp_path / "huge.npz"
    _crafted(path, params, "head/kernel", (16, 2**40))  # 64 TiB claimed, a few bytes stored
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1536 << 20,) * 2); "
            "import loaders\ntry:\n    loaders.load_npz(sys.argv[1])\nexcept loaders.CheckpointError as e:\n"
            "    print('CheckpointError', e)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.startswith("CheckpointError") and "'head/kernel'" in out.stdout and str(path) in out.stdout
    assert "compressed bytes" in out.stdout
    _crafted(path, params, "Transformer/encoderblock_0/LayerNorm_0/scale", (16,) * 3, compress=False)
    with pytest.raises(CheckpointError, match=r"LayerNorm_0/scale.*compressed bytes|LayerNorm_0/scale"):
        load_npz(path)


def test_block_numbers_are_bounded_by_the_blocks_present(tmp_path):
    params = google_params(CONFIG, seed=2)
    moved = {k.replace("encoderblock_1/", "encoderblock_999999999999/"): v for k, v in params.items()}
    _write(tmp_path / "far.npz", moved)
    with pytest.raises(CheckpointError, match=r"encoder blocks \[1\] are missing .*999999999999"):
        load_npz(tmp_path / "far.npz")


@pytest.mark.parametrize("seed", range(12))
def test_random_header_corruptions_always_give_a_checkpoint_error(tmp_path, seed):
    rng = np.random.default_rng(seed)
    good = tmp_path / "good.npz"
    write_google_npz(good, CONFIG, seed=1)
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        member = z.infolist()[int(rng.integers(len(z.infolist())))]
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)  # the .npy bytes (stored)
    for pos in rng.integers(start, start + 100, size=int(rng.integers(1, 6))):
        raw[pos] = int(rng.integers(256))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    try:
        load_npz(bad)
    except CheckpointError as e:
        assert str(bad) in str(e) and len(str(e)) < 1500
    # else: the corruption hit bytes that do not matter (e.g. header padding) and the file still loads


@pytest.mark.parametrize("seed", range(8))
def test_random_truncations_give_a_checkpoint_error(tmp_path, seed):
    good = tmp_path / "good.npz"
    write_google_npz(good, CONFIG, seed=1)
    raw = good.read_bytes()
    cut = int(np.random.default_rng(seed).integers(1, len(raw) - 1))
    bad = tmp_path / "cut.npz"
    bad.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError) as e:
        load_npz(bad)
    assert str(bad) in str(e.value) and len(str(e.value)) < 1500


def test_peak_memory_of_load_stays_near_the_model_size(tmp_path):
    config = vit.get_config("ViT-S/16")
    path = tmp_path / "s16.npz"
    write_google_npz(path, config, seed=0)
    code = ("import sys, torch, loaders\n"
            "def status(f):\n    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f))\n"
            "open('/proc/self/clear_refs', 'w').write('5')\nbefore = status('VmRSS')\n"
            "m = loaders.load_npz(sys.argv[1])\n"
            "print(status('VmHWM') - before, sum(p.numel() * 4 for p in m.state_dict().values()) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-1500:]
    growth_kib, model_kib = map(int, out.stdout.split())
    assert growth_kib <= 1.2 * model_kib + 32 * 1024, (growth_kib, model_kib)  # one model, plus one array in flight


def test_tools_say_the_head_is_zero_instead_of_predicting_class_0(tmp_path):
    from peft.finetune.checkpoint import CheckpointMismatch
    from peft.finetune.predict import predict_files
    from PIL import Image

    params = google_params(CONFIG, seed=2)
    params["head/kernel"][:] = 0
    params["head/bias"][:] = 0
    _write(tmp_path / "i21k.npz", params)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(CheckpointMismatch, match="head is all zero.*fine-tune first"):
        predict_files(load_npz(tmp_path / "i21k.npz"), [tmp_path / "x.png"], [])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "attention_map.py"), "--checkpoint",
                          str(tmp_path / "i21k.npz"), str(tmp_path / "x.png"), "--output", str(tmp_path / "a.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and ZERO_HEAD_MESSAGE in out.stderr + out.stdout
