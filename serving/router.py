"""Which version answers: champion, a canary share, shadow copies.

The live routing state is one immutable object swapped by reference, so a request sees
either the old table or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from serving.errors import ModelNotFound
from serving.model_folder import valid_name
from serving.repository import shown
from serving.routes import CANARY, CHAMPION, OTHER, SHADOW
from serving.runtime import OnnxModel

BUCKETS = 10_000


def bucket(key: str) -> int:
    """A stable bucket in [0, 10000) for a routing key (sticky across requests and restarts)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % BUCKETS


def cut(percent: float) -> int:
    return round(percent * BUCKETS / 100)


@dataclass(frozen=True, slots=True)
class LiveRoute:
    champion: OnnxModel
    canary: OnnxModel | None = None
    canary_cut: int = 0
    #: (shadow, cut): a request is copied when its bucket is below the cut
    shadows: tuple[tuple[OnnxModel, int], ...] = ()
    #: version -> its role (champion, canary, shadow, other)
    roles: dict[str, str] = field(default_factory=dict)

    def choose(self, key_bucket: int) -> tuple[OnnxModel, str]:
        if self.canary is not None and key_bucket < self.canary_cut:
            return self.canary, CANARY
        return self.champion, CHAMPION


@dataclass(frozen=True, slots=True)
class RoutingState:
    live: dict[str, LiveRoute] = field(default_factory=dict)
    #: every routed model's champion version, loaded or not (to explain a failed load)
    champions: dict[str, str] = field(default_factory=dict)


class Router:
    def __init__(self) -> None:
        self.state = RoutingState()

    def install(self, state: RoutingState) -> None:
        self.state = state  # one reference swap

    def live(self, name: str) -> LiveRoute | None:
        return self.state.live.get(name)

    def champion_version(self, name: str) -> str:
        version = self.state.champions.get(name)
        if version is None:
            raise ModelNotFound(f"model '{shown(name, valid_name)}' not found")
        return version

    def role(self, name: str, version: str) -> str:
        route = self.state.live.get(name)
        return route.roles.get(version, OTHER) if route is not None else OTHER


__all__ = ["CANARY", "CHAMPION", "OTHER", "SHADOW", "LiveRoute", "Router", "RoutingState"]
