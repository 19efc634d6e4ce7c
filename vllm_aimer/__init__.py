"""vllm-aimer: load-time AIMER expert pruning for Mixture-of-Experts models in vLLM."""

__version__ = "0.1.0"
