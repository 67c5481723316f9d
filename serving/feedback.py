"""Ground truth: labels sent back by clients, joined to their predictions by id.

Recent predictions are remembered in a bounded in-memory index; older ones are found in
the payload log through its id index (`serving.log_index`: only the files holding the ids
are read). A label for an unknown id is stored and counted as unmatched, never dropped; a
second label for an id already labelled is ignored and counted as a duplicate, also after
a restart or a `kill -9` (a label is durable before it is answered `"stored": true`).

A request is all or nothing: every item is parsed, joined and validated against the
version that answered it (`serving.labels`) before any is applied; one bad item refuses
the whole request with a 400 naming it, and a failed write with a 503, nothing applied.

Who may write labels: every request passes through `FeedbackService.check(caller, model)`
first, the one place for the role check. The endpoint builds the `Caller` from the
request's `Authorization` header with an `Authenticate` callable that servo injects
(serving never sees the registry's tokens): none given, everyone may write; given, an
unknown caller gets 401 and `labelers_only` refuses every other role with 403. (servo's
callable answers a labeler for everyone while no token exists: feedback stays open until
the first token is created.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import numpy.typing as npt
import orjson
import pyarrow as pa

from monitors.payload_log import FEEDBACK, PREDICTIONS, tensor_array
from serving.errors import InvalidInput, ModelNotFound, ServingError
from serving.labels import Label, LabelSpace, label_text, parse_feedback
from serving.log_index import LogIndex
from serving.model_folder import valid_name
from serving.recorder import FEEDBACK_DELAY_BUCKETS, Recorder
from serving.repository import ModelRepository, shown
from serving.router import Router

if TYPE_CHECKING:
    from serving.payload_log import PayloadLog


class LabelsNotStored(ServingError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


class Unauthenticated(ServingError):
    """No credentials, or credentials nobody issued (or revoked): 401."""

    status = HTTPStatus.UNAUTHORIZED


class Forbidden(ServingError):
    status = HTTPStatus.FORBIDDEN


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sends labels: anonymous without an authenticate hook, else what the hook made of
    the request's credentials (a token's name and roles)."""

    identity: str | None = None
    roles: frozenset[str] = frozenset()


ANONYMOUS = Caller()
#: (caller, model) -> None, or raises a ServingError (e.g. 403) to refuse the request
LabelWriterCheck = Callable[[Caller, str], None]
#: the request's Authorization header (None: absent) -> its caller, or None for missing,
#: malformed, unknown or revoked credentials (401). May block (a registry lookup): the
#: endpoint calls it off the event loop.
Authenticate = Callable[[str | None], Caller | None]
#: the role that may write labels
LABELER = "labeler"


def allow_everyone(caller: Caller, model: str) -> None:
    """The check without an authenticate hook: every caller may write labels."""


def labelers_only(caller: Caller, model: str) -> None:
    """The check with an authenticate hook: the caller needs the labeler role."""
    if LABELER not in caller.roles:
        who = f"token '{caller.identity}'" if caller.identity else "this caller"
        roles = ", ".join(sorted(caller.roles)) or "none"
        raise Forbidden(
            f"{who} may not write labels for model '{shown(model, valid_name)}' (roles: {roles}; "
            f"needs {LABELER})"
        )


@dataclass(slots=True)
class Remembered:
    model: str
    version: str
    #: the predicted class per row (None: the model has no label output)
    labels: npt.NDArray[Any] | None
    #: when the prediction was made (Unix seconds), for the label delay
    at: float


class FeedbackIndex:
    """Recent predictions by id, and the ids already labelled (both bounded, oldest out),
    and the ids of labels being written now (so a concurrent request sees them)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._predictions: OrderedDict[str, Remembered] = OrderedDict()
        self._labelled: OrderedDict[str, None] = OrderedDict()
        self.pending: set[str] = set()

    def remember(
        self, ident: str, model: str, version: str, labels: npt.NDArray[Any] | None
    ) -> None:
        predictions = self._predictions
        predictions[ident] = Remembered(model, version, labels, time.time())
        if len(predictions) > self.capacity:
            predictions.popitem(last=False)

    def get(self, ident: str) -> Remembered | None:
        return self._predictions.get(ident)

    def labelled(self, ident: str) -> bool:
        return ident in self._labelled or ident in self.pending

    def mark(self, ident: str) -> None:
        self._labelled[ident] = None
        if len(self._labelled) > self.capacity:
            self._labelled.popitem(last=False)


def lookup_logged(
    index: LogIndex, model: str, ids: list[str], label_outputs: dict[str, str | None]
) -> dict[str, Remembered]:
    """Predictions of `model` with these ids from the payload log (blocking: run it off
    the event loop). `label_outputs` maps version -> its label output's name."""
    if not ids:
        return {}
    table = index.rows(model, ids, ["id", "version", "variant", "outputs", "time"])
    found: dict[str, Remembered] = {}
    for row in table.to_pylist():
        if row["variant"] == "shadow":
            continue
        version = row["version"]
        wanted = label_outputs.get(version)
        labels = None
        for tensor in row["outputs"]:
            if tensor["name"] == wanted or (wanted is None and len(tensor["shape"]) == 1
                                             and tensor["datatype"] != "FP32"):  # fmt: skip
                labels = tensor_array(tensor)
                break
        found[row["id"]] = Remembered(model, version, labels, row["time"].timestamp())
    return found


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(slots=True)
class _Checked:
    label: Label
    remembered: Remembered | None
    outcome: str
    hits: int = 0


