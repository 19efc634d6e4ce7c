"""Test-only: make one rank's AIMER scores differ, as float rounding on another CPU
could for near-ties (tests/test_parallel.py puts this directory on PYTHONPATH).

Python imports `sitecustomize` at start-up in every process, so the patch is in place
before vLLM's worker imports the loader. On rank AIMER_TEST_PERTURB_RANK the two
experts either side of the prune boundary of the first MoE layer swap scores.
"""

import os

if os.environ.get("AIMER_TEST_PERTURB_RANK"):
    import vllm_aimer.scoring as _scoring

    _real = _scoring.score_checkpoint

    def _perturbed(*args, **kwargs):
        import torch.distributed as dist

        result = _real(*args, **kwargs)
        if dist.is_initialized() and dist.get_rank() == int(os.environ["AIMER_TEST_PERTURB_RANK"]):
            scores = result.scores[min(result.scores)]
            order = sorted(range(len(scores)), key=lambda e: -scores[e])
            mid = len(order) // 2
            a, b = order[mid - 1], order[mid]
            scores[a], scores[b] = scores[b], scores[a]
        return result

    _scoring.score_checkpoint = _perturbed
