"""The loop's policy file (`servo.yaml`): when to check, when to retrain, how long to
shadow a candidate, the gates it must pass and who approves it, per model.

```yaml
defaults:            # every model; any key may be overridden per model
  check_every_s: 60
  trigger: {on: [accuracy_stall, input_drift], k: 3, cooldown_s: 3600, budget_per_day: 3}
models:
  digits: {trigger: {k: 2}}
```

An approved candidate rolls out as a canary (`rollout`, see `Rollout`): a share of the
traffic at each of `steps`, judged every `look_every_s` by `retrain.judge`.

A model's policy is the built-in defaults, then the file's `defaults`, then its entry under
`models`, merged key by key (nested mappings too, `retrain.params` included; a list, such as
`trigger.on`, is replaced whole). Everything is validated when the file is loaded: an
unknown key, a value of the wrong type or out of range is refused with the file, the key
path and the value (`servo.yaml: models.digits.trigger.k: must be >= 1 (got 0)`).
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

Signal = Literal["accuracy_stall", "input_drift", "prediction_drift"]
DEFAULT_FILE = "servo.yaml"
_DEFAULT_ON: list[Signal] = ["accuracy_stall", "input_drift"]
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file, key path and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Trigger(_Section):
    #: the monitor signals that count as an alarmed check
    on: list[Signal] = Field(default_factory=_DEFAULT_ON.copy)
    #: consecutive alarmed checks before a retrain (debounce)
    k: int = Field(3, ge=1)
    #: seconds after a retrain started during which no other starts
    cooldown_s: float = Field(3600.0, ge=0)
    #: retrains started per rolling 24 h
    budget_per_day: int = Field(3, ge=0)
    #: an optional crontab schedule ("m h dom mon dow") of retrains
    cron: str | None = None

    @field_validator("on")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a signal twice")
        return value

    @field_validator("cron")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"not a crontab schedule 'm h dom mon dow' ({exc})") from None
        return value


class Retrain(_Section):
    #: labelled payload-log rows of this recent window go into the retrain dataset
    window_s: float = Field(604800.0, gt=0)
    #: at most this fraction of the training rows come from production
    share: float = Field(0.5, ge=0, le=1)
    #: the newest fraction of the window's labelled rows, held out for evaluation
    holdout: float = Field(0.3, ge=0, lt=1)
    #: pipeline params (framework, seed, hidden, ...)
    params: dict[str, JsonValue] = Field(default_factory=dict)
    #: an alarm-triggered retrain starts once this many labelled rows arrived since the
    #: alarm (0: at once), so that its window holds enough rows of the changed traffic;
    #: manual and cron retrains never wait
    min_labelled: int = Field(0, ge=0)
    #: then it starts anyway, with what there is
    wait_s: float = Field(3600.0, gt=0)


class Shadow(_Section):
    #: labelled live requests answered by both champion and candidate before filing
    min_labelled: int = Field(200, ge=1)
    #: then the request is filed anyway, marked "insufficient evidence"
    timeout_s: float = Field(3600.0, gt=0)


class Gates(_Section):
    #: non-inferiority on the paired live comparison: candidate - champion >= -margin
    live_margin: float = Field(0.02, ge=0, le=1)
    #: the same on the offline held-out rows
    offline_margin: float = Field(0.02, ge=0, le=1)
    #: if set, the candidate must beat the champion by this much (live)
    min_gain: float | None = Field(None, gt=0, le=1)
    #: candidate p99 latency <= ratio * champion p99 (live); null: no latency gate
    latency_p99_ratio: float | None = Field(2.0, gt=0)
    #: "compatible": the candidate takes what the champion took and answers alike
    signature: Literal["compatible", "any"] = "compatible"
    #: what the margins are held against: the lower bound of the difference's 95%
    #: bootstrap interval (a non-inferiority test), or its point estimate
    statistic: Literal["ci_low", "estimate"] = "ci_low"


class Approval(_Section):
    #: a request that passes the gates is approved without a person
    auto: bool = False
    expires_s: float = Field(604800.0, gt=0)
    #: whoever triggered a run by hand cannot approve its candidate
    separation_of_duties: bool = True


#: serving.recorder.LATENCY_BUCKETS (a copy: retrain must not import serving; a test
#: checks that they are equal): the latency threshold is one of these edges, so the count of
#: slower requests is exact, embedded and in Prometheus
LATENCY_EDGES = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
RolloutMetric = Literal["errors", "latency", "incorrect"]
_ROLLOUT_METRICS: list[RolloutMetric] = ["errors", "latency", "incorrect"]


class Rollout(_Section):
    """How an approved candidate takes the traffic: a canary judged step by step
    (retrain.rollout.CanaryRollout), or at once (ImmediateRollout)."""

    strategy: Literal["canary", "immediate"] = "canary"
    #: the canary's share of traffic at each step (percent); 100: it becomes champion
    steps: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0])
    #: seconds between two looks of the judge
    look_every_s: float = Field(5.0, gt=0)
    #: false rollbacks of a canary no worse than the champion stay at or below alpha
    alpha: float = Field(0.05, gt=0, lt=1)
    #: false promotions of a canary worse by delta (relative) stay at or below beta
    beta: float = Field(0.05, gt=0, lt=1)
    #: the non-inferiority margin: a canary rate up to (1 + delta) x the champion's passes
    delta: float = Field(0.25, gt=0)
    #: canary requests a step must see before it may advance (no traffic never passes)
    min_requests: int = Field(200, ge=1)
    #: a canary event rate below this passes a metric whatever the champion's (rare slow
    #: requests or a stray 5xx); beta is split 0.8 / 0.2 between the relative test and
    #: this floor test; showing a rate below it takes about 5 / negligible_rate canary
    #: requests in a step without an event, 9 / negligible_rate with one (0: off; then a
    #: step whose metric saw no event never passes)
    negligible_rate: float = Field(0.001, ge=0, lt=1)
    #: a step still undecided after this long holds (alert) or rolls back (on_timeout)
    step_timeout_s: float = Field(3600.0, gt=0)
    on_timeout: Literal["hold", "rollback"] = "hold"
    #: a request slower than this counts as a latency event (one of LATENCY_EDGES)
    latency_threshold_s: float = 0.1
    #: what the judge compares between canary and champion
    metrics: list[RolloutMetric] = Field(default_factory=_ROLLOUT_METRICS.copy, min_length=1)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("needs at least one step")
        if any(not 0 < v <= 100 for v in value):
            raise ValueError("each step must be a percent in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("steps must be strictly increasing")
        if value[-1] != 100:
            raise ValueError("the last step must be 100 (the candidate becomes champion)")
        if len(value) < 2:
            raise ValueError("needs a canary step below 100 before the last (100)")
        return value

    @field_validator("latency_threshold_s")
    @classmethod
    def _edge(cls, value: float) -> float:
        if value not in LATENCY_EDGES:
            edges = ", ".join(f"{e:g}" for e in LATENCY_EDGES)
            raise ValueError(f"must be one of the latency bucket edges ({edges})")
        return value

    @field_validator("metrics")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a metric twice")
        return value


class Policy(_Section):
    """One model's policy, merged and validated."""

    check_every_s: float = Field(60.0, gt=0)
    monitor_window_s: float = Field(900.0, gt=0)
    trigger: Trigger = Field(default_factory=Trigger)
    retrain: Retrain = Field(default_factory=Retrain)
    shadow: Shadow = Field(default_factory=Shadow)
    gates: Gates = Field(default_factory=Gates)
    approval: Approval = Field(default_factory=Approval)
    rollout: Rollout = Field(default_factory=Rollout)


