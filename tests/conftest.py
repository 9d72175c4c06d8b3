"""Every test sees 8 simulated CPU devices (set before jax initialises its backends)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One thread per OpenMP library (tblite, pyscf): pytest-xdist already runs one worker per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, f"expected 8 simulated CPU devices, got {jax.devices()}"
