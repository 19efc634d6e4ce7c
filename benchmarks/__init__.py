"""Benchmarks of vllm-aimer on generated MoE checkpoints (`make bench`, see run.py)."""
