"""Config files and overrides: ``file.py:key=value`` args, raw str overrides, and every
config check failing before any data is read."""

import dataclasses
from pathlib import Path

import pytest

from mtop_jax.config import load_config, parse_arg
from mtop_jax.errors import ConfigError
from mtop_jax.training.setup import build_weighting, check_before_data
from mtop_jax.weighting import WEIGHTINGS

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.py")


def test_parse_arg_sets_declared_options_with_their_types():
    arg = parse_arg("mode=shared,steps=7,lr=1,quick", mode="mtop", steps=1, lr=0.5,
                    quick=False, name="x")
    assert (arg.mode, arg.steps, arg.lr, arg.quick, arg.name) == ("shared", 7, 1.0, True, "x")
    assert isinstance(arg.lr, float)
    assert parse_arg("prefix", mode="mtop").mode == "prefix"  # a bare word: the first option
    assert parse_arg("mode=123", mode="mtop").mode == "123"  # str options take the raw text
    assert parse_arg(None, mode="mtop", steps=3) == parse_arg("", mode="mtop", steps=3)
    with pytest.raises(ConfigError, match="'stpes': unknown; this config takes"):
        parse_arg("stpes=3", mode="mtop", steps=1)
    with pytest.raises(ConfigError, match="'many' is not a int"):
        parse_arg("steps=many", steps=1)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_arg("shared,prefix", mode="mtop")


def test_config_file_arg_sets_fields():
    c = load_config(f"{TINY}:mode=shared,steps=5,seed=3")
    assert (c.model.mode, c.train.steps, c.train.seed) == ("shared", 5, 3)
    assert load_config(f"{TINY}:prefix").model.mode == "prefix"
    with pytest.raises(ConfigError, match=r"tiny\.py: config arg 'bogus': unknown"):
        load_config(f"{TINY}:bogus=1")
    demo = TINY.replace("tiny.py", "debian_packages.py")  # make demo's budget, and full's
    assert [load_config(f"{demo}{a}").train.steps for a in ("", ":full", ":full,steps=9",
                                                             ":shared,full")] == [250, 750, 9, 750]


def test_a_str_override_takes_the_raw_text():
    c = load_config(TINY, ["--config.tokenizer=123", "--config.train.test_split=",
                           "--config.model.mode=None"])
    assert c.tokenizer == "123" and c.train.test_split == "" and c.model.mode == "None"
    c = load_config(TINY, ["--config.train.steps=7", "--config.data.buckets=(16, 32)",
                           "--config.data.length_groups=16"])
    assert c.train.steps == 7 and c.data.buckets == (16, 32) and c.data.length_groups == 16


@pytest.mark.parametrize("override, field", [
    ("--config.model.mode=bogus", "model.mode"),
    ("--config.model.pooler=max", "model.pooler"),
    ("--config.optim.schedule=step", "optim.schedule"),
    ("--config.optim.lr_mult.encoder=2.0", None),  # an unknown field: rejected at load
    ("--config.train.stage=adapters", "train.stage"),
    ("--config.train.steps=0", "train.steps"),
    ("--config.train.task_loss=sum", "train.task_loss"),
    ("--config.weighting.method=nope", "weighting"),
    ("--config.encoder=random:huge", "config.encoder"),
    ("--config.mesh.data=3", "mesh"),
])
def test_every_config_check_runs_before_any_data_is_read(override, field, devices,
                                                          monkeypatch, tmp_path):
    """A mistake fails in ``train`` before any file of the data set is opened."""
    from mtop_jax.data import pipeline
    from mtop_jax.training.loop import train

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(pipeline, "load_examples", no_data)
    monkeypatch.setattr("mtop_jax.training.loop.build_dataset", no_data)
    if field is None:
        with pytest.raises(ConfigError, match="has no field 'encoder'"):
            load_config(TINY, [override])
        return
    config = load_config(TINY, [override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(config, tmp_path, devices=devices[:2])
    assert not (tmp_path / "checkpoints").exists()


def _other_value(default):
    """A valid value other than a field's default (None: the default, left to the class)."""
    if isinstance(default, bool) or default is None:
        return default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.5
    return default  # str: an option name; the default is the one sure to be valid


@pytest.mark.parametrize("method", sorted(WEIGHTINGS))
def test_every_weighting_option_is_set_from_the_command_line(method, devices):
    """Each field of each method is ``--config.weighting.kwargs.<field>`` and reaches it."""
    fields = [f for f in dataclasses.fields(WEIGHTINGS[method])
              if f.name not in ("num_tasks", "weights", "optimizer")]
    values = {f.name: _other_value(f.default) for f in fields}
    config = load_config(TINY, [f"--config.weighting.method={method}",
                                *(f"--config.weighting.kwargs.{k}={v!r}"
                                  for k, v in values.items())])
    assert dict(config.weighting.kwargs) == values
    check_before_data(config, devices)
    built = build_weighting(config.weighting, 3, seed=1)
    for key, value in values.items():
        assert getattr(built, key) == value, (method, key)


@pytest.mark.parametrize("method, override, field", [
    ("dwa", "temprature=1.0", "weighting.kwargs.temprature"),
    ("rlw", "sed=3", "weighting.kwargs.sed"),
    ("stch", "steps_per_epoch='10'", "weighting.kwargs.steps_per_epoch"),
    ("dbmtl", "beta='high'", "weighting.kwargs.beta"),
    ("gradvac", "beta=(0.1, 0.2)", "weighting.kwargs.beta"),
    ("nashmtl", "num_iters=2.5", "weighting.kwargs.num_iters"),
    ("gls", "mu=1.0", "weighting.kwargs.mu"),  # stch's, not gls's
])
def test_a_wrong_weighting_option_fails_the_config_check_naming_it(method, override, field,
                                                                    devices):
    config = load_config(TINY, [f"--config.weighting.method={method}",
                                f"--config.weighting.kwargs.{override}"])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_before_data(config, devices)
