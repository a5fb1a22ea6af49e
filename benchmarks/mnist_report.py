"""The MNIST table of Hinton et al. (2015, sec. 3) beside ours, read from the runs of
``benchmarks/mnist_reproduce.sh``: ``python benchmarks/mnist_report.py runs/mnist``.

Every figure is the last epoch's (no test-set selection); errors are out of the 10,000 test
images. A run that is missing or was stopped early says so.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TEST_IMAGES = 10_000


def _read(run: Path) -> tuple[dict | None, str]:
    """(summary or None, how far it got: epochs, train seconds and wall seconds)."""
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() \
        else {}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    log = run.parent / f"{run.name}.log"
    wall = re.findall(r"wall_seconds (\d+)", log.read_text()) if log.is_file() else []
    summary = json.loads((run / "summary.json").read_text()) \
        if (run / "summary.json").is_file() else None
    if not rows:
        return None, "not run"
    done = f"{rows[-1]['epoch']}/{config.get('epochs', '?')} epochs"
    if summary is None:
        done += " (stopped early)"
        summary = rows[-1]
    train = sum(r["epoch_seconds"] for r in rows)
    done += f", train {train:.0f} s" + (f", wall {wall[-1]} s" if wall else "")
    return summary, done


def errors(accuracy: float) -> int:
    return round((1 - accuracy) * TEST_IMAGES)


def table(runs: Path) -> str:
    lines = ["| row | paper | ours | run |", "| --- | --- | --- | --- |"]

    def add(name: str, paper: str, ours: str, how: str) -> None:
        lines.append(f"| {name} | {paper} | {ours} | {how} |")

    for run, name, paper in [("teacher", "teacher 784-1200-1200-10, dropout + jitter", "67"),
                             ("student-hard", "student 784-800-800-10, hard labels", "146"),
                             ("distill-T20", "student 784-800-800-10, distilled T=20", "74")]:
        summary, how = _read(runs / run)
        add(name, paper, str(errors(summary["test_accuracy"])) if summary else "-", how)

    summary, how = _read(runs / "omit3")
    report = (summary or {}).get("omitted_class")
    if report:
        add("omit 3: distilled, no 3 in the transfer set", "206 errors, 133 on 3s",
            f"{report['test_errors']} errors, {report['class_errors']} on "
            f"{report['class_images']} 3s", how)
        add("omit 3: bias of 3 raised by 3.5", "109 errors, 14 on 3s (98.6% of 3s right)",
            f"{report['test_errors_after_fixed_offset']} errors, "
            f"{report['class_errors_after_fixed_offset']} on 3s "
            f"({100 * report['class_accuracy_after_fixed_offset']:.1f}% of 3s right)", how)
        add(f"omit 3: offset chosen on held-out images ({report['offset']:+g})", "-",
            f"{report['test_errors_after_offset']} errors, "
            f"{report['class_errors_after_offset']} on 3s "
            f"({100 * report['class_accuracy_after_offset']:.1f}% of 3s right)", how)
    else:
        add("omit 3", "206 / 109 errors", "-", how)

    summary, how = _read(runs / "only78")
    report = (summary or {}).get("omitted_class")
    if report:
        pct = lambda key: f"{100 * (1 - report[key]):.1f}% test error"
        add("only 7s and 8s in the transfer set", "47.3% test error", pct("test_accuracy"), how)
        add("only 7 and 8: their biases lowered by 7.6", "13.2% test error",
            pct("test_accuracy_after_fixed_offset"), how)
        add(f"only 7 and 8: offset chosen on held-out images ({-report['offset']:+g} to 7, 8)",
            "-", pct("test_accuracy_after_offset"), how)
    else:
        add("only 7s and 8s", "47.3% / 13.2%", "-", how)

    sweep = runs / "sweep" / "sweep.json"
    if sweep.is_file():
        lines += ["", "| width | T | test errors | epochs | train s |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['width']} | {r['temperature']:g} | {r['test_errors']} | {r['epochs']} "
                  f"| {r['train_seconds']:.0f} |" for r in json.loads(sweep.read_text())]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mnist")))
