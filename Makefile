# The two commands the README promises. Both set up .venv first (idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup:
	@bash scripts/setup-venv.sh

demo: setup
	.venv/bin/vllm-aimer demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf .demo .pytest_cache

# On an NVIDIA GPU with vLLM (CUDA build): fidelity, memory, speed, TP/EP (about 5-8 min).
.PHONY: gpu-check
gpu-check: setup
	$(PY) -m benchmarks.gpu_check

# Benchmarks on generated multi-GB checkpoints (15-25 min; BENCH_ARGS=--quick: 4-6 min).
.PHONY: bench
BENCH_ARGS ?=
bench: setup
	$(PY) -m benchmarks.run $(BENCH_ARGS)
