"""The visual tools (tools/attention_map.py, pos_embed.py, patch_filters.py) end to end on a random checkpoint.

Each CLI runs on a Google-layout .npz written by npz_factory and must write a readable PNG (and the attention
masks as .npy with the right shapes): the first as a real process through tools/, the others through the same
cli() in this process (a process costs ~4 s of imports). Adapters are tested at the function level: the maps
of a model with RLRR or LoRA applied come from the adapted attention, and forward is unchanged.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from npz_factory import write_google_npz

import loaders
import vit
from vit import visualize

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = vit.get_config("testing")  # 32 px, patch 8: a 4x4 grid, 2 heads, 2 layers, 10 classes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "testing.npz"
    write_google_npz(path, CONFIG, seed=1)
    return path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Two small images of different sizes and modes, as files PIL reads."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    a = folder / "a.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(a)
    b = folder / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(b)
    return [a, b]


def run_tool(name, *args, env=None):
    result = subprocess.run([sys.executable, str(TOOLS / name), *map(str, args)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=ROOT)
    return result


def run_in_process(name, *args) -> int:
    """The exit code of the tool's cli(), which tools/NAME.py calls, run in this process."""
    return importlib.import_module(f"peft.cli.{name}").cli([str(a) for a in args])


def assert_png(path, min_size=100):
    import matplotlib.image

    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] >= min_size and img.shape[1] >= min_size
    assert img.std() > 0.01  # not a blank canvas
    return img


def test_attention_map_cli_on_image_files(checkpoint, image_files, tmp_path):
    out = tmp_path / "figs" / "att.png"
    r = run_tool("attention_map.py", "--checkpoint", checkpoint, *image_files, "--per-layer", "--head-fusion",
                 "max", "--discard-ratio", "0.5", "--output", out)
    assert r.returncode == 0, r.stderr
    img = assert_png(out)
    assert img.shape[0] > img.shape[1]  # 2 columns of images, 1 + 1 + 2 heads + 2 layers rows
    g, b = CONFIG.grid_size, len(image_files)
    rollout = np.load(tmp_path / "figs" / "att_rollout.npy")
    assert rollout.shape == (b, g, g) and np.allclose(rollout.max(axis=(1, 2)), 1.0)
    assert np.load(tmp_path / "figs" / "att_cls_heads.npy").shape == (b, CONFIG.num_heads, g, g)
    per_layer = np.load(tmp_path / "figs" / "att_per_layer.npy")
    assert per_layer.shape == (CONFIG.num_layers, b, g, g)
    np.testing.assert_allclose(per_layer[-1], rollout)


def test_attention_map_cli_on_a_dataset_at_another_image_size(checkpoint, tmp_path, caplog):
    from PIL import Image

    data = tmp_path / "data"
    for label, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (data / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (24, 24), colour).save(data / label / f"{i}.png")
    out = tmp_path / "ds.png"
    caplog.set_level("INFO")
    assert run_in_process("attention_map", "--checkpoint", checkpoint, "--dataset", data, "--split", "train",
                          "--index", 0, 3, 1, "--image-size", 48, "--output", out) == 0
    assert_png(out)
    assert np.load(tmp_path / "ds_rollout.npy").shape == (3, 6, 6)  # 48 px / patch 8
    assert np.load(tmp_path / "ds_cls_heads.npy").shape == (3, 2, 6, 6)
    assert not (tmp_path / "ds_per_layer.npy").exists()
    assert "true blue" in caplog.text and "true red" in caplog.text


def test_pos_embed_cli(checkpoint, tmp_path):
    out = tmp_path / "pos.png"
    assert run_in_process("pos_embed", "--checkpoint", checkpoint, "--output", out, "--save-npy") == 0
    assert_png(out)
    sim = np.load(tmp_path / "pos.npy")
    g = CONFIG.grid_size
    assert sim.shape == (g, g, g, g)
    for i in range(g):
        for j in range(g):
            assert sim[i, j, i, j] == pytest.approx(1.0, abs=1e-5)  # every position is itself


def test_patch_filters_cli(checkpoint, tmp_path):
    out = tmp_path / "filters.png"
    assert run_in_process("patch_filters", "--checkpoint", checkpoint, "--raw", "--output", out, "--save-npy") == 0
    assert_png(out)
    # testing config: D = 16 filters of 3*8*8 = 192 values; centring leaves rank 15 < 28
    comps = np.load(tmp_path / "filters.npy")
    assert comps.shape == (15, 3, 8, 8)
    flat = comps.reshape(15, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(15), atol=1e-5)


@pytest.mark.parametrize("tool", ["attention_map", "pos_embed", "patch_filters"])
def test_help_has_an_example(tool, monkeypatch, capsys):
    module = importlib.import_module(f"peft.cli.{tool}")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"python tools/{tool}.py" in text and "--checkpoint" in text


def test_missing_default_weights_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_PEFT_CACHE", str(tmp_path))
    from peft.cli import visual

    with pytest.raises(FileNotFoundError) as exit_info:
        visual.load_model(None)
    message = str(exit_info.value)
    assert str(tmp_path / "ViT-B_16.npz") in message and "fetch_weights" in message and "--checkpoint" in message


