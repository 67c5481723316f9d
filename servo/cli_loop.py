"""The loop's commands: `servo tokens`, `servo promotions`, `servo rollouts`
(servo.cli_rollouts), `servo rollback`, `servo retrain`.

They act on the registry directly, as the admin API does over HTTP, with the same roles:
with `--token` (or SERVO_TOKEN) as that token's name and role; without, as the local user
(`cli:$USER`) holding every role, since whoever can write the registry can do anything
anyway. Separation of duties holds for both: whoever triggered a retrain by hand cannot
approve its candidate. Every refused attempt to act is audited. `--json` prints JSON
(errors too, as {"error": ...}, exit code 1).

Only click is imported here at import time (see servo.cli).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, NoReturn, TypeVar

import click

from servo.cli_common import echo_json, open_store, registry_option

F = TypeVar("F", bound=Callable[..., Any])

IDENTITY_HELP = (
    "act as this token's name and role (default: the local user cli:$USER with every role; "
    "whoever can write the registry can do anything anyway)"
)


class Refused(click.ClickException):
    """A refusal (exit code 1): 'Error: ...' on stderr, or {"error": ...} with --json."""

    def __init__(self, message: str, as_json: bool = False):
        super().__init__(message)
        self.as_json = as_json

    def show(self, file: IO[Any] | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps({"error": self.message}))
        else:
            super().show(file)


@dataclass(frozen=True)
class Actor:
    name: str
    roles: frozenset[str]


@dataclass
class Session:
    store: Any
    actor: Actor
    as_json: bool

    def need(self, role: str, action: str, subject: str) -> None:
        """Refuse (audited) unless the actor holds `role`."""
        if role not in self.actor.roles:
            roles = ", ".join(sorted(self.actor.roles))
            self.refuse(
                action,
                subject,
                f"{self.actor.name} (roles: {roles}) may not {action} (needs role {role})",
            )

    def refuse(self, action: str, subject: str, message: str, **detail: Any) -> NoReturn:
        self.store.audit_attempt(self.actor.name, action, subject, {"error": message, **detail})
        raise Refused(message, self.as_json)

    def out(self, doc: Any, text: str) -> None:
        if self.as_json:
            echo_json(doc)
        else:
            click.echo(text)


def loop_options(command: F) -> F:
    """--registry, --token and --json."""
    command = registry_option(command)
    command = click.option("--token", envvar="SERVO_TOKEN", default=None, help=IDENTITY_HELP)(
        command
    )
    return click.option("--json", "as_json", is_flag=True, help="print JSON, for scripts")(command)


def local_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@contextmanager
def session(registry_url: str, token: str | None, as_json: bool) -> Iterator[Session]:
    """The store and who acts; registry refusals not handled by the command end it with
    exit code 1 and their message."""
    from registry.store import ROLES, RegistryError

    store = open_store(registry_url)
    try:
        if token is None:
            actor = Actor(f"cli:{local_user()}", frozenset(ROLES))
        else:
            identity = store.authenticate(token)
            if identity is None:
                message = "the token (--token / SERVO_TOKEN) is unknown, revoked or malformed"
                store.audit_attempt("(unknown token)", "cli", "token", {"error": message})
                raise Refused(message, as_json)
            actor = Actor(identity.name, frozenset(identity.roles))
        try:
            yield Session(store, actor, as_json)
        except RegistryError as exc:
            raise Refused(str(exc), as_json) from None
    finally:
        store.close()


def acting(run: Session, action: str, subject: str, work: Callable[[], Any], **detail: Any) -> Any:
    """Run a registry action; a refusal is audited as an attempt, then reported."""
    from registry.store import RegistryError

    try:
        return work()
    except RegistryError as exc:
        run.refuse(action, subject, str(exc), **detail)


# tokens


@click.group()
def tokens() -> None:
    """Bearer tokens for the admin API and feedback (roles: viewer, labeler, operator,
    approver). Only their sha256 is stored."""


@tokens.command("create")
@click.argument("name")
@click.option(
    "--role", required=True, type=click.Choice(["viewer", "labeler", "operator", "approver"])
)
@loop_options
def tokens_create(
    *, name: str, role: str, registry_url: str, token: str | None, as_json: bool
) -> None:
    """Create a token and print it, once (it cannot be shown again)."""
    with session(registry_url, token, as_json) as run:
        run.need("approver", "create tokens", f"token:{name[:64]}")
        secret = acting(
            run,
            "create token",
            f"token:{name[:64]}",
            lambda: run.store.create_token(name, role, run.actor.name),
        )
        run.out(
            {"name": name, "role": role, "token": secret},
            f"token '{name}' (role {role}); shown only now, keep it safe:\n{secret}",
        )


@tokens.command("list")
@loop_options
def tokens_list(*, registry_url: str, token: str | None, as_json: bool) -> None:
    """Every token: name, role, who created it and when, revoked, last used."""
    with session(registry_url, token, as_json) as run:
        rows = run.store.tokens()
        lines = [
            f"{t['name']}\t{t['role']}\tcreated {t['created_at']} by {t['created_by']}"
            f"\t{'revoked ' + str(t['revoked_at']) if t['revoked_at'] else 'active'}"
            f"\tlast used {t['last_used_at'] or '-'}"
            for t in rows
        ]
        run.out(rows, "\n".join(lines) or "no tokens (the admin API takes none; feedback is open)")


@tokens.command("revoke")
@click.argument("name")
@loop_options
def tokens_revoke(*, name: str, registry_url: str, token: str | None, as_json: bool) -> None:
    """Revoke a token: it stops working at once for the admin API, within seconds for
    feedback (its cache)."""
    with session(registry_url, token, as_json) as run:
        run.need("approver", "revoke tokens", f"token:{name[:64]}")
        acting(
            run,
            "revoke token",
            f"token:{name[:64]}",
            lambda: run.store.revoke_token(name, run.actor.name),
        )
        run.out({"name": name, "revoked": True}, f"token '{name}' revoked")


# promotions


@click.group()
def promotions() -> None:
    """Promotion requests: a candidate with its evidence, waiting for an approver."""


def _summary(request: dict[str, Any]) -> str:
    decision = request.get("decision") or {}
    decided = f"\t{decision.get('decision')} by {decision.get('actor')}" if decision else ""
    return (
        f"{request['id']}\t{request['model']}\tversion {request['version']}"
        f"\t{request['status']}\tfiled {request['created_at']}{decided}"
    )


@promotions.command("list")
@click.option("--status", help="only requests in this status (e.g. pending)")
@click.option("--model", help="only this model's requests")
@loop_options
def promotions_list(
    *, status: str | None, model: str | None, registry_url: str, token: str | None, as_json: bool
) -> None:
    """Requests, pending first, then newest first."""
    with session(registry_url, token, as_json) as run:
        rows = run.store.promotions(model=model, status=status)
        run.out(rows, "\n".join(_summary(r) for r in rows) or "no promotion requests")


@promotions.command("show")
@click.argument("request_id", type=int)
@loop_options
def promotions_show(
    *, request_id: int, registry_url: str, token: str | None, as_json: bool
) -> None:
    """A request: status, evidence (and its hash), decision, audit trail."""
    with session(registry_url, token, as_json) as run:
        request = run.store.promotion(request_id)
        evidence = json.dumps(request.get("evidence"), indent=2, default=str)
        text = (
            f"{_summary(request)}\nreason: {request.get('status_reason') or '-'}\n"
            f"evidence sha256: {request.get('evidence_hash')}\n"
            f"expires: {request.get('expires_at')}\nevidence:\n{evidence}"
        )
        run.out(request, text)


def _decide(
    run: Session, request_id: int, decision: str, reason: str, evidence_hash: str | None
) -> dict[str, Any]:
    action = "approve" if decision == "approved" else "reject"
    subject = f"promotion/{request_id}"
    run.need("approver", action, subject)
    doc: dict[str, Any] = acting(
        run,
        action,
        subject,
        lambda: run.store.decide(
            request_id,
            decision,
            run.actor.name,
            set(run.actor.roles),
            reason,
            evidence_hash=evidence_hash,
        ),
        request=request_id,
    )
    return doc


@promotions.command("approve")
@click.argument("request_id", type=int)
@click.option("--reason", required=True, help="why (recorded with the decision)")
@click.option(
    "--evidence-hash",
    help="the sha256 of the evidence you read (`show`): another one refuses the approval",
)
@click.option(
    "--no-rollout", is_flag=True, help="only decide: leave the rollout to the running `servo up`"
)
@loop_options
def promotions_approve(
    *,
    request_id: int,
    reason: str,
    evidence_hash: str | None,
    no_rollout: bool,
    registry_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Approve a pending request; its candidate then becomes champion at once."""
    from retrain.rollout import ImmediateRollout

    with session(registry_url, token, as_json) as run:
        doc = _decide(run, request_id, "approved", reason, evidence_hash)
        status = "approved"
        if not no_rollout:
            status = ImmediateRollout(run.store).start(doc, run.actor.name)
            doc = run.store.promotion(request_id)
        run.out(
            doc,
            f"promotion request {request_id} ({doc['model']} version {doc['version']}) "
            f"approved: {status}",
        )


