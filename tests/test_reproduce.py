"""consist.reproduce: the arms' run configs, the no-force-data dataset, and the experiment end to end."""

from pathlib import Path

import jax
import pytest

from consist.config import Config
from consist.data.bundled import SMOKE_DATASET
from consist.data.store import open_dataset
from consist.reproduce import (ARMS, REPORT_METRICS, Reproduction, ReproduceConfig, ReproduceError,
                               ReproduceStopped, load_config, run_config, write_no_force_data)

REPO = Path(__file__).resolve().parents[1]


def test_reproduction_configs_build():
  for name in ("reproduce_smoke", "reproduce_quickstart", "reproduce_short"):
    c = load_config(REPO / "configs" / f"{name}.py")
    rc = ReproduceConfig.from_dict(c.reproduce.to_dict())
    assert set(rc.arms) == set(ARMS) and not rc.stage1_force_data
    assert Config.from_config_dict(c.stage1).train.stage == 1
    s2 = Config.from_config_dict(c.stage2)
    assert s2.train.stage == 2 and s2.loss.optimality_weight > 0 and s2.loss.score_weight > 0
  with pytest.raises(ReproduceError, match=r"unknown config key\(s\) \['reproduce.sedes'\]"):
    ReproduceConfig.from_dict({"sedes": 2})
  with pytest.raises(ReproduceError, match=r"reproduce.arms: unknown \['consistency\+force'\]"):
    ReproduceConfig.from_dict({"arms": ["consistency+force"]})


def test_pretrained_reproduction_config_freezes_the_bundled_energy_model():
  c = load_config(REPO / "configs" / "reproduce_pretrained.py")
  rc = ReproduceConfig.from_dict(c.reproduce.to_dict())
  s1, s2 = Config.from_config_dict(c.stage1), Config.from_config_dict(c.stage2)
  assert rc.arms == ("multitask", "consistency") and not rc.noise and rc.refine_steps == 1
  assert rc.sampling("refine").steps == 1 and rc.sampling("ddim").steps == rc.steps == 200
  assert rc.sampling("ddim").eta == 1.0 and rc.sampling("refine").eta == 0.0  # ancestral de novo
  # results/ was made with one plain sample per molecule: pinned against the sampler's defaults
  assert (rc.sampling("ddim").noise_scale, rc.sampling("ddim").candidates) == (1.0, 1)
  consensus = ReproduceConfig.from_dict({**c.reproduce.to_dict(), "candidates": 16})
  assert consensus.sampling("ddim").candidates == 16 and consensus.sampling("refine").candidates == 1
  assert s1.train.init_mode == "energy_model" and s1.train.stage == 1
  for s in (s1, s2):
    assert s.loss.energy_weight == s.loss.forces_weight == 0 and s.model.trunk == "separate"
  assert s2.loss.consistency_level == 1 and not s2.loss.optimality_noise
  assert rc.t_star is None  # refine at the t* each arm's level was trained for


def test_stage1_workdir_is_every_seeds_stage1_and_is_not_trained(tmp_path, monkeypatch):
  c = load_config(REPO / "configs" / "reproduce_smoke.py")
  c.reproduce.update(seeds=3, arms=("multitask",), stage1_workdir=str(tmp_path / "s1"))
  repro = Reproduction(c, tmp_path / "w", log=lambda _: None)
  with pytest.raises(ReproduceError, match=r"reproduce.stage1_workdir: .*s1 holds no checkpoint"):
    repro.train_seed(0)
  trained = []
  monkeypatch.setattr(repro, "_train", lambda name, config, workdir: trained.append(
      (name, config["train"]["init_from"])))
  monkeypatch.setattr("consist.reproduce.latest_step", lambda workdir: 5 if workdir == tmp_path / "s1" else None)
  monkeypatch.setattr(repro, "_data_path", lambda force_data: "data")
  for seed in range(3):
    repro.train_seed(seed)
  assert trained == [(f"seed{s}/multitask", str(tmp_path / "s1")) for s in range(3)]


@pytest.mark.parametrize("interrupted", [False, True])
def test_an_arm_stopped_before_its_last_step_stops_the_reproduction(tmp_path, monkeypatch, interrupted):
  """SIGTERM / Ctrl-C inside one arm's training saves it and returns early: the reproduction must
  stop there (to be resumed), not go on to the next arm."""
  c = load_config(REPO / "configs" / "reproduce_smoke.py")
  c.reproduce.update(arms=("multitask", "consistency"), stage1_workdir=str(tmp_path / "s1"))
  repro = Reproduction(c, tmp_path / "w", log=lambda _: None)
  started = []

  def train(config, workdir):
    started.append(Path(workdir).name)
    return {"step": 3, "preempted": not interrupted, "interrupted": interrupted, "compile_s": 0.0}

  monkeypatch.setattr("consist.reproduce.train_and_evaluate", train)
  monkeypatch.setattr("consist.reproduce.latest_step", lambda workdir: 5 if workdir == tmp_path / "s1" else None)
  monkeypatch.setattr(repro, "_data_path", lambda force_data: "data")
  monkeypatch.setattr(repro, "_stage2_data_path", lambda force_data, stage1_dir: "data")
  how = "interrupted" if interrupted else "preempted"
  with pytest.raises(ReproduceStopped, match=rf"seed0/multitask {how} .* at step 3 of \d+ .*run the same command again"):
    repro.train_seed(0)
  assert started == ["multitask"]