@dataclass
class LoopConfig:
    """The policy file: defaults for every model and each model's overrides."""

    defaults: Policy = field(default_factory=Policy)
    #: model -> its overrides as written in the file (validated)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: where it was read from (None: built-in defaults)
    source: str | None = None
    _merged: dict[str, Policy] = field(default_factory=dict, repr=False)

    def for_model(self, name: str) -> Policy:
        """The policy in force for `name` (the defaults when the file does not list it)."""
        return self._merged.get(name, self.defaults)


def to_json(policy: Policy) -> dict[str, Any]:
    """The values in force, as JSON (they go into a promotion's evidence)."""
    doc: dict[str, Any] = policy.model_dump(mode="json")
    return doc


def load_config(path: Path | None, *, missing_ok: bool = False) -> LoopConfig:
    """Read and validate a policy file. None: the built-in defaults; a missing file is an
    error unless `missing_ok` (then also the defaults: a default location, not a file the
    operator named)."""
    if path is None:
        return LoopConfig()
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return LoopConfig()
        raise PolicyError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{where}: cannot read ({exc})") from None
    return parse_config(text, where)


def parse_config(text: str, where: str = DEFAULT_FILE) -> LoopConfig:
    """A policy document (YAML or JSON text) validated; `where` names it in errors."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(f"{where}: not valid YAML ({_yaml_reason(exc)})") from None
    return from_document(doc, where)


def from_document(doc: Any, where: str = DEFAULT_FILE) -> LoopConfig:
    """A parsed policy document (None: empty) validated."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PolicyError(
            f"{where}: must be a mapping with 'defaults' and 'models' (got {_shown(doc)})"
        )
    for key in doc:
        if key not in ("defaults", "models"):
            raise PolicyError(f"{where}: {_key(key)}: unknown key (keys: defaults, models)")
    defaults_doc = _mapping(doc.get("defaults"), where, "defaults")
    models_doc = _mapping(doc.get("models"), where, "models")
    defaults = _validate(defaults_doc, where, "defaults")
    config = LoopConfig(defaults=defaults, source=where)
    base = to_json(defaults)
    for name, written in models_doc.items():
        if not isinstance(name, str) or not _MODEL_NAME.match(name) or ".." in name:
            raise PolicyError(
                f"{where}: models.{name!r}: not a model name (letters, digits, '_', '.', "
                "'-', starting with a letter or digit)"
            )
        prefix = f"models.{name}"
        overrides = _mapping(written, where, prefix)
        config._merged[name] = _validate(_merge(base, overrides), where, prefix)
        config.models[name] = copy.deepcopy(overrides)
    return config


