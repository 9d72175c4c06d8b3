"""The sampling and relaxation flags `launch.predict` and `launch.evaluate` share (one definition
each; `consist.inference.Sampling` and `consist.relax.RelaxSettings` document them)."""

from absl import flags

from consist.inference import MODES

MODE = flags.DEFINE_enum("mode", "refine", list(MODES), "Generation mode.")
SAMPLES = flags.DEFINE_integer("samples", 1, "Structures per molecule (K).")
STEPS = flags.DEFINE_integer("steps", 0, "DDIM steps (ddim, refine); 0 = the mode's default "
                             "(ddim 100, refine 1).")
ETA = flags.DEFINE_float("eta", None, "DDIM stochasticity in [0, 1]: 0 deterministic, 1 ancestral; "
                         "default: the mode's (ddim 1, refine 0; docs/DEVLOG.md, session 10).")
NOISE_SCALE = flags.DEFINE_float("noise_scale", None, "Scale of the noise re-injected at each "
                                 "stochastic DDIM step, in [0, 1] (< 1: lower temperature); default: the mode's "
                                 "(ddim 0.5, else 1).")
CANDIDATES = flags.DEFINE_integer("candidates", 0, "denoise / ddim: each structure is the medoid of this "
                                  "many sampled candidates (consist.consensus); 0 = the mode's default (ddim 16, "
                                  "else 1; 1 = one plain sample, 16x fewer network calls).")
T_STAR = flags.DEFINE_float("t_star", None, "Noise level refine takes the start (cheap) structure to, and "
                            "ddim at level >= 1 its level-0 sample, (0, 1]; default: the one the level asked "
                            "for was trained at (0.005 for level 0, the consistency t* for the accurate "
                            "level: 0.02 for the bundled model).")
NOISE = flags.DEFINE_bool("noise", False, "refine: noise the start structure to t_star (SDEdit); "
                          "default: start from it unnoised (deterministic).")
STRUCTURE_LEVEL = flags.DEFINE_integer("structure_level", None, "Structure level asked of the model "
                                       "(0 = its training structures' level, 1 = the accurate level "
                                       "consistency trains); default: the highest the model was trained for.")
RELAX_STEPS = flags.DEFINE_integer("relax_steps", 500, "Relaxation on the learned energy (batched "
                                   "BFGS, consist.relax): at most this many steps per molecule.")
