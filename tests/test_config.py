"""The typed settings: one source for the CLI options, the YAML schema, configs/default.yaml and
the library defaults; `featx config` shows each value's source."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from featx.base.errors import FeatxError
from featx.cli import cli
from featx.config import (
    DEFAULT_GRIDS,
    SETTINGS,
    CompareSettings,
    EmbedSettings,
    convert_value,
    default_values,
    defaults,
    explain,
    field_types,
    load_config,
    read_config,
    render_yaml,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXAMPLES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "default.yaml")
COMMANDS = [name for name in SETTINGS if name in cli.commands]


@pytest.fixture
def runner():
    return CliRunner()


# --------------------------------------------------------------------------- one source


def test_default_yaml_is_the_rendering_of_the_typed_defaults(runner):
    text = (CONFIGS / "default.yaml").read_text(encoding="utf-8")
    assert text == render_yaml(default_values()), "regenerate it: featx config --yaml > configs/default.yaml"
    assert yaml.safe_load(text) == default_values() == {k: v for k, v in load_config().items()}
    r = runner.invoke(cli, ["config", "--yaml"])
    assert r.exit_code == 0 and r.output == text


@pytest.mark.parametrize("name", COMMANDS)
def test_click_options_are_the_dataclass_fields(name):
    cls = SETTINGS[name]
    options = {p.name: p for p in cli.commands[name].params if isinstance(p, click.Option)}
    options.pop("help", None)
    assert list(options) == [f.name for f in dataclasses.fields(cls)]
    inst = cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("required"):  # no default, so click reports it missing (not None)
            assert options[f.name].required, f.name
        else:
            assert options[f.name].default == getattr(inst, f.name), f.name
        assert (options[f.name].help or "") == f.metadata["help"], f.name


@pytest.mark.parametrize("args, missing", [(["predict", "x.png"], "--head"), (["export"], "--out")])
def test_missing_required_option_is_a_usage_error(args, missing):
    from click.testing import CliRunner

    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and f"Missing option '{missing}'" in res.output


def _library_functions():
    from featx.embedding.runner import embed
    from featx.runs.compare import compare
    from featx.runs.fewshot import fewshot
    from featx.runs.predict import predict
    from featx.runs.probe import probe

    return {"embed": embed, "probe": probe, "compare": compare, "predict": predict, "fewshot": fewshot}


@pytest.mark.parametrize("name", ["embed", "probe", "compare", "predict", "fewshot"])
def test_library_calls_take_the_same_defaults(name):
    fn = _library_functions()[name]
    params = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    kwargs = defaults(name).library_kwargs()
    if "settings" in params:  # fn(..., *, settings=XSettings, **overrides): the command's own dataclass holds the defaults
        settings_cls = inspect.signature(fn).parameters["settings"].annotation
        settings_cls = getattr(importlib.import_module(fn.__module__), settings_cls.split(" ")[0])
        assert settings_cls is SETTINGS[name], f"{name}() takes {settings_cls.__name__}, not the command's settings"
        # every keyword the command passes is one the call accepts, and it starts from the same default
        resolved, _ = settings_cls.with_overrides(None, kwargs, call=name, extras={})
        assert resolved == defaults(name)
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            settings_cls.with_overrides(None, {"no_such_option": 1}, call=name)
        return
    assert set(kwargs) <= set(params), f"{name}() lacks keywords {set(kwargs) - set(params)}"
    for key, value in kwargs.items():
        assert params[key] == value, f"{name}({key}=...) default {params[key]!r} != {value!r}"


def test_finetune_defaults_are_compare_defaults():
    from featx.finetune.settings import FinetuneSettings, RunOptions

    fields = {f.name: f.default for cls in (FinetuneSettings, RunOptions) for f in dataclasses.fields(cls)}
    shared = defaults("compare").library_kwargs()
    checked = [k for k in fields if k in shared and k not in ("strategy", "out_dir", "overwrite")]
    assert len(checked) >= 12
    for key in checked:
        assert fields[key] == shared[key], key


def test_grids_have_one_definition():
    from featx.heads.tuning import grids

    assert grids.DEFAULT_GRIDS == DEFAULT_GRIDS == defaults("heads").grids()
    assert grids.resolve_grids()["scoring"] == defaults("heads").scoring


def test_defaults_are_fresh_and_named():
    a, b = defaults("heads"), defaults("heads")
    a.knn["n_neighbors"].append(99)
    assert 99 not in b.knn["n_neighbors"] and 99 not in DEFAULT_GRIDS["knn"]["n_neighbors"]
    assert defaults("compare").epochs == CompareSettings().epochs == 10
    assert EmbedSettings(batch_size=8).to_dict()["batch_size"] == 8
    with pytest.raises(KeyError, match="known: embed"):
        defaults("finetuning")


# --------------------------------------------------------------------------- the schema


@pytest.mark.parametrize("value, field, expected", [
    (3, "batch_size", 3), (None, "workers", None), (2, "workers", 2), ("float16", "dtype", "float16"),
    (True, "strict", True),
])
def test_convert_accepts(value, field, expected):
    out = convert_value(value, field_types(EmbedSettings)[field])
    assert out == expected and type(out) is type(expected)
    assert type(convert_value(3, field_types(CompareSettings)["lr"])) is float


@pytest.mark.parametrize("text, needle", [
    ("embed:\n  batch_size: 8.5\n", "embed.batch_size: 8.5 is not a valid integer"),
    ("embed:\n  batch_size: true\n", "embed.batch_size: True is not a valid integer"),
    ("embed:\n  batch_size: null\n", "embed.batch_size: null is not a valid integer"),
    ("embed:\n  backbone: 18\n", "embed.backbone: 18 is not a valid string"),
    ("probe:\n  kernel: poly\n", "probe.kernel: 'poly' is not one of 'linear', 'rbf'"),
    ("compare:\n  finetune: 1\n", "compare.finetune: 1 is not a valid boolean"),
    ("compare:\n  epoch: 3\n", "unknown key compare.epoch (did you mean 'epochs'?)"),
    ("heads:\n  max_iter: lots\n", "heads.max_iter"),
    ("heads:\n  svm: [1, 2]\n", "heads.svm"),
])
def test_wrong_types_are_one_line_errors(tmp_path, runner, text, needle):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(text)
    with pytest.raises(FeatxError, match="my.yaml") as info:
        read_config(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)
    r = runner.invoke(cli, ["--config", str(cfg), "config"])
    assert r.exit_code == 2 and r.output.startswith("error: config ") and needle in r.output


def test_file_values_are_converted_and_per_run_keys_still_accepted(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("compare:\n  lr: 1\n  quiet: true\nheads:\n  knn:\n    n_neighbors: [3]\n")
    got = read_config(cfg)
    assert got["compare"] == {"lr": 1.0, "quiet": True} and type(got["compare"]["lr"]) is float
    merged = load_config(cfg)
    assert merged["heads"]["knn"] == {**DEFAULT_GRIDS["knn"], "n_neighbors": [3]}
    assert merged["compare"]["epochs"] == 10 and merged["_source"] == {"path": str(cfg)}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid_and_change_something(example, runner):
    sections = read_config(example)
    assert {"embed", "probe", "compare"} <= set(sections)
    r = runner.invoke(cli, ["--config", str(example), "config", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["settings"]
    from_file = {row["key"] for row in rows if row["source"] == f"file {example}"}
    assert {f"embed.{k}" for k in sections["embed"]} <= from_file
    assert from_file  # every key the file sets is reported as coming from it


# --------------------------------------------------------------------------- featx config


def test_featx_config_reports_each_source(tmp_path, runner):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("probe:\n  folds: 3\nheads:\n  svm:\n    C: [0.5]\n")
    r = runner.invoke(cli, ["--config", str(cfg), "config", "--json", "probe", "--head", "knn", "--seed", "4"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    got = {row["key"]: (row["value"], row["source"]) for row in out["settings"]}
    assert out["config_file"] == str(cfg)
    assert got["probe.head"] == ("knn", "command line") and got["probe.seed"] == (4, "command line")
    assert got["probe.folds"] == (3, f"file {cfg}") and got["heads.svm.C"] == ([0.5], f"file {cfg}")
    assert got["probe.kernel"] == ("linear", "default") and got["heads.logreg.C"][1] == "default"
    assert not any(k.startswith("embed.") for k in got)
    r = runner.invoke(cli, ["--config", str(cfg), "config", "probe", "-q"])
    assert r.exit_code == 0
    lines = {line.split()[0]: line for line in r.output.splitlines()[2:]}
    assert lines["probe.folds"].endswith(f"file {cfg}") and lines["probe.quiet"].endswith("command line")
    assert lines["probe.head"].split()[1:] == ["svm", "default"]


def test_featx_config_yaml_round_trips(tmp_path, runner):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("compare:\n  epochs: 4\n")
    r = runner.invoke(cli, ["--config", str(cfg), "config", "--yaml", "compare", "--finetune", "--lr", "0.01"])
    assert r.exit_code == 0, r.output
    again = tmp_path / "again.yaml"
    again.write_text(r.output)
    values = read_config(again)
    assert set(values) == {"compare", "heads"}
    assert values["compare"] == {**default_values()["compare"], "epochs": 4, "finetune": True, "lr": 0.01}
    assert values["heads"] == default_values()["heads"]


def test_featx_config_refuses_what_the_command_would(runner):
    r = runner.invoke(cli, ["config", "probe", "--hed", "knn"])
    assert r.exit_code == 2 and "No such option" in r.output and "--head" in r.output
    r = runner.invoke(cli, ["config", "probe", "--folds", "many"])
    assert r.exit_code == 2 and "--folds" in r.output
    r = runner.invoke(cli, ["config", "heads", "--svm"])
    assert r.exit_code == 2 and "takes no options" in r.output
    r = runner.invoke(cli, ["config", "probes"])
    assert r.exit_code == 2 and "probe" in r.output


def test_explain_without_a_file_is_all_defaults():
    entries = explain()
    assert {e.section for e in entries} == set(SETTINGS)
    assert {e.source for e in entries} == {"default"}
    assert not [e for e in entries if e.key == ("as_json",)]  # terminal switches only when given


# --------------------------------------------------------------------------- the CLI


def test_compare_kernel_is_checked_before_any_work(runner, tmp_path, image_folder):
    r = runner.invoke(cli, ["compare", str(image_folder), "--kernel", "poly", "--cache-dir", str(tmp_path / "c"),
                            "--backbone", "tiny_cnn", "--weights", "random", "-q"])
    assert r.exit_code == 2 and "--kernel" in r.output and "linear" in r.output
    assert not (tmp_path / "c").exists()


def _run_featx(args: list[str], pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-m", "featx.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_help_does_not_import_torch_or_sklearn(tmp_path):
    code = ("import sys; from featx.cli import main\n"
            "try:\n    main(['probe', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'sklearn', 'h5py') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_the_package_alone_has_the_defaults(tmp_path):
    # As an installed wheel: only the featx package, no checkout (no configs/) around it.
    site = tmp_path / "site"
    shutil.copytree(REPO / "featx", site / "featx", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    installed = _run_featx(["config", "--json"], site, work)
    checkout = _run_featx(["config", "--json"], REPO, work)
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout) == json.loads(checkout.stdout)
    assert installed.stdout.count('"source": "default"') == len(json.loads(installed.stdout)["settings"]) > 50
    # The library side too (the grids once came from configs/default.yaml, absent from a wheel).
    code = "import json; from featx.config import load_config; print(json.dumps(load_config()))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == yaml.safe_load((CONFIGS / "default.yaml").read_text())


def test_new_style_optional_fields_work_like_optional():
    hint = int | None
    assert convert_value(None, hint) is None and convert_value(3, hint) == 3
    with pytest.raises(ValueError, match="not a valid integer"):
        convert_value("x", hint)
