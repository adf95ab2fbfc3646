"""Accuracy-budgeted mixed precision: keep the most sensitive layers float until the int8 drop fits a budget.

The greedy search of NNCF's ``quantize_with_accuracy_control`` and OpenVINO POT's AccuracyAwareQuantization,
on an exported file: start from the full int8 file, keep layers float one at a time in the order of the
measured ranking (:mod:`edgekd.quant.sensitivity`), rewrite and rerun the file after each, and stop at the first
file whose validation accuracy is within ``max_drop`` percentage points of the fp32 file (in the same runtime).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import RecipeError
from edgekd.quant.selective import Layer
from edgekd.quant.sensitivity import Evaluator, Measured

Log = Callable[[str], None]


def check_max_drop(value: Any, option: str = "--max-drop") -> float:
    """The accuracy budget in percentage points (0..100).

    Raises:
        RecipeError: Not a number, negative, or above 100.
    """
    try:
        points = float(value)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{option} must be a number of accuracy points, got {value!r}",
                          "e.g. --max-drop 0.5 for half a percentage point") from e
    if not 0 <= points <= 100:
        raise RecipeError(f"{option} must be between 0 and 100 accuracy points, got {value}",
                          "e.g. --max-drop 0.5 for half a percentage point")
    return points


@dataclass
class MixedResult:
    """The file the search kept and how it got there."""

    float_layers: list[Layer]
    measured: Measured  # the kept file on the validation split
    fits: bool  # within the budget (False: every layer float and still above it)
    max_drop: float
    steps: list[dict[str, Any]] = field(default_factory=list)  # one per file tried
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"max_drop_points": self.max_drop, "fits": self.fits,
                "float_layers": [layer.name for layer in self.float_layers],
                "validation": self.measured.to_json(), "files_tried": len(self.steps),
                "search_seconds": round(self.seconds, 2), "steps": self.steps}


def search_mixed(evaluator: Evaluator, ranking: list[Layer], max_drop: float, out_path: Path,
                 log: Log | None = None, full: Measured | None = None) -> MixedResult:
    """Keep layers float in ``ranking`` order until the validation drop is at most ``max_drop`` points.

    Args:
        evaluator: Runs candidates of the route on the validation split against its fp32 file.
        ranking: The route's layers, most sensitive first.
        max_drop: The budget in percentage points of accuracy against the fp32 file.
        out_path: Where the chosen file is written (atomically).
        log: Receives one line per file tried.
        full: The full int8 file's figures when already measured (the sensitivity run has them).

    Returns:
        The float layers, the figures of the file written, and every step.
    """
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    route = evaluator.route
    kept: list[Layer] = []
    current = full if full is not None else evaluator.measure()
    steps = [{"float_layers": 0, **current.to_json()}]
    log(f"  {route.format}: all int8 {-current.drop_points:+.2f} points vs fp32 (budget {max_drop:g})")
    for layer in ranking:
        if current.drop_points <= max_drop:
            break
        kept.append(layer)
        current = evaluator.measure(keep_float=[k.key for k in kept])
        steps.append({"float_layers": len(kept), "added": layer.name, **current.to_json()})
        log(f"  {route.format}: + {layer.name} float: {-current.drop_points:+.2f} points")
    # Write the chosen file once more (the evaluator's candidate was overwritten by later tries).
    route.write(out_path, keep_float=[k.key for k in kept])
    return MixedResult(kept, current, current.drop_points <= max_drop, max_drop, steps, time.perf_counter() - t0)