def perturb_adapters(model, names, seed=0):
    """Give freshly applied adapters non-trivial values, so that they change what the model computes."""
    g = torch.Generator().manual_seed(seed)
    base = {n for n, _ in vit.VisionTransformer(model.config).named_parameters()}
    with torch.no_grad():
        changed = 0
        for n, p in model.named_parameters():
            if n not in base:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
                changed += 1
    assert changed, f"no adapter parameters found after applying {names}"


@pytest.mark.parametrize("method", ["rlrr", "lora"])
def test_attention_maps_with_adapters_applied(checkpoint, method):
    import peft

    if not hasattr(peft, f"apply_{method}"):
        pytest.skip(f"peft.apply_{method} not available yet")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    base = loaders.load_npz(checkpoint)
    base_maps = visualize.attention_maps(base, x)
    model = loaders.load_npz(checkpoint)
    names = getattr(peft, f"apply_{method}")(model, **({"rank": 2} if method == "lora" else {}))
    perturb_adapters(model, names)
    model.eval()
    with torch.no_grad():
        expected_logits = model(x)  # the fused path
        with vit.record_attention(model) as recorded:
            model(x)
    maps = visualize.attention_maps(model, x, per_layer=True)
    torch.testing.assert_close(maps.probs, expected_logits.softmax(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maps.rollout, visualize.attention_rollout(recorded))
    assert not torch.allclose(maps.cls_heads, base_maps.cls_heads, atol=1e-4)  # the adapters are seen
    assert maps.per_layer.shape == (CONFIG.num_layers, 2, 4, 4)


def test_fine_tuning_checkpoint_gives_model_and_class_names(monkeypatch, tmp_path):
    """A full-state checkpoint in tools/finetune.py's format: the model and its class names come back."""
    import peft.finetune.checkpoint as checkpoint_module
    from peft.cli import visual as attention_map

    torch.manual_seed(0)
    model = vit.VisionTransformer(CONFIG)
    classes = [f"class-{i}" for i in range(CONFIG.num_classes)]
    ckpt = {"format": checkpoint_module.FORMAT, "version": checkpoint_module.VERSION,
            "model_config": checkpoint_module.config_dict(CONFIG), "mode": "full", "mode_options": {},
            "base_weights": None, "state_dict_kind": "full", "state_dict": model.state_dict(),
            "classes": classes}
    path = checkpoint_module.save_atomic(ckpt, tmp_path / "run" / "best.pt")
    loaded, names, desc, normalisation = attention_map.load_model(path.parent)
    assert normalisation == (0.5, 0.5)  # no recorded options: Google's
    assert names == classes and "best.pt" in desc
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(visualize.attention_maps(loaded, x).probs,
                               visualize.attention_maps(model.eval(), x).probs)


def test_patch_filters_sum_channels_in_process(checkpoint, tmp_path, monkeypatch):
    """--sum-channels: PCA of the channel-summed filters, what a greyscale (R = G = B) input sees."""
    from peft.cli import patch_filters

    out = tmp_path / "grey.png"
    patch_filters.main(["--checkpoint", str(checkpoint), "--sum-channels", "--output", str(out), "--save-npy"])
    assert_png(out)
    comps = np.load(tmp_path / "grey.npy")
    weight = loaders.load_npz(checkpoint).patch_embed.weight.detach().sum(dim=1, keepdim=True)
    expected, _ = visualize.patch_filter_pca(weight)
    assert comps.shape == (15, 1, 8, 8)  # 16 filters of 64 values, rank 15 after centring
    np.testing.assert_allclose(comps, expected.numpy(), atol=1e-6)


def test_a_run_trained_with_imagenet_normalisation_is_drawn_with_it(tmp_path):
    """The attention maps feed the model what it was trained on: a run's recorded --normalise, and the figure
    shows the images back in [0, 1] with the same per-channel mean and std."""
    import peft.finetune.checkpoint as checkpoint_module
    from loaders.transforms import BatchTransform
    from peft.cli import visual
    from vit import plots

    torch.manual_seed(0)
    model = vit.VisionTransformer(CONFIG)
    ckpt = {"format": checkpoint_module.FORMAT, "version": checkpoint_module.VERSION,
            "model_config": checkpoint_module.config_dict(CONFIG), "mode": "full", "mode_options": {},
            "base_weights": None, "state_dict_kind": "full", "state_dict": model.state_dict(),
            "classes": [str(i) for i in range(CONFIG.num_classes)], "options": {"normalise": "imagenet"}}
    path = checkpoint_module.save_atomic(ckpt, tmp_path / "run" / "best.pt")
    mean, std = visual.load_model(path.parent).normalisation
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = BatchTransform(32, train=False, mean=mean, std=std)(images)
    by_hand = (images.float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x, by_hand.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plots.denormalize(x, mean, std), images.numpy() / 255, atol=1e-5)
