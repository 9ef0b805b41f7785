"""A plan is data: per conv site, which block replaces it. Both round-trip through JSON."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from search.errors import InvalidInputError

KINDS = ("keep", "ds", "ss", "ir")
_KEY_RE = re.compile(r"(keep|ds|ss|ir)(?::(.*))?")


@dataclass(frozen=True, order=True)
class BlockChoice:
    """One site's choice: keep the conv, or a block with its hyper-parameters.

    ``ds``: depthwise-separable, ``depth_multiplier``; ``ss``: spatial-separable, ``rank``;
    ``ir``: inverted residual, ``exp_ratio`` and ``kernel``.
    """

    kind: str = "keep"
    depth_multiplier: int | None = None
    rank: int | None = None
    exp_ratio: float | None = None
    kernel: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(f"block kind must be one of {KINDS}, got {self.kind!r}")
        needed = {
            "keep": set(),
            "ds": {"depth_multiplier"},
            "ss": {"rank"},
            "ir": {"exp_ratio", "kernel"},
        }[self.kind]
        for name in ("depth_multiplier", "rank", "exp_ratio", "kernel"):
            value = getattr(self, name)
            if name in needed:
                if value is None or isinstance(value, bool) or value < 1:
                    raise InvalidInputError(f"{self.kind} needs {name} >= 1, got {value!r}")
                if name != "exp_ratio" and not isinstance(value, int):
                    raise InvalidInputError(f"{name} must be an integer, got {value!r}")
            elif value is not None:
                raise InvalidInputError(f"{self.kind} takes no {name}")
        if self.kind == "ir" and self.kernel is not None and self.kernel % 2 == 0:
            raise InvalidInputError(f"ir kernel must be odd, got {self.kernel}")

    @property
    def key(self) -> str:
        """A short stable label: ``keep``, ``ds:m=1``, ``ss:r=32``, ``ir:t=6,k=3``."""
        if self.kind == "ds":
            return f"ds:m={self.depth_multiplier}"
        if self.kind == "ss":
            return f"ss:r={self.rank}"
        if self.kind == "ir":
            return f"ir:t={self.exp_ratio:g},k={self.kernel}"
        return "keep"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> BlockChoice:
        if isinstance(data, str):
            return cls.parse(data)
        if not isinstance(data, dict):
            raise InvalidInputError(f"a block choice is a mapping or a key, got {data!r}")
        unknown = set(data) - {"kind", "depth_multiplier", "rank", "exp_ratio", "kernel"}
        if unknown:
            raise InvalidInputError(f"unknown block choice fields: {sorted(unknown)}")
        values = dict(data)
        if values.get("exp_ratio") is not None:
            values["exp_ratio"] = float(values["exp_ratio"])
        return cls(**values)

    @classmethod
    def parse(cls, key: str) -> BlockChoice:
        """Parse a ``key`` back into a choice."""
        match = _KEY_RE.fullmatch(key.strip())
        if match is None:
            raise InvalidInputError(f"cannot parse block choice {key!r}")
        kind, rest = match.group(1), match.group(2) or ""
        fields: dict[str, Any] = {}
        names = {"m": "depth_multiplier", "r": "rank", "t": "exp_ratio", "k": "kernel"}
        for part in filter(None, rest.split(",")):
            name, _, value = part.partition("=")
            if name not in names:
                raise InvalidInputError(f"unknown field {name!r} in {key!r}")
            try:
                fields[names[name]] = float(value) if name == "t" else int(value)
            except ValueError:
                raise InvalidInputError(f"bad value in {key!r}") from None
        return cls(kind, **fields)


KEEP = BlockChoice()

Plan = dict[str, BlockChoice]
"""Site name -> choice; a site not named is kept."""


def plan_to_dict(plan: Plan) -> dict[str, dict[str, Any]]:
    return {site: choice.to_dict() for site, choice in sorted(plan.items())}


def plan_from_dict(data: Any) -> Plan:
    if not isinstance(data, dict):
        raise InvalidInputError("a plan is a mapping of site name to block choice")
    return {str(site): BlockChoice.from_dict(choice) for site, choice in data.items()}


def plan_to_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), sort_keys=True)


def plan_from_json(text: str) -> Plan:
    try:
        return plan_from_dict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"plan is not valid JSON: {exc}") from None
