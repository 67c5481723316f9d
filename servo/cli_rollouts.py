"""`servo rollouts list|show|rollback`: the canary rollouts in the registry.

`show` replays a rollout: a fresh judge (`retrain.judge.replay`, with the judge settings
the rollout started with) takes the stored counts look by look, and each verdict it gives
is compared with the stored one; "replayed: same verdict" or the differences (exit code 1
then: the stored decisions do not follow from the stored counts). Identity, roles,
refusals and --json as in servo.cli_loop. Only click is imported at import time.
"""

from __future__ import annotations

import math
from typing import Any

import click

from servo.cli_loop import acting, loop_options, session

#: e-values are recomputed in the same order of operations: equal but for the last bits
REL_TOL = 1e-9
_EXACT = ("decision", "step", "looks", "step_canary_requests", "step_events")
_E_VALUES = ("rollback_e", "promote_e")


@click.group()
def rollouts() -> None:
    """Canary rollouts: the candidate's share step by step, the judge's looks, the outcome."""


def _line(doc: dict[str, Any]) -> str:
    held = " (held)" if doc["held"] else ""
    return (
        f"{doc['id']}\t{doc['model']}\tversion {doc['version']} (champion {doc['champion']})"
        f"\t{doc['status']}{held}\tstep {doc['step'] + 1}/{len(doc['steps'])} at "
        f"{doc['percent']:g}%\t{doc['looks']} looks\trequest {doc['request_id']}"
        f"\tstarted {doc['started_at']}"
    )


@rollouts.command("list")
@click.option("--model", help="only this model's rollouts")
@click.option(
    "--status", help="only rollouts in this status (running, promoted, rolled_back, failed)"
)
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@loop_options
def rollouts_list(
    *,
    model: str | None,
    status: str | None,
    limit: int,
    registry_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Rollouts, newest first."""
    with session(registry_url, token, as_json) as run:
        rows = run.store.rollouts(model=model, status=status, limit=limit)
        run.out(rows, "\n".join(_line(r) for r in rows) or "no rollouts")


def _differences(stored: Any, replayed: dict[str, Any]) -> list[str]:
    """What differs between a stored verdict and the replayed one (empty: the same)."""
    if not isinstance(stored, dict):
        return [f"stored verdict is {stored!r}"]
    out = [
        f"{key} stored {stored.get(key)!r}, replayed {replayed[key]!r}"
        for key in _EXACT
        if stored.get(key) != replayed[key]
    ]
    for key in _E_VALUES:
        mine, theirs = replayed[key], stored.get(key)
        if not isinstance(theirs, dict) or set(theirs) != set(mine):
            out.append(f"{key} stored {theirs!r}, replayed {mine!r}")
            continue
        for metric, value in mine.items():
            was = theirs[metric]
            if not isinstance(was, int | float) or not math.isclose(was, value, rel_tol=REL_TOL):
                out.append(f"{key}[{metric}] stored {was!r}, replayed {value!r}")
    return out


def replay_rollout(rollout: dict[str, Any], looks: list[dict[str, Any]]) -> dict[str, Any]:
    """The rollout's looks replayed: {"replayed": [verdict, ...] | None, "same": bool |
    None, "differences": [{"seq", "differences"}], "error": why it cannot be replayed}."""
    from retrain.judge import JudgeConfig, counts_from_json, replay

    try:
        config = JudgeConfig.from_json(rollout["config"]["judge"])
        inputs = [(int(look["step"]), counts_from_json(look["counts"])) for look in looks]
    except (KeyError, TypeError, ValueError) as exc:
        why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyError) else f"no {exc}"
        return {"replayed": None, "same": None, "differences": [], "error": why}
    verdicts = [v.to_json() for v in replay(config, inputs)]
    differences = [
        {"seq": look["seq"], "differences": found}
        for look, verdict in zip(looks, verdicts, strict=True)
        if (found := _differences(look["verdict"], verdict))
    ]
    return {"replayed": verdicts, "same": not differences, "differences": differences,
            "error": None}  # fmt: skip


def _events(total: dict[str, list[int]]) -> str:
    return ", ".join(f"{m} {c}/{b}" for m, (c, b) in total.items()) or "-"


def _e_values(values: Any) -> str:
    if not isinstance(values, dict) or not values:
        return "-"
    return ", ".join(f"{m} {v:.4g}" if isinstance(v, int | float) else f"{m} {v!r}"
                     for m, v in values.items())  # fmt: skip


def step_totals(rollout: dict[str, Any], looks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step of a rollout: its index and percent, its looks ("looks": the list),
    "requests" [canary, champion] (the "errors" trials), "events" {metric: [canary,
    champion]} and "verdict" (its last look's, {} if none)."""
    out = []
    for index, percent in enumerate(rollout["steps"]):
        mine = [look for look in looks if look["step"] == index]
        requests = [0, 0]
        events: dict[str, list[int]] = {}
        for look in mine:
            for metric, (ct, ce, bt, be) in look["counts"].items():
                if metric == "errors":
                    requests = [requests[0] + ct, requests[1] + bt]
                pair = events.setdefault(metric, [0, 0])
                pair[0], pair[1] = pair[0] + ce, pair[1] + be
        last = mine[-1]["verdict"] if mine and isinstance(mine[-1]["verdict"], dict) else {}
        out.append({"index": index, "percent": percent, "looks": mine, "requests": requests,
                    "events": events, "verdict": last})  # fmt: skip
    return out


