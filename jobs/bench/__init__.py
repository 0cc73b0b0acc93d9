"""Measure scoring and training speed side by side: ours against the seed's way and the HF pipeline.

Run as (CPU, tiny nf4 Mistral built in place, nothing downloaded; 4 min on 2 quiet cores, ~15 on busy ones):

    python -m jobs.bench --out runs/bench/cpu.json

Smoke size (what tests/test_bench.py runs, under a minute):

    python -m jobs.bench --smoke --items seed,pipeline,predictor,padding,dedup,coldstart --out /tmp/bench.json

GPU (full-size Mistral-7B architecture with random weights, nf4 + LoRA; Ray is never imported),
beside the anchor (plain transformers + bitsandbytes, eager and compiled), with the real scoring path:

    python -m jobs.bench --device cuda --items gpu,realpath --out runs/bench/gpu.json

A lent device runs it through `bash jobs/bench/gpu_session.sh` (the wheels it needs, the GPU
tests, this bench and the Ray jobs on one GPU; docs/performance.md, issue 27).

Why it is built this way: the CPUs it runs on are shared and noisy, so every variant runs once per
round, the rounds interleave the variants (in a rotating order), and the table reports the median
with min and max, and each variant's ratio to the baseline measured in the same rounds. The
figures are rows/s on one artifact and one set of rows; a ratio is the thing to compare between
machines, not the absolute rate.

Items (--items, default all but gpu): seed (1: every row EOS-padded to the longest row of the set, batch 25, no
attention mask, the logit read at the last position), pipeline (2: transformers'
text-classification pipeline at its best batch size), predictor (3: clf_core.model.predict), label
(4: jobs.label end to end through Ray Data on local files, on the account rows and on a ledger
--label-scale times larger, which splits its time into a per-run and a per-row cost), padding (5), dedup (6: a ledger with
~90% repeated lines, cold and warm label cache, vs no dedup), coldstart (7: quantize on load vs a
pre-quantized base), train (8: Ray Train epoch vs the plain torch loop), gpu (the --device cuda
sweep: plain transformers + bitsandbytes nf4 eager and compiled, ours before issue 27 and now, the
ratios and the profiler's top ops; with --device cpu --gpu-size tiny it checks that code path in
seconds), realpath (opt-in: Predictor on --realpath-rows real-length ledger lines, its time split
into tokenize / forward / rest and its ratio to the forward alone on the same batches; on the GPU
item's model when that runs), compile (opt-in, CPU: Predictor as before issue 27, with the LoRA
merged, and compiled, with the first call's compile time and the shapes compiled), calibration
(opt-in, ~10 min: the default model trained on three splits of the packaged chart; held-out ECE and
Brier before and after calibration, and what the default review threshold flags and catches),
scale (opt-in, ~1 h: `python -m jobs.label` as its own process at --scale-rows, and with label
caches of --scale-cache entries; wall time, rows/s, peak RSS of the driver and of each actor kind).
"""

