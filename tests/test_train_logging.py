"""MetricsLogger: JSONL + TensorBoard + console bar with ETA; non-zero processes write nothing."""

import io
import json

from consist.metrics_log import MetricsLogger


def test_writes_jsonl_tensorboard_and_progress(tmp_path):
  console = io.StringIO()
  log = MetricsLogger(tmp_path, total_steps=100, start_step=0, stream=console, enabled=True)
  log.write("train", 10, {"loss": 1.5, "lr": 1e-3, "energy_mse": 0.25, "finite": 1.0})
  log.write("train", 20, {"loss": 1.0, "lr": 1e-3, "energy_mse": 0.125})
  log.write("val", 20, {"loss": 2.0})
  log.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(l["split"], l["step"], l["loss"]) for l in lines] == [("train", 10, 1.5), ("train", 20, 1.0),
                                                                 ("val", 20, 2.0)]
  events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 100
  out = console.getvalue().splitlines()
  assert out[0].startswith("step 10/100 [##") and "ETA" in out[0] and "energy_mse 0.25" in out[0]
  assert "finite" not in out[0]
  assert out[2] == "[val @ 20] loss 2"
  # A resumed run appends.
  log = MetricsLogger(tmp_path, total_steps=100, start_step=20, stream=io.StringIO(), enabled=True)
  log.write("train", 30, {"loss": 0.5})
  log.close()
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_only_process_zero_writes(tmp_path):
  console = io.StringIO()
  log = MetricsLogger(tmp_path / "w", total_steps=10, stream=console, enabled=False)
  log.write("train", 1, {"loss": 1.0})
  log.message("hello")
  log.close()
  assert not (tmp_path / "w").exists() and console.getvalue() == ""
