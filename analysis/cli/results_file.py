"""`landscape measure --out FILE.json`: every finished metric saved at once, atomically, and `--resume` keeps them.

The file holds {"format": "landscape-measure", "version": 1, "settings": {...}, "complete": bool,
"checkpoints": [report, ...], "checkpoint_paths": [...]}, each report as `landscape measure --json` prints
it, its "metrics" growing as they finish. Each write goes to a temporary file that then replaces the old
one, so a run stopped at any moment (Ctrl-C, kill -9) leaves the last complete file behind. A file is
resumed only by a run with the same settings on checkpoints with the same SHA-256; "checkpoint_paths" are
the checkpoints it was written for, and another one is added only when asked (`--add-checkpoint`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from analysis.cli.specs import MeasureSpec
from analysis.measures.measurement import Measurement
from landscape.engine import distributed as ranks
from landscape.inputs.checkpoints import file_sha256, short_list
from landscape.results import to_jsonable

FORMAT = "landscape-measure"
VERSION = 1


class ResultsFileError(ValueError):
    """A results file that cannot be written or resumed: the message names the file and the fix."""


class ResultsFile:
    """The reports of one `landscape measure` run, by checkpoint; written to `path` on rank 0 (kept in memory if None)."""

    def __init__(self, path: Path | None, settings: dict, reports: list[dict], checkpoint_paths: list[str] | None = None) -> None:
        self.path, self.settings = path, to_jsonable(settings)
        self.reports = {r["checkpoint"]: r for r in reports}
        self.checkpoint_paths = checkpoint_paths  # the checkpoints the file is for (None: not recorded)
        self.complete = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        settings: dict,
        *,
        resume: bool,
        checkpoints: Sequence[str] | None = None,
        add_checkpoints: bool = False,
    ) -> ResultsFile:
        """A new file (written at once, so an unwritable --out fails before any work) or, with `resume`, an existing one.

        `checkpoints` (measure's): a file resumed for checkpoints it was not written for is refused, unless
        `add_checkpoints`; they are then added to it.
        """
        path, settings = Path(path), to_jsonable(settings)
        store, state = None, None
        if ranks.is_main():
            try:
                if path.exists() and not resume:
                    raise ResultsFileError(f"{path} exists; pass --resume to continue it, or choose another --out")
                reports, paths = cls._read(path, settings) if path.exists() else ([], [])
                if checkpoints is not None:
                    paths = _with_checkpoints(path, paths, checkpoints, add_checkpoints)
                store = cls(path, settings, reports, paths if checkpoints is not None else None)
                store.write()
                state = ("ok", list(store.reports.values()), store.checkpoint_paths)
            except ResultsFileError as error:
                state = ("error", str(error))
        if ranks.world_size() > 1:
            state = ranks.all_gather(state)[0]
        if state[0] == "error":
            raise ResultsFileError(state[1])
        return store or cls(path, settings, state[1], state[2])

    @staticmethod
    def _read(path: Path, settings: dict) -> tuple[list[dict], list[str]]:
        """The file's reports and the checkpoints it was written for (its reports' checkpoints in files from before
        "checkpoint_paths"); refused unless it was written with `settings`."""
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ResultsFileError(f"{path} cannot be read as a results file ({error}); choose another --out") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ResultsFileError(f"{path} is not a `landscape measure` results file; choose another --out")
        stored = {**_defaults_of_newer_settings(), **data.get("settings", {})}
        for key in sorted(set(stored) | set(settings)):
            if stored.get(key) != settings.get(key):
                name = "the checkpoint list" if key == "checkpoints" else "--" + key.replace("_", "-")
                raise ResultsFileError(
                    f"{path} was measured with {name} {_show(stored.get(key))}, not "
                    f"{_show(settings.get(key))}; resume with the same options, or choose another --out"
                )
        reports = data.get("checkpoints", [])
        return reports, data.get("checkpoint_paths") or [r["checkpoint"] for r in reports]

    def previous(self, checkpoint: str) -> Measurement | None:
        """The saved measurement of `checkpoint`, typed, if any; refused if the file changed since (SHA-256)."""
        report = self.reports.get(checkpoint)
        if report is None:
            return None
        saved, now = report["setup"].get("checkpoint_sha256"), file_sha256(checkpoint)
        if saved != now:
            raise ResultsFileError(
                f"{checkpoint} changed since its results were saved in {self.path} (SHA-256 "
                f"{str(saved)[:12]}… then, {now[:12]}… now); choose another --out to measure it afresh"
            )
        return Measurement.from_dict(report)

    def save(self, measurement: Measurement) -> None:
        self.reports[measurement.checkpoint] = measurement.to_dict()
        self.write()

    @property
    def n_metrics(self) -> int:
        """Metrics finished (and, with a path, saved) over all checkpoints."""
        return sum(len(r["metrics"]) for r in self.reports.values())

    def write(self) -> None:
        """Replace the file by the current reports: a temporary file first, flushed to disk, then renamed over it."""
        if self.path is None or not ranks.is_main():
            return
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "settings": self.settings,
            "complete": self.complete,
            "checkpoints": list(self.reports.values()),
        }
        if self.checkpoint_paths is not None:
            payload["checkpoint_paths"] = self.checkpoint_paths
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(json.dumps(payload, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as error:
            raise ResultsFileError(f"cannot write {self.path}: {error.strerror or error}") from None
        finally:
            tmp.unlink(missing_ok=True)


def _defaults_of_newer_settings() -> dict[str, object]:
    """Every setting's default: a file written before a setting existed was measured with its default."""
    return MeasureSpec().settings()


def _with_checkpoints(path: Path, written_for: list[str], asked: Sequence[str], add: bool) -> list[str]:
    """The checkpoints a resumed file is for: those it was written for, and the `asked` ones it lacks if `add`."""
    new = [p for p in dict.fromkeys(asked) if p not in written_for]
    if new and written_for and not add:
        them = "it" if len(new) == 1 else "them"
        raise ResultsFileError(
            f"{path} holds the results of {short_list(written_for)}, not of {short_list(new)}; pass --add-checkpoint to add "
            f"{them} to this file, or choose another --out"
        )
    return written_for + new


def _show(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "the default" if value is None else str(value)