def test_arm_configs_differ_only_in_consistency_and_force_data():
  base = load_config(REPO / "configs" / "smoke.py", "stage2")
  configs = {arm: run_config(base, seed=1, force_data=force, consistency=cons, data_path=f"data-{force}",
                             force_weight=7.0, init_from="stage1")
             for arm, (cons, force) in ARMS.items()}
  for arm, (cons, force) in ARMS.items():
    c = configs[arm]
    assert c["seed"] == base.seed + 1 and c["data"]["seed"] == base.data.seed + 1
    assert c["train"]["init_from"] == "stage1" and c["train"]["steps"] == base.train.steps
    assert c["loss"]["forces_weight"] == (7.0 if force else 0.0) and c["data"]["path"] == f"data-{force}"
    assert c["loss"]["optimality_weight"] == (base.loss.optimality_weight if cons else 0.0)
    assert c["loss"]["score_weight"] == (base.loss.score_weight if cons else 0.0)
    strip = lambda d: {**d, "loss": {k: v for k, v in d["loss"].items()
                                     if k not in ("forces_weight", "optimality_weight", "score_weight")},
                       "data": {k: v for k, v in d["data"].items() if k != "path"}}
    assert strip(c) == strip(configs["multitask"])


def test_no_force_data_keeps_only_equilibrium_records_without_forces(tmp_path):
  dest = write_no_force_data(SMOKE_DATASET, tmp_path / "nf", ["train", "val"])
  source, derived = open_dataset(SMOKE_DATASET), open_dataset(dest)
  assert sorted(derived.splits) == ["train", "val"]
  for split in ("train", "val"):
    src = [source[split][i] for i in range(len(source[split]))]
    out = [derived[split][i] for i in range(len(derived[split]))]
    eq = [r for r in src if r.is_equilibrium]
    assert len(out) == len(eq) < len(src) if split == "train" else len(out) == len(eq)
    assert all(r.is_equilibrium and r.forces is None and r.energy is not None for r in out)
    assert [r.energy for r in out] == [r.energy for r in eq]
  assert write_no_force_data(SMOKE_DATASET, dest, ["train"]) == dest  # reused, not rewritten


@pytest.mark.slow
def test_reproduce_smoke_two_seeds_then_resume(tmp_path):
  c = load_config(REPO / "configs" / "reproduce_smoke.py")
  c.stage1.train.update(steps=3, ckpt_every=3, eval_every=0)
  c.stage2.train.update(steps=2, ckpt_every=2, eval_every=0)
  # Two arms cover consistency on/off and force data on/off; MMFF94 as the "accurate" level keeps
  # the scoring of the untrained model's exploded denoise structures fast (xTB takes seconds each).
  c.reproduce.update(seeds=2, arms=("multitask", "consistency+forces"), modes=("denoise", "refine"),
                     samples=1, steps=2, level="mmff94", max_molecules=3)
  cache = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
  try:
    first = Reproduction(c, tmp_path / "w", show_progress=False)
    written = first.run(meta={"command": "test"})
    second = Reproduction(c, tmp_path / "w", show_progress=False)
    rewritten = second.run()
  finally:
    jax.config.update("jax_compilation_cache_dir", cache)
  results = tmp_path / "w" / "results"
  assert {p.name for p in written} == {"results.md", "summary.json", "results.json", "rmsd_ecdf.png",
                                       "energy_gap.png", "ephi_gap.png"}
  assert all(p.stat().st_size > 0 for p in written) and sorted(rewritten) == sorted(written)
  trained = [t["what"] for t in first.timings if "/" in t["what"] and not t["what"].startswith("evaluate")]
  assert trained == ["seed0/stage1", "seed0/multitask", "seed0/consistency+forces",
                     "seed1/stage1", "seed1/multitask", "seed1/consistency+forces"]
  assert len([t for t in first.timings if t["what"].startswith("evaluate")]) == 2 * 2 * 2
  assert second.timings == []  # nothing trained or evaluated again
  md = (results / "results.md").read_text()
  for text in ("## Mode `denoise`", "## Mode `refine`", "| multitask | 2 |", "| consistency+forces | 2 |",
               "| cheap (baseline) | 1 |", "| etkdg (baseline) | 1 |", "### `rmsd_sym_mean` (refine)",
               "energy-head force RMSE at the cheap structures"):
    assert text in md, text
  from consist.eval.report import Results  # pylint: disable=import-outside-toplevel
  res = Results.load(results / "results.json")
  assert sorted(res.arms) == ["consistency+forces", "multitask"] and sorted(res.arms["multitask"]) == ["0", "1"]
  assert set(REPORT_METRICS) <= set(res.arms["multitask"]["0"]["refine"])
  # A finished arm whose stage-1 run moved on is refused rather than silently mixed.
  c.stage1.train.steps = 4
  with pytest.raises(ReproduceError, match=r"initialised from stage-1 step 3, but .* is at step 4"):
    Reproduction(c, tmp_path / "w", show_progress=False).run()
