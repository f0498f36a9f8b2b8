"""Options are fields: help and bounds come from the field metadata, the guides' option tables from the same place.

A guide embeds a table as

    <!-- options: peft.finetune.options.FinetuneOptions -->
    ...the output of peft.fields.options_table(cls)...
    <!-- /options -->

and this test fails when the table differs from what the metadata renders (regenerate it with
``python -c "import peft.fields as f, peft.finetune as t; print(f.options_table(t.FinetuneOptions))"``)."""

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

import peft
from peft import fields
from peft.bench.suite import BenchmarkOptions
from peft.cli.attention_map import AttentionMapOptions
from peft.cli.evaluate import EvaluateOptions
from peft.cli.patch_filters import PatchFiltersOptions
from peft.cli.pos_embed import PosEmbedOptions
from peft.cli.predict import PredictOptions
from peft.finetune.options import FinetuneOptions, OptionsError
from peft.finetune.quickstart import QuickstartOptions
from peft.finetune.suite import SuiteOptions

ROOT = Path(__file__).resolve().parents[1]
TOOL_OPTIONS = [FinetuneOptions, BenchmarkOptions, SuiteOptions, QuickstartOptions, AttentionMapOptions,
                PatchFiltersOptions, PosEmbedOptions, EvaluateOptions, PredictOptions]
NOT_FLAGS = {"method_options", "explicit"}  # filled by the parser, not flags of their own


@pytest.mark.parametrize("cls", TOOL_OPTIONS + [m.config for m in peft.METHODS.values()], ids=lambda c: c.__name__)
def test_every_flag_has_one_line_of_help_in_its_field(cls):
    for f in dataclasses.fields(cls):
        if f.name not in NOT_FLAGS:
            assert len(fields.help_of(f)) > 5 and "\n" not in fields.help_of(f), (cls.__name__, f.name)


def test_no_option_class_keeps_help_or_bounds_outside_its_fields():
    for cls in TOOL_OPTIONS + [m.config for m in peft.METHODS.values()]:
        assert not {"CHOICES", "POSITIVE"} & set(vars(cls)), cls.__name__


def test_the_table_shows_each_fields_default_help_and_range():
    table = fields.options_table(FinetuneOptions, skip=tuple(NOT_FLAGS))
    assert "| `--crop-pct` | `0.875` |" in table and "(in (0, 1])" in table
    assert "| `--lr` | `None` | peak learning rate" in table and "(positive)" in table
    rows = [r for r in table.splitlines()[2:]]
    assert len(rows) == len(dataclasses.fields(FinetuneOptions)) - len(NOT_FLAGS)
    lora = fields.options_table(peft.LoraConfig, name=lambda n: fields.flag("lora_" + n))
    assert "| `--lora-rank` | `8` | LoRA rank r (at least 1) |" in lora


def test_one_check_reads_the_bounds_of_every_options_class():
    """The same metadata bound is what refuses the value, in a tool's options and in a method's config."""
    with pytest.raises(OptionsError, match=r"^--repeats must be at least 1, got 0$"):
        fields.check(BenchmarkOptions(repeats=0), OptionsError)
    with pytest.raises(OptionsError, match=r"^--batch-sizes must be at least 1, got 0$"):
        fields.check(BenchmarkOptions(batch_sizes=[8, 0]), OptionsError)
    with pytest.raises(ValueError, match=r"^--lora-dropout must be in \[0, 1\], got 1.5$"):
        peft.LoraConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"^--fact-scale must be a finite number, got inf$"):
        peft.FactConfig(scale=float("inf"))


MARKED = re.compile(r"<!-- options: ([\w.]+) -->\n(.*?)<!-- /options -->", re.S)


def test_option_tables_in_the_guides_are_the_rendered_metadata():
    for path in [ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("*/*/README.md")]:
        for dotted, table in MARKED.findall(path.read_text(encoding="utf-8")):
            module, _, name = dotted.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            prefix = getattr(cls, "PREFIX", "")
            expected = fields.options_table(cls, name=lambda n: fields.flag(f"{prefix}_{n}" if prefix else n),
                                            skip=tuple(NOT_FLAGS))
            assert table.strip() == expected.strip(), f"{path.relative_to(ROOT)}: the {name} table is out of date"