def _steps_text(rollout: dict[str, Any], looks: list[dict[str, Any]]) -> list[str]:
    lines = []
    for step in step_totals(rollout, looks):
        index, percent, mine = step["index"], step["percent"], step["looks"]
        if not mine:
            if index <= rollout["step"]:
                lines.append(f"step {index + 1} at {percent:g}%: no looks")
            continue
        requests, last = step["requests"], step["verdict"]
        lines += [
            f"step {index + 1} at {percent:g}%: {len(mine)} looks; requests canary "
            f"{requests[0]}, champion {requests[1]}; events (canary/champion) "
            f"{_events(step['events'])}",
            f"  at look {mine[-1]['seq']}: rollback e {_e_values(last.get('rollback_e'))}; "
            f"promotion e {_e_values(last.get('promote_e'))}",
            f"  decision {last.get('decision', '-')}: {last.get('reason', '-')}",
        ]
    return lines


def _replay_text(result: dict[str, Any], n_looks: int) -> str:
    if result["error"] is not None:
        return f"replayed: not possible ({result['error']})"
    if result["same"]:
        return f"replayed: same verdict at every look ({n_looks} looks)"
    head = f"replayed: DIFFERENT at {len(result['differences'])} of {n_looks} looks"
    shown = [f"  look {d['seq']}: {'; '.join(d['differences'])}" for d in result["differences"]]
    return "\n".join([head, *shown[:20]])


@rollouts.command("show")
@click.argument("rollout_id", type=click.IntRange(min=1))
@loop_options
def rollouts_show(*, rollout_id: int, registry_url: str, token: str | None, as_json: bool) -> None:
    """A rollout step by step (share, looks, requests and events of each arm, e-values at
    the decision, the decision and its reason), its verdicts recomputed from the stored
    counts. Exit code 1 when a recomputed verdict differs from the stored one."""
    with session(registry_url, token, as_json) as run:
        rollout = run.store.rollout(rollout_id)
        looks = run.store.rollout_looks(rollout_id)
        result = replay_rollout(rollout, looks)
        steps = " -> ".join(f"{p:g}%" for p in rollout["steps"])
        held = ", held" if rollout["held"] else ""
        text = "\n".join([
            f"rollout {rollout['id']}: {rollout['model']} version {rollout['version']} against "
            f"champion {rollout['champion']}: {rollout['status']}{held} "
            f"(promotion request {rollout['request_id']})",
            f"steps {steps}; started {rollout['started_at']}, "
            f"finished {rollout['finished_at'] or '-'}",
            *_steps_text(rollout, looks),
            f"outcome: {rollout['status']}: {rollout['reason'] or '-'}",
            _replay_text(result, len(looks)),
        ])  # fmt: skip
        run.out({"rollout": rollout, "looks": looks, **result}, text)
    if result["same"] is False:
        click.get_current_context().exit(1)


@rollouts.command("rollback")
@click.argument("rollout_id", type=click.IntRange(min=1))
@click.option("--reason", required=True, help="why (recorded in the audit log)")
@loop_options
def rollouts_rollback(
    *, rollout_id: int, reason: str, registry_url: str, token: str | None, as_json: bool
) -> None:
    """Roll a running rollout back now: the champion alone takes the traffic again (the
    gateway follows within its poll interval), the candidate is marked rolled_back."""
    subject = f"rollout/{rollout_id}"
    with session(registry_url, token, as_json) as run:
        run.need("operator", "rollback rollout", subject)
        acting(
            run,
            "rollback rollout",
            subject,
            lambda: run.store.rollback_rollout(rollout_id, run.actor.name, reason, None),
        )
        doc = run.store.rollout(rollout_id)
        run.out(
            doc,
            f"rollout {rollout_id} rolled back: {doc['model']} version {doc['champion']} is "
            f"champion alone, version {doc['version']} is rolled_back",
        )