@promotions.command("reject")
@click.argument("request_id", type=int)
@click.option("--reason", required=True, help="why (recorded with the decision)")
@loop_options
def promotions_reject(
    *, request_id: int, reason: str, registry_url: str, token: str | None, as_json: bool
) -> None:
    """Reject a pending request; the champion stays."""
    with session(registry_url, token, as_json) as run:
        doc = _decide(run, request_id, "rejected", reason, None)
        run.out(
            doc,
            f"promotion request {request_id} ({doc['model']} version {doc['version']}) rejected",
        )


# rollback and retrain


def _registered(run: Session, model: str, action: str) -> None:
    from serving.model_folder import NAME_RULE, valid_name

    if not valid_name(model):
        run.refuse(action, repr(model[:64]), f"invalid model name {model[:64]!r} ({NAME_RULE})")
    if model not in run.store.models():
        run.refuse(action, model, f"model '{model}' is not registered")


@click.command("rollback")
@click.argument("model")
@click.option(
    "--to",
    "to",
    type=click.IntRange(min=1),
    help="the version to go back to (default: the previous champion)",
)
@click.option("--reason", default="", help="recorded in the audit log")
@loop_options
def rollback(
    *, model: str, to: int | None, reason: str, registry_url: str, token: str | None, as_json: bool
) -> None:
    """Make the previous champion (or --to V) the champion again, at once; while a canary
    rollout of MODEL runs, roll that rollout back (the champion stays, the canary goes)."""
    with session(registry_url, token, as_json) as run:
        run.need("operator", "rollback", model[:64])
        _registered(run, model, "rollback")
        was = run.store.aliases(model).get("champion")
        rolling = run.store.active_rollout(model)  # a running canary is what goes back
        champion = acting(
            run, "rollback", model, lambda: run.store.rollback(model, run.actor.name, reason, to=to)
        )
        text = f"{model}: version {champion} is champion (was {was})"
        if rolling is not None:
            text = (
                f"{model}: rollout {rolling['id']} of version {rolling['version']} rolled back; "
                f"version {champion} is champion alone"
            )
        run.out({"model": model, "champion": champion, "was": was}, text)


@click.command("retrain")
@click.argument("model")
@click.option("--reason", default="", help="recorded with the request")
@loop_options
def retrain(
    *, model: str, reason: str, registry_url: str, token: str | None, as_json: bool
) -> None:
    """Ask the loop (`servo up`) to retrain MODEL now; it runs when the loop takes it."""
    with session(registry_url, token, as_json) as run:
        run.need("operator", "retrain", model[:64])
        _registered(run, model, "retrain")
        request = acting(
            run, "retrain", model, lambda: run.store.request_retrain(model, run.actor.name, reason)
        )
        run.out(
            {"model": model, "request": request, "status": "queued"},
            f"{model}: retrain request {request} queued",
        )


def add_commands(main: click.Group) -> None:
    from servo.cli_rollouts import rollouts

    for command in (tokens, promotions, rollouts, rollback, retrain):
        main.add_command(command)
