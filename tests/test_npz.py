"""Loading and saving Google-layout .npz checkpoints: exact round trips, fine-tuning options, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import vit
from loaders import CheckpointError, infer_config, load_npz, read_npz, save_npz
from loaders.npz import CONVERTERS, checkpoint_table
from npz_factory import write_google_npz

CONFIG = vit.get_config("testing")  # 32 px, patch 8 (4x4 grid), D 16, 2 heads, 2 blocks, 10 classes
REPO = Path(__file__).resolve().parents[1]


def _images(config, n=2):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, config.image_size, config.image_size, generator=g) * 2 - 1


def _write(path, params):
    with open(path, "wb") as f:
        np.savez(f, **params)
    return path


# ── round trips ─────────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("pre_logits,prefix", [(12, ""), (None, ""), (12, "opt/target/")],
                         ids=["i21k", "augreg", "opt-target"])
def test_save_load_round_trip_is_bit_exact(tmp_path, pre_logits, prefix):
    src = tmp_path / "src.npz"
    params = write_google_npz(src, CONFIG, seed=1, prefix=prefix, pre_logits=pre_logits)
    model = load_npz(src)
    out = save_npz(model, tmp_path / "out.npz")
    saved = read_npz(out)
    assert list(saved) == list(params)  # same keys, same order, no prefix
    for key, value in params.items():
        assert saved[key].dtype == np.float32 and saved[key].shape == value.shape, key
        assert np.array_equal(saved[key], value), key
    again = load_npz(out)
    images = _images(CONFIG)
    with torch.no_grad():
        assert torch.equal(again(images), model(images))
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_converters_are_inverse_pairs():
    rng = np.random.default_rng(0)
    shapes = {"dense": (5, 7), "attn_in": (6, 3, 2), "attn_in_bias": (3, 2), "attn_out": (3, 2, 6),
              "conv": (4, 4, 3, 6), "as_is": (1, 5, 6)}
    assert set(shapes) == set(CONVERTERS)
    for name, shape in shapes.items():
        conv = CONVERTERS[name]
        a = rng.standard_normal(shape).astype(np.float32)
        t = conv.to_torch(a, 3)
        assert np.array_equal(conv.to_npz(t, 3), a), name
        assert conv.npz_shape(t.shape, 3) == shape, name
    # and the layouts are the ones PyTorch expects, element by element
    a = rng.standard_normal((6, 3, 2))
    assert CONVERTERS["attn_in"].to_torch(a, 3)[1 * 2 + 1, 4] == a[4, 1, 1]  # row h*Dh + k, column d
    a = rng.standard_normal((3, 2, 6))
    assert CONVERTERS["attn_out"].to_torch(a, 3)[4, 2 * 2 + 0] == a[2, 0, 4]
    a = rng.standard_normal((4, 5, 3, 6))
    assert CONVERTERS["conv"].to_torch(a, 3)[5, 2, 1, 3] == a[1, 3, 2, 5]  # OIHW from HWIO


def test_table_covers_every_parameter_once():
    for config in (CONFIG, CONFIG.replace(representation_size=8)):
        table = checkpoint_table(config)
        names = [name for name, _, _ in table]
        keys = [key for _, key, _ in table]
        assert len(set(names)) == len(names) and len(set(keys)) == len(keys)
        assert set(names) == set(vit.VisionTransformer(config).state_dict())


def test_save_is_atomic(tmp_path, monkeypatch):
    src = tmp_path / "src.npz"
    write_google_npz(src, CONFIG)
    model = load_npz(src)
    dest = tmp_path / "dest.npz"
    dest.write_bytes(b"previous contents")

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_npz(model, dest)
    assert dest.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest.npz", "src.npz"]  # no temp file left
    monkeypatch.undo()
    save_npz(model, dest)
    assert set(read_npz(dest)) == set(read_npz(src))


def test_save_refuses_a_model_with_extra_parameters(tmp_path):
    model = vit.VisionTransformer(CONFIG)
    model.blocks[0].attn.q.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 16)))
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.0\.attn\.q\.lora_A.*merge_adapters"):
        save_npz(model, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


# ── Google's fine-tuning options ────────────────────────────────────────────────────────────────────────

def test_num_classes_drops_pre_logits_and_zeroes_a_new_head(tmp_path):
    src = tmp_path / "i21k.npz"
    write_google_npz(src, CONFIG, pre_logits=12)
    base = load_npz(src)
    model = load_npz(src, num_classes=5)
    assert model.pre_logits is None and model.config.representation_size is None
    assert model.config.num_classes == 5
    assert model.head.weight.shape == (5, CONFIG.hidden_size)
    assert not model.head.weight.any() and not model.head.bias.any()
    images = _images(CONFIG)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), base.forward_features(images))  # backbone intact
        assert not model(images).any()


def test_image_size_resizes_the_position_grid(tmp_path, caplog):
    src = tmp_path / "ckpt.npz"
    params = write_google_npz(src, CONFIG, pre_logits=12)
    pos = torch.from_numpy(params["Transformer/posembed_input/pos_embedding"])
    with caplog.at_level(logging.INFO, logger="loaders.npz"):
        model = load_npz(src, image_size=48)
    assert model.config.image_size == 48 and model.pos_embed.shape == (1, 1 + 36, CONFIG.hidden_size)
    assert torch.equal(model.pos_embed[:, :1], pos[:, :1])  # CLS position kept
    assert torch.equal(model.pos_embed.detach(), vit.resample_pos_embed(pos, 6, method="google"))  # the default
    timm_like = load_npz(src, image_size=48, resize="bilinear")
    assert torch.equal(timm_like.pos_embed.detach(), vit.resample_pos_embed(pos, 6))
    assert "4x4" in caplog.text and "6x6" in caplog.text and str(src) in caplog.text
    with torch.no_grad():
        assert model(_images(model.config)).shape == (2, 10)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loaders.npz"):
        same = load_npz(src, image_size=32)
    assert torch.equal(same.pos_embed.detach(), pos) and "resizing" not in caplog.text


def test_dropout_rates_are_set_at_load_time(tmp_path):
    src = tmp_path / "ckpt.npz"
    write_google_npz(src, CONFIG)
    model = load_npz(src, num_classes=3, dropout_rate=0.1, attention_dropout_rate=0.05)
    assert model.config.dropout_rate == 0.1 and model.config.attention_dropout_rate == 0.05
    assert model.blocks[0].mlp.drop1.p == 0.1 and model.blocks[0].attn.attn_drop.p == 0.05
    assert not model.training  # eval mode: the caller switches to train()


def test_image_size_not_divisible_by_patch(tmp_path):
    src = tmp_path / "ckpt.npz"
    write_google_npz(src, CONFIG)
    with pytest.raises(CheckpointError, match=r"image_size=30 .* patch size 8.*24 or 32") as e:
        load_npz(src, image_size=30)
    assert str(src) in str(e.value)


# ── bad files ───────────────────────────────────────────────────────────────────────────────────────────

def _params(**kw):
    from npz_factory import google_params
    return google_params(CONFIG, **kw)


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tmp_path):
    params = _params()
    del params["Transformer/encoderblock_1/LayerNorm_2/bias"]
    params["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3, np.float32)
    params["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"] = np.zeros(17, np.float32)
    path = _write(tmp_path / "bad.npz", params)
    with pytest.raises(CheckpointError) as e:
        load_npz(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys (1): Transformer/encoderblock_1/LayerNorm_2/bias" in msg
    assert "unexpected keys (1): Transformer/encoderblock_0/extra/kernel" in msg
    assert "'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias' has shape (17,), expected (16,)" in msg


def test_long_key_lists_are_shortened(tmp_path):
    params = _params()
    params.update({f"extra/{i:02d}": np.zeros(1, np.float32) for i in range(25)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(25\): extra/00, .*extra/19, \.\.\. \(5 more\)"):
        load_npz(_write(tmp_path / "extra.npz", params))


@pytest.mark.parametrize("key,shape,expected", [
    ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel", (2, 8, 15), "(2, 8, 16)"),
    ("Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel", (16, 4, 4), "(16, 2, 8)"),
    ("cls", (1, 16), "(1, 1, 16)"),
    ("embedding/kernel", (8, 8, 16, 3), None),  # channels/hidden swapped: caught by config inference
])
def test_wrong_shape(tmp_path, key, shape, expected):
    params = _params()
    params[key] = np.zeros(shape, np.float32)
    path = _write(tmp_path / "bad.npz", params)
    with pytest.raises(CheckpointError) as e:
        load_npz(path)
    assert str(path) in str(e.value) and ("embedding/kernel" in str(e.value) or key in str(e.value))
    if expected:
        assert f"has shape {shape}, expected {expected}" in str(e.value)


def test_integer_arrays_are_refused(tmp_path):
    params = _params()
    params["Transformer/encoder_norm/bias"] = np.zeros(16, np.int64)
    with pytest.raises(CheckpointError, match=r"'Transformer/encoder_norm/bias' has dtype int64"):
        load_npz(_write(tmp_path / "ints.npz", params))


def test_num_heads_cannot_be_inferred(tmp_path):
    params = _params()
    q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    params[q] = params[q].reshape(16, 16)  # a flattened export: heads are no longer visible
    path = _write(tmp_path / "flat.npz", params)
    with pytest.raises(CheckpointError, match=r"cannot infer num_heads: .*query/kernel.*\(16, 16\)") as e:
        load_npz(path)
    assert str(path) in str(e.value)
    params[q] = np.zeros((16, 3, 5), np.float32)  # 3 * 5 != 16
    with pytest.raises(CheckpointError, match=r"cannot infer num_heads.*\(16, 3, 5\)"):
        infer_config(params)


def test_other_inference_errors():
    params = _params()
    del params["embedding/kernel"]
    with pytest.raises(CheckpointError, match="key 'embedding/kernel' is missing"):
        infer_config(params)
    params = _params()
    params["Transformer/posembed_input/pos_embedding"] = np.zeros((1, 16, 16), np.float32)
    with pytest.raises(CheckpointError, match="16 positions.*square grid"):
        infer_config(params)
    params = dict(_params(), **{"ResNet/root_block/conv_root/kernel": np.zeros((7, 7, 3, 64), np.float32)})
    with pytest.raises(CheckpointError, match="hybrid ResNet"):
        infer_config(params)
    params = {k: v for k, v in _params().items() if "encoderblock_0/" not in k}
    with pytest.raises(CheckpointError, match=r"encoder blocks \[0\] are missing"):
        infer_config(params)


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    write_google_npz(path, CONFIG)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"truncated or corrupt") as e:
            load_npz(path)
        assert str(path) in str(e.value)


@pytest.mark.parametrize("content,what", [
    (b"", "empty"),
    (b"hello, these are not weights\n", "text file starting with 'hello"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ac74\nsize 412815506\n", "Git LFS pointer"),
    (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", "HTML/XML page"),
    (b"\x00\x01\x02\x03binary", "not a zip archive"),
])
def test_not_an_npz(tmp_path, content, what):
    path = tmp_path / "weights.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=what) as e:
        read_npz(path)
    assert str(path) in str(e.value)


def test_single_npy_array(tmp_path):
    path = tmp_path / "w.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(CheckpointError, match="single .npy array"):
        read_npz(path)


def test_torch_save_file_given_as_npz(tmp_path):
    state = vit.VisionTransformer(CONFIG).state_dict()
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"model\.pt is not an .npz checkpoint: it is a PyTorch torch\.save"):
        load_npz(path)
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt is not an .npz checkpoint: it is a Python pickle"):
        load_npz(legacy)


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "pickled.npz"
    with open(path, "wb") as f:
        np.savez(f, cls=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"'cls' cannot be read without pickle"):
        read_npz(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.npz does not exist"):
        load_npz(tmp_path / "nope.npz")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_npz(tmp_path)


def test_opt_target_prefix_ignores_optimizer_state(tmp_path):
    params = {"opt/target/" + k: v for k, v in _params().items()}
    params["opt/state/step"] = np.zeros((), np.float32)
    model = load_npz(_write(tmp_path / "opt.npz", params))
    assert model.config == CONFIG
