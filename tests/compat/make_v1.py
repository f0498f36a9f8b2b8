"""Write ``runs_v1.pt`` and ``base_v1.npz``: one fine-tuning checkpoint of checkpoint format version 1 per method,
as the code of that format wrote them, with the logits each model gives on ``images()``.

It was run once, before the method contract was refactored; ``tests/test_compat.py`` loads the files with the code
of today, so a renamed module, parameter or option key that would orphan saved runs fails there. Rerunning it
with newer code would only re-record what that code writes: keep the committed files.

    python tests/compat/make_v1.py
"""

import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]

import peft  # noqa: E402
import vit  # noqa: E402
from conftest import images  # noqa: E402
from loaders import load_npz  # noqa: E402
from loaders.download import file_digest  # noqa: E402
from npz_factory import write_google_npz  # noqa: E402

# Options other than the defaults where a method has some, so that every key is exercised.
OPTIONS = {
    "head": {}, "mlp": {}, "full": {}, "bitfit": {},
    "vpt": {"vpt_tokens": 3, "vpt_dropout": 0.0},
    "vpt-shallow": {"vpt_shallow_tokens": 2},
    "adaptformer": {"adaptformer_dim": 4, "adaptformer_scale": 0.5},
    "adapter": {"adapter_dim": 4, "adapter_placement": "both"},
    "lora": {"lora_rank": 2, "lora_alpha": 4.0, "lora_targets": "q,v,fc1"},
    "lora-noah": {"lora_rank": 2, "lora_variant": "noah"},
    "dora": {"dora_rank": 2, "dora_targets": "k,proj"},
    "fact-tt": {"fact_rank": 2, "fact_scale": 0.5},
    "ssf": {},
    "rlrr": {"rlrr_rank": 2},
}


def main():
    base = HERE / "base_v1.npz"
    write_google_npz(base, vit.get_config("testing"), seed=0)
    digest = file_digest(base, "sha256")
    x = images()
    runs = {}
    for key, options in OPTIONS.items():
        mode = "lora" if key == "lora-noah" else key
        model = load_npz(base, num_classes=5)
        peft.apply_mode(model, mode, **options)
        torch.manual_seed(len(runs))
        with torch.no_grad():  # every trained tensor away from its init, as after training
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p) / math.sqrt(max(p.shape[-1], 1)))
        full = mode == "full"
        state = {n: p.detach().clone() for n, p in model.named_parameters() if full or p.requires_grad}
        config = peft.get_method(mode).config.from_options(options).to_options()
        ck = {
            "format": "vit-peft-finetune", "version": 1,
            "model_config": {k: getattr(model.config, k) for k in vars(model.config)},
            "mode": mode, "mode_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
            "base_weights": {"name": "base_v1.npz", "path": "base_v1.npz", "sha256": digest,
                             "pos_embed_resize": "google"},
            "state_dict_kind": "full" if full else "adapters", "state_dict": state,
            "classes": [str(i) for i in range(5)], "data": "fashion_mnist",
            "options": {"mode": mode, **options}, "epoch": 1, "step": 4, "best_val_accuracy": 0.5,
            "history": [], "trainable_parameters": 0, "total_parameters": 0,
        }
        with torch.no_grad():
            runs[key] = {"checkpoint": ck, "logits": model.eval()(x)}
    torch.save(runs, HERE / "runs_v1.pt")


if __name__ == "__main__":
    main()
