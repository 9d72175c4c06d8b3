"""Runs the benchmark suites and writes one JSON file.

  python -m launch.bench [--only data,model,train,predict] [--quick] [--out bench.json]
  python -m launch.bench --only predict [--workdir RUN] [--molecules 128]   # vs GFN2-xTB relaxation
  python -m launch.bench --only energy [--budget_s 1500] [--peer mace] [--peer_python PY]
"""

import importlib
import json
import platform
import time

from absl import app, flags

from consist.bench import SUITES

_ONLY = flags.DEFINE_list("only", list(SUITES), f"Suites to run, a subset of {SUITES}.")
_QUICK = flags.DEFINE_bool("quick", False, "Smaller sizes (for a smoke check of the benchmark itself).")
_OUT = flags.DEFINE_string("out", "bench.json", "Output JSON path.")
_WORKDIR = flags.DEFINE_string("workdir", None, "predict suite: a trained run (default models/pretrained); "
                                "energy suite: where to keep the trained run (default a temporary directory).")
_MOLECULES = flags.DEFINE_integer("molecules", None, "predict suite: test-split molecules (default 128, quick 16).")
_BUDGET = flags.DEFINE_float("budget_s", None, "energy suite: training wall-clock budget in s (default 1500, "
                             "quick 60).")
_PEER = flags.DEFINE_enum("peer", None, ["mace"], "energy suite: also train PyTorch MACE for the same budget "
                          "(needs `pip install -e '.[peer]'` or --peer_python).")
_PEER_PYTHON = flags.DEFINE_string("peer_python", None, "energy suite: interpreter with torch and mace-torch "
                                   "(default this one).")


def main(argv):
  del argv
  unknown = sorted(set(_ONLY.value) - set(SUITES))
  if unknown:
    raise app.UsageError(f"--only: unknown suite(s) {unknown}; choose from {SUITES}")
  import jax  # after absl parsed flags, so --jax_* flags apply

  result = {
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "jax_backend": jax.default_backend(), "devices": jax.device_count()},
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "suites": {},
  }
  for name in _ONLY.value:
    t0 = time.perf_counter()
    extra = {}
    if name == "predict":
      extra = {"workdir": _WORKDIR.value, "molecules": _MOLECULES.value}
    elif name == "energy":
      extra = {"budget_s": _BUDGET.value, "peer": _PEER.value, "peer_python": _PEER_PYTHON.value,
               "workdir": _WORKDIR.value}
    result["suites"][name] = importlib.import_module(f"consist.bench.{name}").run(quick=_QUICK.value, **extra)
    result["suites"][name]["suite_wall_s"] = time.perf_counter() - t0
    print(f"[bench] {name}: done in {result['suites'][name]['suite_wall_s']:.1f} s", flush=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
