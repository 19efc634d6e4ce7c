"""Harnesses for the tests, the benchmarks and the demo, apart from the runtime: tiny
MoE checkpoints (`tiny`), the format encoders (`encoders`) and a `vllm serve`
process runner (`server`). Loading a model (`--load-format aimer`) and the offline
commands other than `demo` never import this package."""
