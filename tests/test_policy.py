"""servo.yaml: defaults, per-model merging, and a precise error (file, key path, value) for
every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain.policy import DEFAULT_FILE, LoopConfig, Policy, PolicyError, load_config, to_json

SPEC_EXAMPLE = """\
defaults:                     # every model; any key may be overridden per model
  check_every_s: 60
  monitor_window_s: 900
  trigger:
    on: [accuracy_stall, input_drift]
    k: 3
    cooldown_s: 3600
    budget_per_day: 3
    cron: null
  retrain:
    window_s: 604800
    share: 0.5
    holdout: 0.3
    params: {}
    min_labelled: 0
    wait_s: 3600
  shadow:
    min_labelled: 200
    timeout_s: 3600
  gates:
    live_margin: 0.02
    offline_margin: 0.02
    min_gain: null
    latency_p99_ratio: 2.0
    signature: compatible
  approval:
    auto: false
    expires_s: 604800
    separation_of_duties: true
models:
  digits: {trigger: {k: 2}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / DEFAULT_FILE
    path.write_text(text, encoding="utf-8")
    return path


def test_the_documented_file_loads_and_equals_the_built_in_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SPEC_EXAMPLE))
    assert config.defaults == Policy()
    digits = config.for_model("digits")
    assert digits.trigger.k == 2 and digits.trigger.cooldown_s == 3600
    assert digits.trigger.on == ["accuracy_stall", "input_drift"]  # `on:` is not True here
    assert config.for_model("iris") == config.defaults
    assert config.models == {"digits": {"trigger": {"k": 2}}}
    assert config.source == str(tmp_path / DEFAULT_FILE)


def test_no_file_means_defaults_but_a_named_missing_file_is_an_error(tmp_path: Path) -> None:
    assert load_config(None).defaults == Policy()
    assert load_config(tmp_path / "servo.yaml", missing_ok=True).for_model("x") == Policy()
    with pytest.raises(PolicyError, match=r"nope\.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")
    assert load_config(write(tmp_path, "# only a comment\n")).defaults == Policy()


