"""Data parallelism on the CPU: 4 host devices give what 1 device gives; bad batches are refused.

The 4-device runs happen in a subprocess (``parallel_worker.py``): the number of host devices is
fixed when jax initialises, and this test session's jax may already be running with one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("parallel_worker.py")


def run_worker(*args: str, devices: int = 4) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def four_and_one() -> tuple[dict, dict]:
    return run_worker(), run_worker("--devices", "1")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["teacher", "distill"])
def test_four_devices_match_one(four_and_one, kind):
    four, one = four_and_one
    assert (four["devices"], one["devices"]) == (4, 1)
    np.testing.assert_allclose(four[f"{kind}_losses"], one[f"{kind}_losses"], rtol=1e-4)
    np.testing.assert_allclose(four[kind], one[kind], rtol=1e-4, atol=1e-5)
    assert four[f"{kind}_losses"][-1] != four[f"{kind}_losses"][0]  # it did train


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["teacher", "distill"])
def test_batch_is_split_and_state_replicated(four_and_one, kind):
    """Gradients and BatchNorm statistics are summed across devices; the state stays whole;
    no device gathers the others' images, and no collective sits inside a loop (the kernel
    gradient's loop, which deadlocked two CPU devices when it held one)."""
    four, one = four_and_one
    assert four["sharding"][kind] == {"all_reduce": True, "all_gather": False,
                                      "collective_in_loop": False, "state_replicated": True}
    assert one["sharding"][kind]["all_reduce"] is False


@pytest.mark.slow
def test_four_devices_predict_like_one(four_and_one):
    four, one = four_and_one
    np.testing.assert_allclose(four["logits"], one["logits"], rtol=1e-4, atol=1e-5)
    assert np.asarray(four["logits"]).shape == (12, 10)  # 12 images: padded, then cut back


@pytest.mark.slow
def test_batch_not_divisible_by_devices_is_refused(four_and_one):
    four, one = four_and_one
    assert four["indivisible_error"] == "eval_batch_size 6 is not divisible by the 4 devices in use"
    assert "indivisible_error" not in one


@pytest.mark.slow
def test_four_devices_bfloat16_matmul_convolution_like_one(four_and_one):
    """kd_jax.core.conv's bf16 matrix products over a batch sharded on 4 devices: value and both
    gradients as on 1 device, to bf16 rounding (the kernel gradient sums in other groups)."""
    four, one = (np.asarray(r["bf16_conv"]) for r in four_and_one)
    np.testing.assert_allclose(four, one, rtol=0, atol=1e-2 * np.abs(one).max())
