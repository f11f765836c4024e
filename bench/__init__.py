"""Benchmarks for cfcam_gpu (kept out of the default test run: ``pytest tests/``).

``python -m bench.run ...``  side-by-side throughput table (see bench/README.md);
``pytest bench/``            pytest-benchmark micro-benchmarks of the post-processing stages;
``bash bench/gpu.sh OUTDIR`` the CUDA suite for a GPU machine.
"""
