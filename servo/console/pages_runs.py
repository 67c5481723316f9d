"""Page 2, pipeline runs: the list (newest first, paginated) and one run's page (its DAG,
its steps with status, duration, cache hit and artifact hashes, and each step's kept log).

The DAG's edges come from the run's lineage: a step's input artifact whose content hash
another step of the run produced is an edge from that step. A step that recorded no
artifact (it failed, or was interrupted, before its inputs were recorded) is drawn after
the step recorded before it, its edge marked as assumed.
"""

from __future__ import annotations

import datetime as dt
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from markupsafe import Markup

from registry.base import aware
from serving.http import Response, Route
from servo.console import svg
from servo.console.app import ConsoleError, positive_id

if TYPE_CHECKING:
    from servo.console.app import Console, Visit

PER_PAGE = 50
#: the most of a step's log shown on the page (its end: where errors are)
LOG_CAP = 64 * 1024


def duration_s(run: dict[str, Any]) -> float | None:
    """Seconds from start to finish (None while running)."""
    start, end = run.get("started_at"), run.get("finished_at")
    if not isinstance(start, dt.datetime) or not isinstance(end, dt.datetime):
        return None
    return (aware(end) - aware(start)).total_seconds()


def started_by(run: dict[str, Any]) -> str:
    """Who or what started a run: the token that asked for it by hand (through the admin
    API or the console), the command line (trigger "manual"), a schedule, or the loop (any
    other trigger: the signal that fired)."""
    if run.get("triggered_by"):
        return f"{run['triggered_by']} (by hand)"
    trigger = str(run.get("trigger") or "")
    if trigger == "manual":
        return "the command line"
    if trigger in ("cron", "schedule"):
        return "a schedule"
    return f"the loop ({trigger})" if run.get("model") else trigger or "unknown"


def runs_context(store: Any, page: int, model: str | None = None) -> dict[str, Any]:
    """The list page's context: one page of runs (newest first) and whether there is a
    next one. Pages count from 1; the registry returns the newest `page * PER_PAGE + 1`."""
    rows = store.runs(limit=page * PER_PAGE + 1, model=model, recover=False)
    shown = rows[(page - 1) * PER_PAGE : page * PER_PAGE]
    return {
        "runs": [{**r, "duration_s": duration_s(r), "started_by": started_by(r)} for r in shown],
        "page": page,
        "has_next": len(rows) > page * PER_PAGE,
        "model": model,
    }


def dag_steps(run: dict[str, Any]) -> list[svg.Step]:
    """The run's steps as DAG nodes, edges from the lineage (see the module docstring)."""
    producers = {
        a["content_hash"]: a["step"]
        for a in run["artifacts"]
        if a["direction"] == "output" and a["content_hash"]
    }
    recorded = {a["step"] for a in run["artifacts"]}
    out: list[svg.Step] = []
    previous: str | None = None
    for step in run["steps"]:
        name = step["step"]
        inputs = sorted(
            {
                producers[a["content_hash"]]
                for a in run["artifacts"]
                if a["step"] == name
                and a["direction"] == "input"
                and a["content_hash"] in producers
            }
            - {name}
        )
        note = step["status"]
        if name not in recorded and previous is not None:
            inputs, note = [previous], f"{step['status']} (inputs not recorded)"
        elif step.get("duration_s") is not None:
            note = f"{step['status']}, {step['duration_s']:.2f} s"
        out.append(svg.Step(name, step["status"], inputs, note))
        previous = name
    return out


def read_log(uri: str | None, cap: int = LOG_CAP) -> dict[str, Any]:
    """A step's log kept at `uri` (a local path or file: URI): its text (the last `cap`
    bytes), whether it was cut, its size, or why it cannot be shown."""
    if not uri:
        return {"text": None, "note": "no log kept for this step"}
    parts = urlsplit(uri)
    if parts.scheme not in ("", "file"):
        return {"text": None, "note": f"the log is kept at {uri} (not readable from here)"}
    path = Path(unquote(parts.path) if parts.scheme else uri)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            if size > cap:
                handle.seek(size - cap)
            data = handle.read(cap)
    except OSError as exc:
        return {"text": None, "note": f"the log at {uri} cannot be read: {exc.strerror or exc}"}
    text = data.decode("utf-8", errors="replace")
    note = f"the last {cap // 1024} KiB of {size:,} bytes" if size > cap else None
    return {"text": text, "note": note}


def run_context(store: Any, run_id: int) -> dict[str, Any]:
    """One run's page context; NotFound (from the registry) for an unknown id."""
    run = store.run(run_id, recover=False)
    artifacts: dict[str, list[dict[str, Any]]] = {}
    for a in run["artifacts"]:
        artifacts.setdefault(a["step"], []).append(a)
    steps = [
        {
            **s,
            "cache_hit": s["status"] == "cached",
            "artifacts": artifacts.get(s["step"], []),
            "log": read_log(s.get("log_uri")),
        }
        for s in run["steps"]
    ]
    return {
        "run": {**run, "duration_s": duration_s(run), "started_by": started_by(run)},
        "steps": steps,
        "dag": Markup(svg.dag(f"run {run_id}: {run['pipeline']}", dag_steps(run))),
    }


def query(visit: Visit) -> dict[str, str]:
    """The request's query parameters (the last of a repeated one); unparsable: 400."""
    try:
        pairs = parse_qsl(visit.request.query.decode("ascii"), max_num_fields=8)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConsoleError(HTTPStatus.BAD_REQUEST, f"not a query string: {exc}") from None
    return dict(pairs)


def page_number(text: str | None) -> int:
    if text is None:
        return 1
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= 6) or int(text) == 0:
        raise ConsoleError(
            HTTPStatus.BAD_REQUEST, f"page must be a number from 1, got {text[:32]!r}"
        )
    return int(text)


def runs(visit: Visit) -> Response:
    params = query(visit)
    model = params.get("model") or None
    context = runs_context(visit.store, page_number(params.get("page")), model)
    return visit.render("runs.html", title="Pipeline runs", **context)


def run(visit: Visit) -> Response:
    run_id = positive_id(visit.param("id"), "pipeline run")
    return visit.render(
        "run.html", title=f"Pipeline run {run_id}", **run_context(visit.store, run_id)
    )


def routes(console: Console) -> list[Route]:
    return [
        Route("GET", "/console/runs", console.page(runs)),
        Route("GET", "/console/runs/{id}", console.page(run)),
    ]