def test_merging_is_key_by_key_and_lists_are_replaced(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
defaults:
  trigger: {on: [prediction_drift], cooldown_s: 10}
  retrain: {params: {framework: sklearn, seed: 1}}
  gates: {min_gain: 0.01}
models:
  digits:
    trigger: {on: [accuracy_stall, input_drift], k: 5}
    retrain: {params: {seed: 7}}
    approval: {auto: true}
  iris: {}
""",
    )
    config = load_config(path)
    digits, iris = config.for_model("digits"), config.for_model("iris")
    assert digits.trigger.on == ["accuracy_stall", "input_drift"]
    assert (digits.trigger.k, digits.trigger.cooldown_s) == (5, 10)
    assert digits.retrain.params == {"framework": "sklearn", "seed": 7}
    assert digits.approval.auto and not iris.approval.auto
    assert iris == config.defaults and iris.trigger.on == ["prediction_drift"]
    assert digits.gates.min_gain == 0.01
    doc = to_json(digits)
    assert doc["trigger"] == {
        "on": ["accuracy_stall", "input_drift"], "k": 5, "cooldown_s": 10.0,
        "budget_per_day": 3, "cron": None,
    }  # fmt: skip
    assert Policy.model_validate(doc) == digits  # the JSON round-trips


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: {digits: {trigger: {k: 0}}}", "models.digits.trigger.k: must be >= 1 (got 0)"),
        ("models: {digits: {trigger: {kk: 1}}}", "models.digits.trigger.kk: unknown key"),
        ("defaults: {triger: {k: 1}}", "defaults.triger: unknown key"),
        ("defaultz: {}", "defaultz: unknown key (keys: defaults, models)"),
        ("defaults: {trigger: {k: 2.5}}", "defaults.trigger.k: must be an integer (got 2.5)"),
        ("defaults: {trigger: {k: '3'}}", "defaults.trigger.k: must be an integer (got '3')"),
        (
            "defaults: {trigger: {on: [input_drift, drift]}}",
            "defaults.trigger.on.1: must be one of 'accuracy_stall', 'input_drift' or "
            "'prediction_drift' (got 'drift')",
        ),
        (
            "defaults: {trigger: {on: [input_drift, input_drift]}}",
            "defaults.trigger.on: lists a signal twice",
        ),
        ("defaults: {trigger: {on: input_drift}}", "defaults.trigger.on: must be a list"),
        (
            "defaults: {trigger: {cron: '61 * * * *'}}",
            "defaults.trigger.cron: not a crontab schedule 'm h dom mon dow'",
        ),
        ("defaults: {trigger: {cron: '* *'}}", "got 2, expected 5"),
        ("defaults: {retrain: {share: 1.5}}", "defaults.retrain.share: must be <= 1 (got 1.5)"),
        ("defaults: {retrain: {holdout: 1}}", "defaults.retrain.holdout: must be < 1 (got 1)"),
        (
            "defaults: {retrain: {min_labelled: -1}}",
            "defaults.retrain.min_labelled: must be >= 0 (got -1)",
        ),
        ("defaults: {retrain: {wait_s: 0}}", "defaults.retrain.wait_s: must be > 0 (got 0)"),
        ("defaults: {check_every_s: 0}", "defaults.check_every_s: must be > 0 (got 0)"),
        ("defaults: {check_every_s: .inf}", "defaults.check_every_s: must be a finite number"),
        ("defaults: {check_every_s: fast}", "defaults.check_every_s: must be a number"),
        ("defaults: {shadow: {min_labelled: -1}}", "defaults.shadow.min_labelled: must be >= 1"),
        ("defaults: {gates: {signature: loose}}", "defaults.gates.signature: must be one of"),
        ("defaults: {gates: {min_gain: 0}}", "defaults.gates.min_gain: must be > 0 (got 0)"),
        ("defaults: {approval: {auto: yes}}", "defaults.approval.auto: must be true or false"),
        ("defaults: {approval: {auto: 1}}", "defaults.approval.auto: must be true or false"),
        ("models: {digits: {trigger: 3}}", "models.digits.trigger: must be a mapping (got 3)"),
        ("models: {digits: 3}", "models.digits: must be a mapping (got 3)"),
        ("models: [digits]", "models: must be a mapping (got ['digits'])"),
        ("models: {'../x': {}}", "models.'../x': not a model name"),
        ("- 1", "must be a mapping with 'defaults' and 'models'"),
        ("defaults: {k: [1", "not valid YAML (line 2, column 1: expected ',' or ']'"),
        (
            "defaults: {}\ndefaults: {}\n",
            "not valid YAML (line 2, column 1: key 'defaults' appears",
        ),
        (
            "models: {digits: {retrain: {params: {at: 2026-01-01}}}}",
            "models.digits.retrain.params.at: ",
        ),
    ],
)
def test_bad_input_names_the_file_the_key_path_and_the_value(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(PolicyError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: "), caught.value
    assert message in str(caught.value), caught.value


def test_a_bad_value_in_defaults_is_reported_under_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "defaults: {trigger: {k: 0}}\nmodels: {digits: {}}\n")
    with pytest.raises(PolicyError, match=r": defaults\.trigger\.k: must be >= 1 \(got 0\)"):
        load_config(path)


def test_unreadable_files(tmp_path: Path) -> None:
    binary = tmp_path / "servo.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PolicyError, match="cannot read"):
        load_config(binary)
    with pytest.raises(PolicyError, match="cannot read"):
        load_config(tmp_path)  # a folder


def test_the_loop_config_of_nothing_is_the_defaults() -> None:
    config = LoopConfig()
    assert config.for_model("anything") == Policy() and config.source is None
