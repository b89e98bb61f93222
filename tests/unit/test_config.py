"""train.config: recipes, overrides, validation messages, frozen sections, derive(), round trip."""

import argparse
import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from partial_fc.config import PartialFCConfig
from train import config as C

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_CLASSES = {
    "cpu_demo": None,
    "ms1mv3_r50": 93431,
    "ms1mv3_r100": 93431,
    "ms1mv2_r100": 85742,
    "glint360k_r100": 360232,
    "webface42m_r100": 2059906,
    "webface42m_vit_b": 2059906,
}


def write(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- recipes


def test_recipe_list_is_complete():
    assert set(C.list_recipes()) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_every_recipe_loads_validates_and_uses_s6(name):
    cfg = C.load_config(name)
    assert isinstance(cfg, C.TrainConfig)
    assert cfg.head.num_classes == EXPECTED_CLASSES[name]
    assert cfg.head.method == "s6"
    assert cfg.backbone.num_features == cfg.head.embedding_size
    # The backbone is looked up only when the model is built: every shipped recipe must name one
    # that exists (the GPU recipes once said "iresnet50", which the registry does not know).
    from partial_fc.backbones import list_backbones

    assert cfg.backbone.name in list_backbones()
    assert cfg.run.name == name
    text = (C.RECIPES_DIR / f"{name}.toml").read_text()
    assert "--set head.method=arcface" in text.split("\n\n")[0]  # the baseline, in the top comment
    baseline = C.load_config(name, ["head.method=arcface"])
    assert baseline.head.method == "arcface"
    assert not baseline.resolve(baseline.head.num_classes or 100).head.needs_bank
    assert dataclasses.replace(baseline, head=cfg.head) == cfg  # nothing else changes


def test_recipe_specifics():
    demo = C.load_config(None)
    assert demo == C.load_config("cpu_demo") == C.load_config(C.RECIPES_DIR / "cpu_demo.toml")
    assert demo.run.device == "cpu" and demo.precision.dtype == "fp32"
    assert demo.data.kind == "dali" and demo.data.dali_decode == "cpu" and demo.data.batch_size == 32
    assert demo.head.s == 32.0 and demo.backbone.name == "iresnet_nano"
    assert demo.data.train_rec == demo.data.synth.train_rec
    assert demo.evaluation.bin_files == (demo.data.synth.verification_bin,)
    wf = C.load_config("webface42m_r100")
    assert wf.head.sample_rate == 0.2 and wf.precision.dtype == "bf16"
    vit = C.load_config("webface42m_vit_b")
    assert (vit.optimizer.name, vit.optimizer.lr, vit.optimizer.weight_decay) == ("adamw", 1e-3, 0.1)
    assert vit.schedule.decay == "cosine" and vit.head.sample_rate == 0.3
    r100 = C.load_config("ms1mv3_r100")
    assert (r100.optimizer.lr, r100.schedule.decay, r100.data.batch_size) == (0.1, "poly", 128)


def test_missing_recipe_suggests(tmp_path):
    with pytest.raises(C.ConfigError, match="did you mean 'cpu_demo'"):
        C.load_config("cpu_dem")
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(tmp_path / "nope.toml")


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[run\nname = 1")
    with pytest.raises(C.ConfigError, match="recipe.toml: invalid TOML"):
        C.load_config(path)


# ----------------------------------------------------------------------------- overrides


def test_overrides_of_each_type():
    cfg = C.load_config("cpu_demo", [
        "data.batch_size=16",                 # int
        "optimizer.lr=1e-3",                  # float
        "optimizer.weight_decay=0",           # int -> float
        "data.flip=false",                    # bool
        "evaluation.far_targets=[1e-3, 1e-4]",  # list -> tuple
        "run.name=\"quoted name\"",           # quoted string
        "run.device=auto",                    # bare string
        "optimizer.head_lr=0.5",              # optional float
        "precision.loss_scale=1024",          # union: number
        "data.synth.identities=50",           # nested key
        "head.sample_rate=0.25",              # head key
        "head.phi_percentiles=[5, 95]",       # head tuple, ints -> floats
        "run.max_steps=7",
    ])
    assert cfg.data.batch_size == 16
    assert cfg.optimizer.lr == 1e-3
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.data.flip is False
    assert cfg.evaluation.far_targets == (1e-3, 1e-4)
    assert cfg.run.name == "quoted name"
    assert cfg.run.device == "auto"
    assert cfg.optimizer.head_lr == 0.5 and cfg.optimizer.effective_head_lr == 0.5
    assert cfg.precision.loss_scale == 1024.0
    assert cfg.data.synth.identities == 50
    assert cfg.head.sample_rate == 0.25
    assert cfg.head.phi_percentiles == (5.0, 95.0)
    assert cfg.run.max_steps == 7


def test_override_edge_values():
    cfg = C.load_config("cpu_demo", ["run.name=2024", "optimizer.head_lr=0.5", "optimizer.head_lr=none",
                                     "data.batch_size = 8"])
    assert cfg.run.name == "2024"  # a string field keeps the text
    assert cfg.optimizer.head_lr is None  # later overrides win; none unsets an optional key
    assert cfg.data.batch_size == 8
    assert C.load_config("cpu_demo", ["head.num_classes=77"]).head.num_classes == 77
    assert C.load_config("ms1mv3_r50", ["head.num_classes=0"]).is_resolved is False


@pytest.mark.parametrize("override, message", [
    ("head.sample_rat=0.1", "unknown key 'head.sample_rat' (did you mean 'head.sample_rate'?)"),
    ("optimiser.lr=0.1", "unknown section 'optimiser' (did you mean 'optimizer'?)"),
    ("data.batch=4", "did you mean 'data.batch_size'"),
    ("run.batch_size=4", "did you mean 'data.batch_size'"),  # right key, wrong section
    ("data.synth.identity=4", "did you mean 'data.synth.identities'"),
    ("data.synth=4", "'data.synth' is a section"),
    ("run=4", "'run' is a section"),
    ("run.seed.x=1", "'run.seed' is a key, not a section"),
    ("data.batch_size", "must look like section.key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(C.ConfigError) as info:
        C.load_config("cpu_demo", [override])
    assert message in str(info.value)


def test_unknown_section_and_key_in_file(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown section 'optimiser' \(did you mean 'optimizer'\?\)"):
        C.load_config(write(tmp_path, "[optimiser]\nlr = 0.1\n"))
    with pytest.raises(C.ConfigError, match=r"recipe.toml: unknown key 'run.epoch' \(did you mean 'run.epochs'\?\)"):
        C.load_config(write(tmp_path, "[run]\nepoch = 3\n"))
    with pytest.raises(C.ConfigError, match="unknown key 'data.synth.seeds'"):
        C.load_config(write(tmp_path, "[data.synth]\nseeds = 3\n"))
    with pytest.raises(C.ConfigError, match="'run' must be a table"):
        C.load_config(write(tmp_path, "run = 3\n"))


def test_head_unknown_and_invalid_keys_use_partialfc_validation(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown key 'head.sample_rat' \(did you mean 'head.sample_rate'\?\)"):
        C.load_config(write(tmp_path, "[head]\nsample_rat = 0.1\n"))
    # value checks come from PartialFCConfig.__post_init__ itself
    with pytest.raises(C.ConfigError, match="did you mean 'arcface'"):
        C.load_config("cpu_demo", ["head.method=arcfce"])
    with pytest.raises(C.ConfigError, match=r"sample_rate must be in \(0, 1\]"):
        C.load_config("ms1mv3_r50", ["head.sample_rate=1.5"])  # resolved head
    with pytest.raises(C.ConfigError, match="m_min"):
        C.load_config("cpu_demo", ["head.m_min=0.7", "head.m_max=0.5"])  # pending head
    with pytest.raises(C.ConfigError, match="num_classes and embedding_size must be positive"):
        C.load_config("cpu_demo", ["head.num_classes=-3"])
    with pytest.raises(TypeError, match="sample_rat"):
        C.HeadSection(sample_rat=0.1)


# ----------------------------------------------------------------------------- types and values


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=\"64\"", "data.batch_size must be int, got str '64'"),
    ("data.batch_size=1.5", "data.batch_size must be int, got float 1.5"),
    ("data.batch_size=true", "data.batch_size must be int, got bool True"),
    ("data.flip=1", "data.flip must be bool, got int 1"),
    ("run.device=3", None),  # str field: the text "3" is kept, then the enum check fails
    ("optimizer.lr=fast", "optimizer.lr must be float, got str 'fast'"),
    ("optimizer.betas=[0.9]", "optimizer.betas must be a list of 2 floats, got 1 values"),
    ("evaluation.far_targets=[\"x\"]", "evaluation.far_targets[0] must be float"),
    ("head.s=\"big\"", "head.s must be float, got str 'big'"),
    ("run.max_steps=none", None),  # fine: optional
])
def test_type_errors(override, message):
    if message is None:
        if override.startswith("run.device"):
            with pytest.raises(C.ConfigError, match="run.device must be one of"):
                C.load_config("cpu_demo", [override])
        else:
            assert C.load_config("cpu_demo", [override]).run.max_steps is None
        return
    with pytest.raises(C.ConfigError) as info:
        C.load_config("cpu_demo", [override])
    assert message in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("run.device=gpu", "run.device must be one of 'auto', 'cpu', 'cuda', got 'gpu'"),
    ("distributed.engine=deepspeedd", "did you mean 'deepspeed'"),
    ("distributed.zero_stage=3", "distributed.zero_stage must be 0, 1 or 2"),
    ("distributed.zero_stage=2", "needs distributed.engine = \"deepspeed\""),
    ("data.kind=lmdb", "data.kind must be one of 'dali', 'torch', 'synthetic'"),
    ("data.kind=synthetic", "is ignored by data.kind = \"synthetic\""),
    ("data.train_rec=data/x.lst", "must name a .rec file"),
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("backbone.dropout=1.0", "backbone.dropout must be in [0, 1)"),
    ("backbone.num_features=256", "backbone.num_features (256) must equal head.embedding_size (128)"),
    ("optimizer.name=adam", "did you mean 'adamw'"),
    ("optimizer.lr=0", "optimizer.lr must be > 0.0"),
    ("optimizer.grad_accumulation=0", "optimizer.grad_accumulation must be >= 1"),
    ("schedule.warmup_epochs=1", "keep one and set the other to 0"),
    ("schedule.decay=step", "schedule.decay must be one of 'poly', 'cosine', 'constant'"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio must be in [0, 1]"),
    ("precision.dtype=fp8", "precision.dtype must be one of"),
    ("precision.dtype=fp16", "fp16\" needs CUDA"),
    ("precision.loss_scale=static", "must be \"dynamic\" or a positive number"),
    ("precision.loss_scale=-1", "must be \"dynamic\" or a positive number"),
    ("distributed.backend=nccl", "needs CUDA but run.device = \"cpu\""),
    ("evaluation.bin_files=[]", "evaluation.bin_files is empty"),
    ("evaluation.far_targets=[0.0]", "must all be in (0, 1)"),
    ("metrics.port=70000", "metrics.port must be in [0, 65535]"),
    ("export.output_name=model.pt", "must end in .onnx"),
    ("run.name=a/b", "run.name must be a non-empty directory name"),
])
def test_value_validation_messages(override, message):
    with pytest.raises(C.ConfigError) as info:
        C.load_config("cpu_demo", [override])
    assert message in str(info.value)
    assert "--set " + override in str(info.value)  # the message names the override


def test_direct_construction_validates_and_normalises():
    with pytest.raises(C.ConfigError, match="data.batch_size must be int"):
        C.DataConfig(batch_size="8")
    opt = C.OptimizerConfig(lr=1, betas=[0.9, 0.95])
    assert isinstance(opt.lr, float) and opt.betas == (0.9, 0.95)
    assert C.TrainConfig().data.kind == "synthetic"  # the defaults alone form a valid config


# ----------------------------------------------------------------------------- frozen


def test_sections_are_frozen():
    cfg = C.load_config("ms1mv3_r50")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = C.RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.batch_size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.synth.identities = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.head.sample_rate = 0.5
    pending = C.load_config("cpu_demo").head
    with pytest.raises(dataclasses.FrozenInstanceError):
        pending.embedding_size = 64
    assert isinstance(cfg.evaluation.bin_files, tuple) and hash(cfg) is not None


# ----------------------------------------------------------------------------- num_classes


def test_num_classes_resolution_from_dataset():
    cfg = C.load_config("cpu_demo")
    assert not cfg.is_resolved and cfg.head.num_classes is None
    assert cfg.head.embedding_size == 128 and cfg.head.method == "s6"  # options read through
    resolved = cfg.resolve(100)
    assert resolved.is_resolved and isinstance(resolved.head, PartialFCConfig)
    assert resolved.head.num_classes == 100 and resolved.head.s == 32.0 and resolved.head.sample_rate == 0.5
    assert cfg.head.num_classes is None  # the original is untouched
    assert dataclasses.replace(resolved, head=cfg.head) == cfg
    assert resolved.resolve(100) is resolved  # already resolved and consistent
    with pytest.raises(C.ConfigError, match="head.num_classes = 100 but the dataset has 99"):
        resolved.resolve(99)
    with pytest.raises(C.ConfigError, match="positive int"):
        cfg.resolve(0)
    # a head section compares by value: the same options however they were given
    assert C.HeadSection(s=32) == C.HeadSection(s=32.0, method="arcface")
    assert C.head_config(cfg.head, 100) == resolved.head  # the explicit conversion resolve() uses
    with pytest.raises(AttributeError):
        cfg.head.not_an_option  # noqa: B018
    with pytest.raises(C.ConfigError, match="head.num_classes is set"):
        C.HeadSection(num_classes=5)


def test_head_section_mirrors_partialfcconfig():
    """HeadSection spells out PartialFCConfig's fields: same names, order and defaults."""
    ours = [(f.name, f.default) for f in dataclasses.fields(C.HeadSection)]
    theirs = [(f.name, f.default) for f in dataclasses.fields(PartialFCConfig)]
    assert ours[1:] == theirs[1:] and ours[0] == ("num_classes", None)


# ----------------------------------------------------------------------------- derive


def test_derive_even_and_uneven_tail():
    pin = ["run.epochs=3", "schedule.warmup_steps=10"]  # independent of the recipe's tuning
    cfg = C.load_config("cpu_demo", pin)  # 32 per rank, 3 epochs
    d = C.derive(cfg, world_size=2, num_samples=2000)
    assert (d.global_batch, d.steps_per_epoch, d.samples_per_epoch) == (64, 31, 1984)
    assert (d.total_steps, d.total_micro_steps, d.warmup_steps, d.epochs) == (93, 93, 10, 3.0)
    assert (d.device, d.backend) == ("cpu", "gloo")
    keep = C.derive(C.load_config("cpu_demo", pin + ["data.drop_last=false"]), 2, 2000)
    assert (keep.steps_per_epoch, keep.samples_per_epoch, keep.total_steps) == (32, 2000, 96)
    exact = C.derive(cfg, 2, 1984)
    assert exact.steps_per_epoch == 31 and exact.samples_per_epoch == 1984
    with pytest.raises(C.ConfigError, match="smaller than one global batch"):
        C.derive(cfg, 4, 100)
    assert C.derive(C.load_config("cpu_demo", ["data.drop_last=false"]), 4, 100).steps_per_epoch == 1


def test_derive_grad_accumulation_max_steps_and_warmup_epochs():
    cfg = C.load_config("cpu_demo", ["run.epochs=3", "optimizer.grad_accumulation=4", "schedule.warmup_steps=0",
                                     "schedule.warmup_epochs=2"])
    d = C.derive(cfg, 2, 2000)  # 31 micro-steps per epoch, 3 epochs = 93 -> 23 optimizer steps
    assert (d.total_steps, d.total_micro_steps) == (23, 92)
    assert d.warmup_steps == round(2 * 31 / 4) == 16
    assert d.epochs == pytest.approx(92 / 31)
    capped = C.derive(C.load_config("cpu_demo", ["run.max_steps=5", "optimizer.grad_accumulation=2"]), 2, 2000)
    assert (capped.total_steps, capped.total_micro_steps, capped.warmup_steps) == (5, 10, 5)  # warm-up capped
    vit = C.load_config("webface42m_vit_b")
    dv = C.derive(vit, 64, 42474557, cuda_available=True)
    assert dv.global_batch == 16384 and dv.steps_per_epoch == 42474557 // 16384
    assert dv.total_steps == 40 * dv.steps_per_epoch and dv.warmup_steps == 4 * dv.steps_per_epoch
    assert (dv.device, dv.backend, dv.head_lr, dv.head_weight_decay) == ("cuda", "nccl", 1e-3, 0.1)
    with pytest.raises(C.ConfigError, match="no optimizer step"):
        C.derive(C.load_config("cpu_demo", ["run.epochs=1", "optimizer.grad_accumulation=64"]), 2, 2000)
    with pytest.raises(C.ConfigError, match="world_size must be a positive int"):
        C.derive(cfg, 0, 10)


def test_derived_values_never_enter_the_config():
    cfg = C.load_config("cpu_demo")
    before = C.dump_toml(cfg)
    C.derive(cfg, 2, 2000)
    assert C.dump_toml(cfg) == before
    names = set(C.config_to_dict(cfg)["data"]) | set(C.config_to_dict(cfg)["run"])
    assert not names & {"global_batch", "steps_per_epoch", "total_steps", "world_size"}


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_dump_load_round_trip(tmp_path, name):
    cfg = C.load_config(name)
    path = C.write_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.toml"
    assert C.load_config(path) == cfg
    resolved = cfg.resolve(cfg.head.num_classes or 100)
    assert C.load_config(C.write_resolved(resolved, tmp_path / "run2")) == resolved
    assert C.config_from_dict(C.config_to_dict(cfg)) == cfg


def test_round_trip_of_awkward_values(tmp_path):
    cfg = C.load_config("cpu_demo", [
        'checkpoint.resume="tab\\tquote\\"back\\\\slash é.pt"', "optimizer.head_lr=1e-20", "precision.loss_scale=128",
        "head.m=0.35", "head.track_clusters=true", "evaluation.far_targets=[1e-6]", "optimizer.lr=3.0e+2",
    ])
    assert cfg.checkpoint.resume == 'tab\tquote"back\\slash é.pt'
    text = C.dump_toml(cfg)
    assert C.config_from_dict(tomllib.loads(text)) == cfg
    # None values are left out of the TOML and come back as None
    assert "head_lr" not in C.dump_toml(C.load_config("cpu_demo"))


def test_write_resolved_with_derived(tmp_path):
    cfg = C.load_config("cpu_demo", ["run.epochs=3"]).resolve(100)
    d = C.derive(cfg, 2, 2000)
    C.write_resolved(cfg, tmp_path, derived=d)
    derived = tomllib.loads((tmp_path / "derived.toml").read_text())["derived"]
    assert derived["total_steps"] == 93 and derived["world_size"] == 2
    assert C.load_config(tmp_path / "config.toml") == cfg  # derived.toml is not part of it


# ----------------------------------------------------------------------------- argparse, imports


def test_argparse_helpers():
    parser = C.add_config_args(argparse.ArgumentParser())
    ns = parser.parse_args(["-c", "ms1mv3_r50", "--set", "data.batch_size=64", "--set", "head.method=arcface"])
    cfg = C.config_from_args(ns)
    assert cfg.data.batch_size == 64 and cfg.head.method == "arcface" and cfg.run.name == "ms1mv3_r50"
    assert C.config_from_args(parser.parse_args([])) == C.load_config(None)


def test_docs_config_md_is_generated():
    """docs/config.md is the generator's output: regenerate with `python -m train.config.docs > docs/config.md`."""
    from train.config import docs

    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == docs.render(), \
        "docs/config.md is stale: run `python -m train.config.docs > docs/config.md`"


def test_docs_generator_needs_a_docstring_entry_per_key():
    from train.config import docs

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        """The ``[x]`` section.

        Attributes:
            a: Documented.
        """

        a: int = 1
        b: int = 2

    with pytest.raises(ValueError, match="Undocumented.b has no entry"):
        docs.section_markdown("x", Undocumented)


def test_every_key_is_documented():
    doc = (ROOT / "docs" / "config.md").read_text()
    for key in C._all_keys():
        section, _, name = key.rpartition(".")
        assert f"`{name}`" in doc, key
    for name in C.list_recipes():
        assert f"`{name}`" in doc, name


def test_import_has_no_side_effects(tmp_path):
    code = "import os, train.config as c; print(sorted(os.listdir('.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # nothing written


@pytest.mark.parametrize("override", [
    "optimizer.lr=nan", "optimizer.grad_clip=nan", "optimizer.weight_decay=inf", "optimizer.head_lr=nan",
    "head.s=inf", "head.m=nan", "head.tau=-inf", "optimizer.betas=[0.9, nan]", "schedule.min_lr_ratio=-inf",
    "evaluation.far_targets=[nan]",
])
def test_nan_and_inf_are_refused_for_floats(override, tmp_path):
    """NaN passed every `x <= 0` bound check (a NaN grad_clip silently disabled clipping)."""
    key = override.split("=")[0]
    with pytest.raises(C.ConfigError, match=rf"{key.replace('.', '[.]')}(\[\d\])? must be a finite number"):
        C.load_config("cpu_demo", [override])
    # The same from a recipe file (TOML's own nan/inf literals).
    section, name = key.rsplit(".", 1)
    value = override.split("=", 1)[1]
    path = write(tmp_path, f'[{section}]\n{name} = {value}\n')
    with pytest.raises(C.ConfigError, match="must be a finite number"):
        C.load_config(str(path))
