"""`vllm-aimer fit`: how far a MoE model must be pruned to fit on N GPUs.

Everything here is arithmetic on a model's shape; no weight is read.

- `options`: the user's options, checked (`fit_options`).
- `sizing`: the model's shape and weight bytes, from safetensors headers or from
  config.json through the family's `ShapeModel` (`load_model_facts`).
- `solver`: the smallest uniform prune count that fits each GPU count, and the
  `vllm serve` command (`plan_fit`).
- `render`: the answer as text (`render_fit`) or JSON (`fit_json`).
"""

from __future__ import annotations

from vllm_aimer.fit.options import FitOptions, fit_options
from vllm_aimer.fit.render import fit_json, render_fit
from vllm_aimer.fit.sizing import (ModelFacts, facts_for_checkpoint, facts_from_checkpoint,
                                   facts_from_config, kv_cache_bytes_per_token,
                                   load_model_facts)
from vllm_aimer.fit.solver import Fit, FitReport, fit_on, kv_heads_per_gpu, plan_fit

__all__ = ["FitOptions", "fit_options", "ModelFacts", "load_model_facts", "facts_from_config",
           "facts_from_checkpoint", "facts_for_checkpoint", "kv_cache_bytes_per_token",
           "Fit", "FitReport", "fit_on", "plan_fit", "kv_heads_per_gpu", "render_fit",
           "fit_json"]