class FeedbackService:
    def __init__(
        self,
        *,
        repository: ModelRepository,
        router: Router,
        recorder: Recorder,
        payload_log: PayloadLog | None,
        index_size: int = 100_000,
        check: LabelWriterCheck = allow_everyone,
    ):
        self.repository = repository
        self.router = router
        self.recorder = recorder
        self.payload_log = payload_log
        self.index = FeedbackIndex(index_size)
        self.check = check
        root = payload_log.config.root if payload_log is not None else None
        self.predictions_log = LogIndex(root, PREDICTIONS) if root is not None else None
        self.labels_log = LogIndex(root, FEEDBACK) if root is not None else None

    async def submit(
        self, name: str, labels: list[Label], caller: Caller = ANONYMOUS
    ) -> dict[str, Any]:
        self.check(caller, name)
        if name not in self.router.state.champions and name not in self.repository.names():
            raise ModelNotFound(f"model '{shown(name, valid_name)}' not found")
        result = {"accepted": 0, "correct": 0, "incorrect": 0, "unmatched": 0, "duplicates": 0}
        fresh = self._fresh(labels, result)
        found: dict[str, Remembered] = {}
        if fresh and self.payload_log is not None:
            found = await self._from_log(name, fresh, result)
            fresh = self._fresh(fresh, result)  # labelled by a request that finished meanwhile
        spaces: dict[str | None, tuple[LabelSpace, str] | None] = {}
        checked = [self._validate(name, label, found, spaces) for label in fresh]
        # nothing is applied before this point: a refused request changed nothing
        ids = [label.id for label in fresh]
        self.index.pending.update(ids)
        try:
            if self.payload_log is not None and checked:
                records = [self._record(name, c) for c in checked]
                stored = self.payload_log.store(FEEDBACK, records)
                try:
                    await asyncio.wrap_future(stored)
                except OSError as exc:
                    raise LabelsNotStored(
                        f"labels not stored ({exc}); none was applied, send them again"
                    ) from None
        finally:
            self.index.pending.difference_update(ids)
        for item in checked:
            self._apply(name, item, result)
        result["stored"] = self.payload_log is not None
        return result

    def _fresh(self, labels: list[Label], result: dict[str, Any]) -> list[Label]:
        """Labels for ids not labelled yet (the first of an id within the request)."""
        seen: set[str] = set()
        fresh: list[Label] = []
        labelled = self.index.labelled
        for label in labels:
            if label.id in seen or labelled(label.id):
                result["duplicates"] += 1
            else:
                seen.add(label.id)
                fresh.append(label)
        return fresh

    async def _from_log(
        self, name: str, fresh: list[Label], result: dict[str, Any]
    ) -> dict[str, Remembered]:
        """Drop ids already labelled in the log (older than the memory, or from before a
        restart); the predictions not in memory, from the log."""
        payload_log, labels_log, predictions_log = (
            self.payload_log, self.labels_log, self.predictions_log
        )  # fmt: skip
        assert payload_log is not None and labels_log is not None and predictions_log is not None
        loop = asyncio.get_running_loop()
        ids = [label.id for label in fresh]
        missing = [label.id for label in fresh if self._remembered(name, label.id) is None]
        outputs = {
            e.version: e.model.plan.label_output
            for e in self.repository.entries()
            if e.name == name and e.model is not None
        }

        def lookup() -> tuple[set[str], dict[str, Remembered]]:
            if missing and payload_log.pending():
                payload_log.flush()  # predictions still queued must be in files first
            seen = payload_log.labels.unflushed(name, ids)  # before the files (see there)
            seen |= labels_log.has(name, [i for i in ids if i not in seen])
            wanted = [i for i in missing if i not in seen]
            return seen, lookup_logged(predictions_log, name, wanted, outputs)

        try:
            seen, found = await loop.run_in_executor(None, lookup)
        except (OSError, pa.ArrowException) as exc:
            raise LabelsNotStored(
                f"the payload log cannot be read to check these labels ({exc}); none was "
                "applied, send them again"
            ) from None
        if seen:
            result["duplicates"] += sum(label.id in seen for label in fresh)
            fresh[:] = [label for label in fresh if label.id not in seen]
        return found

    def _remembered(self, name: str, ident: str) -> Remembered | None:
        remembered = self.index.get(ident)
        return remembered if remembered is not None and remembered.model == name else None

    def _space(self, name: str, version: str | None) -> tuple[LabelSpace, str] | None:
        """The label space of the version that answered (or, for an unmatched label or
        a version no longer loaded, the champion's, else any loaded version's)."""
        versions = [version] if version is not None else []
        champion = self.router.state.champions.get(name)
        versions += [v for v in (champion, *self.repository.versions(name)) if v is not None]
        for candidate in versions:
            entry = self.repository.find(name, candidate)
            if entry is not None and entry.model is not None:
                return LabelSpace.of(entry.model), candidate
        return None

    def _validate(
        self,
        name: str,
        label: Label,
        found: dict[str, Remembered],
        spaces: dict[str | None, tuple[LabelSpace, str] | None],
    ) -> _Checked:
        remembered = self._remembered(name, label.id) or found.get(label.id)
        version = remembered.version if remembered is not None else None
        if version not in spaces:  # one per version a request
            spaces[version] = self._space(name, version)
        space = spaces[version]
        texts: list[str] = []
        for value in label.values:
            text = space[0].canonical(value) if space is not None else None
            if text is None:
                where = f"model '{name}' version '{space[1]}'" if space else f"model '{name}'"
                takes = space[0].describe() if space else "a loaded version to check it against"
                raise InvalidInput(
                    f"{label.where}: label {value!r} is not a class of {where} (a label is {takes})"
                )
            texts.append(text)
        label.texts = texts
        if remembered is None:
            return _Checked(label, None, "unmatched")
        predicted = remembered.labels
        if predicted is None:
            return _Checked(label, remembered, "unscored")  # no class output to compare
        if len(texts) == 1 and predicted.size > 1:
            raise InvalidInput(
                f"id '{label.id}': the prediction has {predicted.size} rows; send one label per row"
            )
        if len(texts) != predicted.size:
            raise InvalidInput(
                f"id '{label.id}': {len(texts)} labels for a prediction of {predicted.size} rows"
            )
        hits = sum(
            label_text(p) == t for p, t in zip(predicted.reshape(-1).tolist(), texts, strict=True)
        )
        return _Checked(label, remembered, "correct" if hits == len(texts) else "incorrect", hits)

    def _record(self, name: str, item: _Checked) -> dict[str, Any]:
        texts = item.label.texts
        return {
            "id": item.label.id,
            "time": now(),
            "model": name,
            "version": item.remembered.version if item.remembered is not None else None,
            "label": texts[0] if len(texts) == 1 else orjson.dumps(texts).decode(),
            "outcome": item.outcome,
        }

    def _apply(self, name: str, item: _Checked, result: dict[str, Any]) -> None:
        recorder = self.recorder
        result["accepted"] += 1
        self.index.mark(item.label.id)
        remembered = item.remembered
        if remembered is None:
            result["unmatched"] += 1
            recorder.count(recorder.feedback_unmatched, (name,))
            return
        if item.outcome == "unscored":
            return
        labels = (name, remembered.version)
        recorder.histogram(recorder.feedback_delay, labels, FEEDBACK_DELAY_BUCKETS).observe(
            max(0.0, time.time() - remembered.at)
        )
        misses = len(item.label.texts) - item.hits
        if item.hits:
            recorder.count(recorder.feedback, (*labels, "correct"), item.hits)
        if misses:
            recorder.count(recorder.feedback, (*labels, "incorrect"), misses)
        result["correct"] += item.hits
        result["incorrect"] += misses


__all__ = [
    "ANONYMOUS",
    "LABELER",
    "Authenticate",
    "Caller",
    "FeedbackService",
    "Forbidden",
    "LabelWriterCheck",
    "Unauthenticated",
    "labelers_only",
    "parse_feedback",
]
