# The two commands the README promises. Both set up .venv first (idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean train-demo-model demo-eval

setup:
	@bash scripts/setup-venv.sh

demo: setup
	.venv/bin/vllm-aimer demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything that starts no vLLM engine or server (tests marked `engine` are left out):
# the loop while changing code, a few minutes on 2 cores.
test-fast: setup
	$(PY) -m pytest -q -m "not engine" $(PYTEST_ARGS)

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

# The embedded demo model, retrained from the Python standard library's sources (a few
# minutes on 2 cores; the same Python and torch give the same bytes).
train-demo-model: setup
	$(PY) scripts/train_demo_model.py

# The README's eval sweep of the demo model: AIMER vs magnitude vs random at 0/25/50 %
# (7 vLLM engines; resumable). Its report and plot are copied to benchmarks/results/.
demo-eval: setup
	.venv/bin/vllm-aimer eval vllm_aimer/demo_model --data benchmarks/data/stdlib-heldout.jsonl \
	    --ratios 0,0.25,0.5 --criteria aimer,magnitude,random --max-model-len 512 \
	    --output benchmarks/work/demo-eval
	mkdir -p benchmarks/results/demo-eval
	cp benchmarks/work/demo-eval/eval.json benchmarks/work/demo-eval/eval.csv \
	    benchmarks/work/demo-eval/eval.png benchmarks/results/demo-eval/
	.venv/bin/vllm-aimer score vllm_aimer/demo_model --ratio 0.5 --plot --quiet \
	    --output benchmarks/work/demo-scores
	cp benchmarks/work/demo-scores/scores.png benchmarks/results/demo-eval/scores.png
