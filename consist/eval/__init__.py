"""Evaluation against accurate-level minima (BRIEF section 5).

structure: RMSD (Kabsch, heavy-atom, symmetry-corrected), bond-length and distance-matrix MAE.
physics:   accurate-level energy gap and residual forces of predictions; model-side diagnostics.
stats:     paired comparisons of arms on the same molecules; aggregation over seeds.
report:    the `Results` structure, Markdown/JSON tables and PNG plots.
run:       a model and the baselines on the molecules of a split (`launch.evaluate`, `consist.reproduce`).
"""
