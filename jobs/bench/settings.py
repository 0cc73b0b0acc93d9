"""jobs.bench's settings: every flag declared once (clf_core.settings), and the items."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from clf_core import cli
from clf_core.model.config import SCORING_BATCH_SIZE
from clf_core.settings import check, setting

CPU_ITEMS = ("seed", "pipeline", "predictor", "label", "padding", "dedup", "coldstart", "train")
# "gpu" is the --device cuda sweep; named as an item it runs on the CPU (with --gpu-size tiny) to
# check its code path.
# Opt-in items (minutes each, not in the default set): calibration trains the default backbone
# on the packaged chart three times; scale runs jobs.label on millions of rows; compile compares
# the compiled and eager forward on the CPU (a minute of compiling); realpath times Predictor on
# --realpath-rows ledger lines (on the GPU model when the gpu item runs, else on the CPU artifact).
# review (the review loop on charts the model never saw) and corrections (retraining with the
# reviewers' answers) train the default model per seed: minutes each, opt-in.
ALL_ITEMS = CPU_ITEMS + ("gpu", "calibration", "scale", "compile", "realpath", "review", "corrections")


@dataclass
class BenchSettings:
    out: str = setting("Where to write the JSON results.", default="runs/bench/bench.json")
    workdir: str = setting("Where the tiny backbone, artifact and temporary files go (default: a temp dir).",
                           default="")
    model: str = setting("An existing artifact to score with (default: train a tiny nf4 Mistral on the "
                         "packaged chart of accounts).", default="")
    items: str = setting(f"Comma-separated items to run, from {','.join(ALL_ITEMS)}.", default=",".join(CPU_ITEMS))
    rows: int = setting("Score only the first N real account rows (0 = all 1,129).", default=0)
    text_column: str = setting("Column of the packaged chart of accounts to score.", default="full_path")
    rounds: int = setting("Interleaved rounds per scoring variant (median, min, max over them).", at_least=1, default=5)
    batch_size: int = setting("Our predictor's rows per forward pass (jobs.label's default).",
                              at_least=1, default=SCORING_BATCH_SIZE)
    label_scale: int = setting("The label item also runs on a ledger this many times larger (every line "
                               "distinct), beside the predictor on the same rows: the job's per-run cost "
                               "then shows apart from its per-row cost.", at_least=1, default=20)
    pipeline_batch_sizes: str = setting("HF pipeline batch sizes tried; the best one is then timed.",
                                        default="1,16,64")
    ledger_nights: int = setting("Nights of synthetic ledger for the dedup item (more nights, more repeats).",
                                 at_least=1, default=10)
    train_rows: int = setting("Labeled rows for the Ray Train item (epoch = train + validation pass).", default=240)
    train_rounds: int = setting("Interleaved rounds of the training item.", at_least=1, default=2)
    coldstart_hidden: int = setting("Hidden size of the backbone for the cold-start item (0 = the scoring "
                                    "backbone). Larger shows what quantizing on start costs.", default=1024)
    smoke: bool = setting("Tiny sizes and one round: checks that every item runs (tests).", default=False)
    device: str = setting("'cpu': the items above. 'cuda': the GPU throughput sweep of a full-size "
                          "Mistral-7B (random weights, nf4 + LoRA).", default="cpu", choices=("cpu", "cuda"))
    gpu_size: str = setting("'7b' (Mistral-7B-v0.1 architecture) or 'tiny' (same code path, seconds, any device).",
                            default="7b", choices=("7b", "tiny"))
    gpu_batch_sizes: str = setting("Batch sizes of the GPU sweep.", default="64,128,256,512,1024")
    gpu_dtypes: str = setting("Compute dtypes of the GPU sweep.", default="float16,bfloat16")
    gpu_tokens: int = setting("Tokens per row in the GPU sweep (ledger lines are ~20).", at_least=1, default=20)
    gpu_iters: int = setting("Timed forward passes per GPU configuration (after 2 warm-up passes).",
                             at_least=1, default=10)
    gpu_anchor_dtypes: str = setting("Compute dtypes at which the GPU item also times the anchor: plain transformers + "
                                     "bitsandbytes nf4 (no LoRA, no project code), eager and torch.compile'd. Empty: "
                                     "none.", default="bfloat16")
    compile: str = setting("model.compile of our predictor in the gpu and realpath items: auto (on CUDA), on, off.",
                           default="auto", choices=("auto", "on", "off"))
    realpath_rows: int = setting("Distinct ledger lines of the realpath item (the packaged chart, one line per "
                                 "property, shuffled).", at_least=1, default=200_000)
    realpath_rows_per_call: int = setting("Texts per Predictor.predict call in the realpath item, as jobs.label's "
                                          "actors get them (--rows-per-call).", at_least=1, default=1024)
    realpath_rounds: int = setting("Rounds of the realpath item, each the forward alone then the real path "
                                   "(medians).", at_least=1, default=3)
    realpath_dtype: str = setting("Compute dtype at which the GPU item runs the realpath item.", default="bfloat16")
    scale_rows: str = setting("Ledger sizes of the scale item, rows (about --scale-distinct of them distinct).",
                              default="100000,1000000,4000000")
    scale_partitions: int = setting("Daily partitions of each scale ledger.", at_least=1, default=30)
    scale_distinct: float = setting("Share of distinct texts in the scale ledgers.", default=0.1,
                                    above=0.0, at_most=1.0)
    scale_cache: str = setting("Label cache sizes (entries) the scale item compares on its smallest ledger.",
                               default="20000,2000000")
    scale_rounds: int = setting("Runs per size of the scale item (medians).", at_least=1, default=3)
    calibration_seeds: str = setting("Split seeds of the calibration item (train/validation/test 65/10/25 of the "
                                     "packaged chart, the default backbone and settings).", default="200,1,2")
    review_seeds: str = setting("Seeds of the review and corrections items: each holds out other charts of the "
                                "packaged chart of accounts and trains the default model (or --review-config's) "
                                "on the rest.",
                                default="200,1,2")
    review_config: str = setting("Training config (YAML, local or fsspec URI) of the review and corrections items' "
                                 "models, e.g. configs/mistral_7b_qlora.yaml on a GPU machine that has its weights "
                                 "(default: the small offline backbone, on the CPU).", default="")
    review_holdout: float = setting("Share of the packaged chart's rows the review items hold out, as whole charts "
                                    "the model never sees.", above=0, default=0.25)
    review_budget: float = setting("--review-budget of the review items' label runs.", above=0, default=0.10)
    review_audit_fraction: float = setting("--audit-fraction of the review items' label runs (larger than the "
                                           "default 1%: a held-out chart is a few hundred rows).", above=0,
                                           default=0.2)

    def item_list(self) -> list[str]:
        return [x.strip() for x in self.items.split(",") if x.strip()]

    def validate(self) -> "BenchSettings":
        unknown = [x for x in self.item_list() if x not in ALL_ITEMS]
        found = [f"--items {','.join(unknown)}: unknown; choose from {','.join(ALL_ITEMS)}"] if unknown else []
        if self.review_config and {"review", "corrections"} & set(self.item_list()):
            # read now, not after the first seed's minutes of work
            from clf_core.errors import ClfError
            from clf_core.model.config import ClassifierConfig

            try:
                ClassifierConfig.load(self.review_config)
            except ClfError as exc:
                found.append(f"--review-config {self.review_config}: {exc}")
        return check(self, found)


def build_parser() -> argparse.ArgumentParser:
    import jobs.bench

    return cli.build_parser("python -m jobs.bench", jobs.bench.__doc__, BenchSettings)
