"""benchmarks/throughput.py: which networks it times, and that both run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from _helpers import REPO

spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
throughput = importlib.util.module_from_spec(spec)
sys.modules["throughput"] = throughput  # its dataclasses look their module up
spec.loader.exec_module(throughput)


def test_plain_is_create_models_net_and_recipe_is_what_the_jobs_train():
    assert throughput.net_options("plain", "resnet18", 512) == {}
    recipe = throughput.net_options("recipe", "resnet18", 512)
    assert (recipe["activation"], recipe["ghost_batch_size"], recipe["bn_scale"]) == (
        "silu", 32, False)
    # The jobs fall back to plain BatchNorm where the batch does not split into 32s.
    assert throughput.net_options("recipe", "resnet18", 48)["ghost_batch_size"] == 0


def test_both_nets_are_timed_side_by_side(tmp_path):
    out = tmp_path / "t.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--model", "resnet8", "--width", "4",
         "--batch-size", "64", "--what", "teacher", "--net", "plain,recipe", "--steps", "1",
         "--repeats", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["net"], r["variant"]) for r in rows] == [
        ("plain", "spd=1"), ("recipe", "spd=1 net=recipe")]
    assert "teacher jax spd=1 net=recipe" in result.stdout