def _mapping(value: Any, where: str, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError(f"{where}: {path}: must be a mapping (got {_shown(value)})")
    return value


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _validate(doc: dict[str, Any], where: str, prefix: str) -> Policy:
    try:
        return Policy.model_validate(doc)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise PolicyError(f"{where}: {prefix}.{_describe(error)}") from None


def _describe(error: Any) -> str:
    path = ".".join(_key(part) for part in error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: missing"
    bounds = {
        "greater_than_equal": ("ge", ">="),
        "greater_than": ("gt", ">"),
        "less_than_equal": ("le", "<="),
        "less_than": ("lt", "<"),
    }
    if kind in bounds:
        name, sign = bounds[kind]
        bound = ctx[name]
        reason = (
            f"must be {sign} {bound:g}" if isinstance(bound, float) else f"must be {sign} {bound}"
        )
    elif kind == "literal_error":
        reason = f"must be one of {ctx.get('expected', '')}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        reason = "must be an integer"
    elif kind in ("float_type", "float_parsing"):
        reason = "must be a number"
    elif kind in ("bool_type", "bool_parsing"):
        reason = "must be true or false"
    elif kind in ("string_type",):
        reason = "must be a string"
    elif kind in ("list_type",):
        reason = "must be a list"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        reason = "must be a mapping"
    elif kind == "finite_number":
        reason = "must be a finite number"
    elif kind == "value_error":
        reason = str(ctx.get("error", error["msg"]))
    else:
        reason = str(error["msg"]).lower()
    return f"{path}: {reason} (got {_shown(value)})"


def _key(part: Any) -> str:
    return str(part) if isinstance(part, str | int) and str(part) else repr(part)


def _shown(value: Any) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a mapping"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(problem)


#: safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last), and
#: reads only true/false as booleans, as YAML 1.2 does (YAML 1.1 also reads on, off, yes,
#: no: the key `on:` would be True)
_StrictLoader: Any = type("_StrictLoader", (yaml.SafeLoader,), {})


_BOOL_TAG = "tag:yaml.org,2002:bool"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

__all__ = [
    "DEFAULT_FILE",
    "LATENCY_EDGES",
    "Approval",
    "Gates",
    "LoopConfig",
    "Policy",
    "PolicyError",
    "Retrain",
    "Rollout",
    "Shadow",
    "Trigger",
    "from_document",
    "load_config",
    "parse_config",
    "to_json",
]
