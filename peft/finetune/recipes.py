"""Official runs as data: one recipe per method, each a table of what its official code sets, with the source.

``--recipe NAME`` fills the options of a VTAB-1k or FGVC run with the recipe's values: the shared ones, the
benchmark's, then the task's. An option given on the command line wins (``FinetuneOptions.explicit``; from Python,
a value that differs from the default wins), and the resolved values are what the run records (``options.json``,
``metrics.json`` ``recipe``). Where an official code has no value for something, the recipe says so in ``notes``
rather than inventing one.

Every number is cited as ``repository@commit path:line`` (the commits read: zstarN70/RLRR@287c772,
dongzelian/SSF@e94e0e7, ZhangYuanhan-AI/NOAH@e9c55f3, KMnP/vpt@4410440, JieShibo/PETL-ViT@026e4f1; timm 0.9.8 is
the version the RLRR environment pins, ``environment.yaml``; NOAH pins timm 0.5.4, FacT timm 0.4.12).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from loaders.datasets.fgvc import FGVC_SETS
from loaders.datasets.vtab import VTAB_TASKS

from .options import RECIPES, FinetuneOptions, OptionsError, benchmark_task


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str  # the --mode it is the official run of
    summary: str
    common: dict  # options for every benchmark
    benchmarks: dict  # "vtab-1k" / "fgvc" -> options for that benchmark (a benchmark not listed is refused)
    tasks: dict = field(default_factory=dict)  # "vtab-1k" / "fgvc" -> task -> options
    method_options: dict = field(default_factory=dict)  # --lora-variant, --vpt-dropout, ...
    task_method_options: dict = field(default_factory=dict)  # "vtab-1k" -> task -> method options (FacT's rank)
    any_mode: bool = False  # other modes may use the recipe's protocol (keeping their own learning rate)
    lr_required: tuple = ()  # benchmarks with no official learning rate: --lr (or --sweep) must give one
    notes: tuple = ()  # where this project differs from the official run, and values no official source gives


def _per_task(table: dict, keys=("lr", "drop_path", "weight_decay", "flip")) -> dict:
    return {t: {k: getattr(v, k) for k in keys} for t, v in table.items()}


# The official RLRR loops: train_vtab.py / train_fgvc.py (zstarN70/RLRR@287c772).
_RLRR_COMMON = dict(
    schedule="epoch-cosine",  # timm create_scheduler, sched=cosine: CosineLRScheduler (train_vtab.py:40,166)
    warmup_epochs=10, cooldown_epochs=10,  # train_vtab.py:39,42 (t_initial = epochs, + cooldown epochs at min_lr)
    warmup_lr=1e-7, min_lr=1e-8,  # RLRRDatasets/VTABConfig.py, FGVCConfig.py: config.warmup_lr, config.min_lr
    schedule_lag=1,  # lr_scheduler.step(epoch) after epoch `epoch` (train_vtab.py:172): epoch e runs at lr(e - 1)
    optimizer="adamw", decay_groups="rlrr",  # torch.optim.AdamW(model.get_parameters(...)) (train_vtab.py:165;
    # models/networks.py:299-313: names holding 'bias' or 'norm' are not decayed)
    batch_size=32,  # VTABConfig.py / FGVCConfig.py: config.batch_size
    precision="fp16",  # autocast() + timm NativeScaler (train_vtab.py:116,122,164), also at test (:98)
    clip_grad=0.0,  # NativeScaler called without clip_grad (train_vtab.py:122)
    drop_path_mode="element",  # nn.Dropout(p=drop_path) on each residual branch (models/networks.py:166-167)
    gelu="erf",  # nn.GELU() (models/networks.py:126)
    normalise="half", image_size=224, seed=42,  # VTABDataLoader.py Normalize 0.5; --img_size 224; --seed 42
    label_smoothing=0.0, crop=False,  # nn.CrossEntropyLoss() (train_vtab.py:163); no crop in VTAB's transform
)
_RESTARTS = dict(schedule="epoch-restarts", restart_epochs=5, min_lr=0.0)
RLRR = Recipe(
    "rlrr-official", "rlrr", "the official RLRR runs (zstarN70/RLRR train_vtab.py, train_fgvc.py)",
    _RLRR_COMMON,
    {"vtab-1k": dict(epochs=110,  # --epochs 100 (train_vtab.py:31) + 10 cooldown: range(num_epochs) (:168)
                     official_test_from=2),  # valid() after every epoch > 0 (train_vtab.py:174): 1-based epochs 2..110
     "fgvc": dict(epochs=60,  # --epochs 50 (train_fgvc.py:31) + 10 cooldown
                  official_test_from=1)},  # valid() after every epoch (train_fgvc.py:173)
    {"vtab-1k": _per_task(VTAB_TASKS),  # RLRRDatasets/VTABConfig.py (mirrored in loaders/datasets/vtab.py)
     # RLRRDatasets/FGVCConfig.py; CUB and Dogs: CosineAnnealingWarmRestarts(T_0=5, T_mult=1, eta_min=0) stepped
     # with the epoch after it (train_fgvc.py:163-172); built after timm's scheduler, it starts at the full lr
     "fgvc": {t: {**v, **(_RESTARTS if t in ("cub", "dogs") else {})}
              for t, v in _per_task({k: s.task for k, s in FGVC_SETS.items()}).items()}},
    any_mode=True,
    notes=("Selection: the official loops report the maximum test accuracy over epochs (test_accuracy_official "
           "here); this project's test_accuracy is the last epoch's model (final protocol) or the val-selected one.",
           "FGVC class ids: remapped over all json files (official: per file; the same map when every file holds "
           "every class).",
           "Other modes keep their own learning rate under this recipe (the per-task rates are RLRR's)."))

# SSF: train_scripts/vit/vtab/<task>/train_ssf.sh and train.py (timm 0.4-era train loop), dongzelian/SSF@e94e0e7.
_SSF_VTAB = {  # task: (lr, weight decay, drop path) from train_scripts/vit/vtab/<dir>/train_ssf.sh
    "cifar": (5e-3, 5e-5, 0.0), "caltech101": (1e-3, 5e-2, 0.1), "dtd": (5e-3, 5e-5, 0.0),
    "oxford_flowers102": (5e-3, 5e-5, 0.0), "oxford_iiit_pet": (5e-3, 5e-5, 0.0), "svhn": (1e-2, 5e-5, 0.0),
    "sun397": (5e-3, 5e-5, 0.0), "patch_camelyon": (5e-3, 5e-5, 0.0), "eurosat": (3e-3, 5e-2, 0.2),
    "resisc45": (2e-3, 5e-5, 0.1), "diabetic_retinopathy": (5e-3, 5e-5, 0.2), "clevr_count": (2e-3, 5e-2, 0.1),
    "clevr_dist": (5e-2, 5e-2, 0.1), "dmlab": (5e-3, 5e-5, 0.1), "kitti": (1e-2, 5e-5, 0.0),
    "dsprites_loc": (1e-2, 5e-5, 0.0), "dsprites_ori": (5e-3, 5e-5, 0.2), "smallnorb_azi": (2e-2, 5e-5, 0.1),
    "smallnorb_ele": (5e-3, 5e-2, 0.2),
}
_SSF_FGVC = {  # train_scripts/vit/fgvc/<dir>/train_ssf.sh
    "cub": (1e-2, 5e-2, 0.0), "nabirds": (2e-4, 5e-2, 0.1), "flowers": (1e-2, 5e-2, 0.1),
    "cars": (2e-2, 5e-2, 0.0), "dogs": (2.5e-4, 5e-2, 0.0),
}
SSF = Recipe(
    "ssf-official", "ssf", "SSF's own runs (dongzelian/SSF train_scripts, train.py)",
    dict(schedule="epoch-cosine", warmup_epochs=10, cooldown_epochs=10,  # --warmup-epochs 10; train.py:202 default 10
         warmup_lr=1e-7, min_lr=1e-8, epochs=110,  # --warmup-lr 1e-7 --min-lr 1e-8 --epochs 100 (+ cooldown)
         schedule_lag=0,  # lr_scheduler.step(epoch + 1) after each epoch (train.py:708): epoch e runs at lr(e)
         optimizer="adamw", decay_groups="timm",  # --opt adamw; optim_factory.py:39-57 (1-D and .bias: no decay)
         batch_size=64,  # --batch-size 32 per process, --nproc_per_node=2 (every train_ssf.sh)
         precision="fp16", clip_grad=0.0,  # --amp; --clip-grad default None (train.py:160)
         drop_path_mode="sample", gelu="erf", normalise="half",  # timm DropPath, nn.GELU, in21k mean = std = 0.5
         label_smoothing=0.0, image_size=224, seed=42, crop=False),  # --smoothing 0; train.py:294 seed 42
    {"vtab-1k": dict(flip=False,  # --no-aug --direct-resize: resize to 224² only
                     official_test_from=1),  # validate() on the evaluation set after every epoch; best kept
     "fgvc": dict(official_test_from=1)},
    {"vtab-1k": {t: dict(lr=v[0], weight_decay=v[1], drop_path=v[2]) for t, v in _SSF_VTAB.items()},
     "fgvc": {t: dict(lr=v[0], weight_decay=v[1], drop_path=v[2]) for t, v in _SSF_FGVC.items()}},
    notes=("FGVC: the official scripts add --simple-aug (SSF's own augmentation) and evaluate an EMA of the "
           "weights (--model-ema); neither is reproduced here: FGVC images take the official RLRR pipeline "
           "(256² resize, 224 crops) and the weights themselves are evaluated.",))

# NOAH's LoRA and Adapter, the "LoRA 0.29M" and "Adapter 0.16M" rows of the VTAB-1k tables:
# configs/{LoRA,Adapter}/VTAB/slurm_train_*_vtab.sh and supernet_train_prompt.py defaults
# (ZhangYuanhan-AI/NOAH@e9c55f3).
_NOAH_COMMON = dict(
    epochs=100,  # --epochs=100; the loop runs range(args.epochs): no cooldown epochs (supernet_train_prompt.py:400)
    schedule="epoch-cosine", cooldown_epochs=0, warmup_epochs=10,  # :107 --warmup-epochs 10
    warmup_lr=1e-6, min_lr=1e-5,  # defaults, not set by the script (supernet_train_prompt.py:98,100)
    schedule_lag=1,  # lr_scheduler.step(epoch) after epoch `epoch` (:414)
    lr=1e-3, weight_decay=1e-4,  # LR=0.001, WEIGHT_DECAY=0.0001 (slurm_train_lora_vtab.sh)
    optimizer="adamw", decay_groups="timm",  # --opt adamw (:74), timm create_optimizer: 1-D/bias not decayed
    batch_size=64,  # --batch-size=64, one GPU (slurm_train_lora_vtab.sh)
    precision="fp32",  # --amp not passed: store_true, default off (:188)
    clip_grad=0.0, label_smoothing=0.0,  # --clip-grad None (:80); --smoothing=0 (script)
    drop_path=0.1, drop_path_mode="sample",  # --drop-path default 0.1 (:59); timm 0.5.4's DropPath (requirements.txt),
    # per-sample bernoulli_ masks, one module called after attention and after the MLP (model/
    # supernet_vision_transformer_timm.py:308,364-365)
    gelu="erf", normalise="imagenet",  # lib/datasets.py:241 Normalize(IMAGENET_DEFAULT_MEAN, _STD)
    image_size=224, seed=0, flip=False, crop=False,  # --seed 0 (:170); --no_aug --direct_resize
    drop_last=True,  # DataLoader(dataset_train, ..., drop_last=True) (supernet_train_prompt.py:275-281)
    head_init="trunc-normal",  # reset_classifier: trunc_normal_(head.weight, std=.02), bias 0 (model/
    # supernet_vision_transformer_timm.py:551-555, called at supernet_train_prompt.py:328-329)
    official_test_from=1, official_test_every=10)  # evaluate at epoch % 10 == 0 and the last (:427-430)
_NOAH_NOTES = ("Images: NOAH resizes to 224² bicubic (transforms.Resize((224, 224), interpolation=3)) as the VTAB "
               "pipeline here does.",)
LORA_NOAH = Recipe(
    "lora-noah", "lora", "NOAH's LoRA runs (ZhangYuanhan-AI/NOAH configs/LoRA/VTAB, supernet_train_prompt.py)",
    _NOAH_COMMON, {"vtab-1k": {}},
    # experiments/LoRA/ViT-B_prompt_lora_8.yaml: LORA_DIM 8; --drop_rate_LoRA default 0.1, never set by the
    # script (supernet_train_prompt.py:207). The variant re-draws A and B truncated-normal as the run did.
    method_options=dict(lora_variant="noah", lora_rank=8, lora_dropout=0.1),
    notes=("NOAH publishes no FGVC LoRA run; FGVC LoRA rows use --recipe rlrr-official with --mode lora.",
           *_NOAH_NOTES))
ADAPTER_NOAH = Recipe(
    "adapter-noah", "adapter",
    "NOAH's Adapter runs (ZhangYuanhan-AI/NOAH configs/Adapter/VTAB, supernet_train_prompt.py)",
    _NOAH_COMMON, {"vtab-1k": {}},  # slurm_train_adapter_vtab.sh: the LoRA script's flags with --is_adapter
    # experiments/Adapter/ViT-B_prompt_adapter_8.yaml: ADAPTER_DIM 8; --drop_rate_adapter default 0.1
    # (supernet_train_prompt.py:209); init_weights re-draws every nn.Linear truncated-normal std 0.02, zero bias
    # (model/supernet_vision_transformer_timm.py:531, _init_vit_weights), over AdapterSuper's xavier init
    method_options=dict(adapter_dim=8, adapter_placement="mlp", adapter_init="trunc-normal", adapter_dropout=0.1),
    notes=("NOAH publishes no FGVC Adapter run; FGVC Adapter rows use --recipe rlrr-official with --mode adapter.",
           *_NOAH_NOTES))

# FacT-TT: FacT/fact_tt.py, FacT/vtab.py, FacT/configs/tt/<task>.yaml (JieShibo/PETL-ViT@026e4f1), timm 0.4.12
# (FacT/README.md). Per task (rank, scale): configs/tt/<task>.yaml "rank", "scale" (fact_tt.py:178-181).
FACT_TT_TASKS = {
    "caltech101": (16, 10.0), "cifar": (8, 1.0), "clevr_count": (16, 1.0), "clevr_dist": (4, 10.0),
    "diabetic_retinopathy": (8, 1.0), "dmlab": (16, 10.0), "dsprites_loc": (16, 100.0), "dsprites_ori": (16, 1.0),
    "dtd": (8, 0.01), "eurosat": (8, 100.0), "kitti": (16, 10.0), "oxford_flowers102": (16, 1.0),
    "oxford_iiit_pet": (8, 1.0), "patch_camelyon": (8, 10.0), "resisc45": (8, 0.1), "smallnorb_azi": (16, 100.0),
    "smallnorb_ele": (8, 10.0), "sun397": (8, 1.0), "svhn": (16, 100.0),
}
FACT = Recipe(
    "fact-official", "fact-tt", "FacT-TT's own runs (JieShibo/PETL-ViT FacT/fact_tt.py, configs/tt)",
    dict(epochs=100,  # train(..., epoch=100) (fact_tt.py:198)
         schedule="epoch-cosine", cooldown_epochs=0, warmup_epochs=10,  # CosineLRScheduler(t_initial=100,
         warmup_lr=1e-6, min_lr=1e-5,  # warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6, decay_rate=0.1) (:196-197)
         schedule_lag=1,  # scheduler.step(ep) after epoch ep (:33-34): epoch e runs at lr(e - 1)
         lr=1e-3, weight_decay=1e-4,  # --lr 1e-3, --wd 1e-4 (:165-166)
         optimizer="adamw", decay_groups="all",  # AdamW(trainable, ...) on every FacT tensor and the head (:184-195)
         batch_size=64, drop_last=True,  # get_data(batch_size=64): DataLoader(..., shuffle=True, drop_last=True)
         precision="fp32", clip_grad=0.0, label_smoothing=0.0,  # no autocast, no clipping, F.cross_entropy (:28-32)
         drop_path=0.1,  # create_model(..., drop_path_rate=0.1) (:175)
         drop_path_mode="sample-floor",  # timm 0.4.12 DropPath: floor(keep + torch.rand) per sample
         gelu="erf", normalise="imagenet",  # timm nn.GELU; vtab.py Normalize(IMAGENET_DEFAULT_MEAN, _STD)
         image_size=224, seed=42, flip=False, crop=False,  # Resize((224, 224), interpolation=3) only; --seed 42
         head_init="linear",  # vit.reset_classifier(...) (:185): timm 0.4.12 builds a new nn.Linear, default init
         official_test_from=10, official_test_every=10),  # test when ep % 10 == 9 (:35-39): epochs 10, 20, ..., 100
    {"vtab-1k": {}},
    method_options=dict(fact_dropout=0.1),  # _.dp = nn.Dropout(0.1) (fact_tt.py:114,124)
    task_method_options={"vtab-1k": {t: dict(fact_rank=r, fact_scale=sc) for t, (r, sc) in FACT_TT_TASKS.items()}},
    notes=("FacT publishes no FGVC FacT-TT run in JieShibo/PETL-ViT; FGVC rows use --recipe rlrr-official.",
           "Trainable parameters vary with the task's rank: 8,448 (rank 4), 21,504 (rank 8), 61,440 (rank 16) for "
           "ViT-B/16 without the head; the mean over the 19 tasks is 39,734 (FacT's 0.040M)."))

# VPT: src/configs/config.py, configs/base-prompt.yaml, configs/prompt/<set>.yaml, src/solver/*, src/engine/trainer.py,
# tune_vtab.py / tune_fgvc.py (KMnP/vpt@4410440).
_VPT_FGVC = {  # configs/prompt/<set>.yaml BASE_LR, WEIGHT_DECAY; lr scaled by batch / 256 (tune_fgvc.py:31)
    "cub": (0.1, 0.01), "nabirds": (0.1, 0.01), "flowers": (0.001, 0.0001), "dogs": (0.001, 0.0001),
    "cars": (0.001, 0.0001),
}
VPT = Recipe(
    "vpt-official", "vpt", "VPT's own runs (KMnP/vpt configs, src/solver, src/engine/trainer.py)",
    dict(epochs=100, schedule="epoch-warmup-cosine", warmup_epochs=10,  # base-prompt.yaml TOTAL_EPOCH, WARMUP_EPOCH
         cooldown_epochs=0, warmup_lr=0.0, min_lr=0.0,  # WarmupCosineSchedule: 0 -> 1 linearly, cosine to 0
         schedule_lag=0,  # LambdaLR stepped once after each epoch (trainer.py:221): epoch e runs at f(e)
         optimizer="sgd", momentum=0.9, weight_decay=1e-4,  # base-prompt.yaml OPTIMIZER, MOMENTUM, WEIGHT_DECAY
         decay_groups="vpt",  # src/solver/optimizer.py:58-62: every parameter but last_layer.bias is decayed
         batch_size=128,  # base-prompt.yaml DATA.BATCH_SIZE
         precision="fp32", clip_grad=0.0, label_smoothing=0.0,  # no autocast; SOLVER.LOSS "softmax"
         drop_path=0.0, frozen_eval=True,  # PromptedTransformer.train(): encoder and embeddings stay in eval mode
         gelu="erf", normalise="imagenet", image_size=224, seed=42, crop=False),  # src/data/transforms.py:9
    {"vtab-1k": dict(flip=False), "fgvc": dict()},
    {"fgvc": {t: dict(lr=lr * 128 / 256, weight_decay=wd) for t, (lr, wd) in _VPT_FGVC.items()}},
    method_options=dict(vpt_dropout=0.0),  # src/configs/config.py:74 PROMPT.DROPOUT = 0.0
    lr_required=("vtab-1k",),
    notes=("VTAB-1k: VPT has no per-task learning rate in its repository: it sweeps lr in {50, 25, 10, 5, 2.5, "
           "1, 0.5, 0.25, 0.1, 0.05} × batch/256 and weight decay in {0.01, 0.001, 1e-4, 0} on val (tune_vtab.py). "
           "Pass --lr, or use tools/vtab.py --sweep.",
           "Prompt length: the paper tunes it per task; its values are not in the repository (10 here, "
           "--vpt-tokens).",
           "FGVC images: VPT resizes the shorter side to 256 before its 224 crops; this project stores the "
           "official RLRR 256² resize for every FGVC recipe."))

RECIPE_TABLE: dict[str, Recipe] = {r.name: r for r in (RLRR, SSF, LORA_NOAH, ADAPTER_NOAH, FACT, VPT)}
assert set(RECIPES) == {"project", *RECIPE_TABLE}, "options.RECIPES and the recipe tables disagree"
# The official recipe of each method (what tools/vtab.py --recipe official picks); other modes run rlrr-official.
METHOD_RECIPES = {r.method: r.name for r in RECIPE_TABLE.values()}


def _explicit(opts: FinetuneOptions) -> set:
    if opts.explicit:
        return set(opts.explicit)
    defaults = FinetuneOptions()
    return {f.name for f in dataclasses.fields(opts) if getattr(opts, f.name) != getattr(defaults, f.name)}


def recipe_settings(name: str, data: str, mode: str) -> dict:
    """Every option the recipe sets for ``--data`` (vtab-1k:TASK or fgvc:NAME) and ``--mode``."""
    recipe = RECIPE_TABLE[name]
    kind, _, task = data.partition(":")
    if benchmark_task(data) is None:
        raise OptionsError(f"--recipe {name} needs --data vtab-1k:TASK or fgvc:NAME, got {data!r}")
    if kind not in recipe.benchmarks:
        raise OptionsError(f"--recipe {name} has no official {kind} run ({recipe.notes[0] if recipe.notes else ''}); "
                           f"it covers {', '.join(recipe.benchmarks)}")
    if mode != recipe.method and not recipe.any_mode:
        raise OptionsError(f"--recipe {name} is the official run of --mode {recipe.method}, not --mode {mode}")
    settings = {**recipe.common, **recipe.benchmarks[kind], **recipe.tasks.get(kind, {}).get(task, {})}
    if mode != recipe.method:
        settings.pop("lr", None)  # the per-task rates are the method's own
    return settings


def apply_recipe(opts: FinetuneOptions) -> FinetuneOptions:
    """The options with ``--recipe``'s values filled in; explicit options win. ``project`` changes nothing.

    When ``--epochs`` is given explicitly (a shorter rehearsal), the recipe's warmup and cooldown epochs shrink
    in proportion (rounded to whole epochs), so the run keeps the schedule's shape."""
    if opts.recipe == "project":
        return opts
    if opts.recipe not in RECIPE_TABLE:
        raise OptionsError(f"--recipe {opts.recipe!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPE_TABLE[opts.recipe]
    settings = recipe_settings(opts.recipe, opts.data, opts.mode)
    explicit = _explicit(opts)
    kind = opts.data.partition(":")[0]
    if kind in recipe.lr_required and opts.mode == recipe.method and "lr" not in explicit:
        raise OptionsError(f"--recipe {opts.recipe}: {recipe.notes[0]}")
    changes = {k: v for k, v in settings.items() if k not in explicit}
    if "epochs" in explicit and "epochs" in settings:
        ratio = opts.epochs / settings["epochs"]
        for key in ("warmup_epochs", "cooldown_epochs"):
            if key in changes:
                changes[key] = round(settings[key] * ratio)
    own = recipe.method_options if opts.mode == recipe.method else {}
    per_task = recipe.task_method_options.get(kind, {}).get(opts.data.partition(":")[2], {})
    method_options = {**own, **(per_task if opts.mode == recipe.method else {}), **opts.method_options}
    return dataclasses.replace(opts, **changes, method_options=method_options)


def describe(name: str) -> dict:
    """The recipe as the run records it: its summary, the values it sets, and its notes."""
    r = RECIPE_TABLE[name]
    return {"name": r.name, "method": r.method, "summary": r.summary, "common": r.common,
            "benchmarks": r.benchmarks, "method_options": r.method_options,
            "task_method_options": r.task_method_options, "notes": list(r.notes)}
