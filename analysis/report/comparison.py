"""`Comparison`: what `landscape compare` found, typed from the measurements to the report.

Each checkpoint is a `ComparedCheckpoint`: its label and training seed, what it was measured on, its quantities
and each measure's typed result (analysis/measures/), and the surface files drawn for it. The comparison adds
each group's aggregates and each difference against its baseline. It becomes a dict only when written as JSON
(`to_dict`: compare's results.json, --json, the figures' caches), and `from_dict` makes it typed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from analysis.measures.registry import MEASURES
from analysis.report.differences import Aggregate, Difference
from landscape.results import Quantity, Result, to_jsonable

SURFACES = ("surface", "surface2d")  # compare's own measures: a 1-D and a 2-D random-direction surface


@dataclass(frozen=True)
class ComparedCheckpoint:
    """One checkpoint of a comparison. `results`: each measure's typed result; `surfaces`: surface name → HDF5 file;
    `at_train_loss`: where on its trajectory it was taken (--at-train-loss), else None."""

    label: str
    path: str
    seed: int | None
    config: dict | None
    setup: dict
    test_setup: dict
    quantities: dict[str, Quantity]
    results: dict[str, Result] = field(default_factory=dict)
    surfaces: dict[str, str] = field(default_factory=dict)
    at_train_loss: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        """As results.json holds it: "raw" has each measure's result and each surface's file."""
        out = {
            "label": self.label,
            "path": self.path,
            "seed": self.seed,
            "config": self.config,
            "setup": self.setup,
            "test_setup": self.test_setup,
            "quantities": self.quantities,
            "raw": {**{n: r.to_dict() for n, r in self.results.items()}, **self.surfaces},
        }
        if self.at_train_loss is not None:
            out["at_train_loss"] = self.at_train_loss
        return to_jsonable(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparedCheckpoint:
        raw = data["raw"]
        return cls(
            label=data["label"],
            path=data["path"],
            seed=data["seed"],
            config=data["config"],
            setup=data["setup"],
            test_setup=data["test_setup"],
            quantities={n: Quantity.from_dict(q) for n, q in data["quantities"].items()},
            results={n: MEASURES[n].revive(r) for n, r in raw.items() if n not in SURFACES},
            surfaces={n: str(raw[n]) for n in SURFACES if n in raw},
            at_train_loss=data.get("at_train_loss"),
        )


@dataclass(frozen=True)
class Comparison:
    """Every checkpoint measured alike; `groups`: each label's Aggregate per quantity; `differences`: each group
    against its baseline (`baselines`) per quantity; `quantities`: their names in table order; `at_train_loss`: the
    matched train loss (None: final checkpoints); `settings`: the comparison's settings."""

    checkpoints: tuple[ComparedCheckpoint, ...]
    groups: dict[str, dict[str, Aggregate | None]]
    baseline: str
    baselines: dict[str, str]
    differences: dict[str, dict[str, Difference | None]]
    quantities: tuple[str, ...]
    at_train_loss: float | None
    settings: dict

    def members(self) -> dict[str, list[ComparedCheckpoint]]:
        """The checkpoints by label (a label's seeds together), in the order they were given."""
        found: dict[str, list[ComparedCheckpoint]] = {}
        for c in self.checkpoints:
            found.setdefault(c.label, []).append(c)
        return found

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "checkpoints": [c.to_dict() for c in self.checkpoints],
                "groups": self.groups,
                "baseline": self.baseline,
                "baselines": self.baselines,
                "differences": self.differences,
                "quantities": list(self.quantities),
                "at_train_loss": self.at_train_loss,
                "settings": self.settings,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        """A comparison read back from JSON (a cache), typed again: results, quantities, aggregates, differences."""
        return cls(
            checkpoints=tuple(ComparedCheckpoint.from_dict(c) for c in data["checkpoints"]),
            groups={
                g: {n: None if a is None else Aggregate.from_dict(a) for n, a in aggs.items()}
                for g, aggs in data["groups"].items()
            },
            baseline=data["baseline"],
            baselines=data["baselines"],
            differences={
                g: {n: None if d is None else Difference.from_dict(d) for n, d in diffs.items()}
                for g, diffs in data["differences"].items()
            },
            quantities=tuple(data["quantities"]),
            at_train_loss=data["at_train_loss"],
            settings=data["settings"],
        )
