"""jobs.bench at smoke size: every item runs and writes the figures the README table is made of.

Speed targets are not asserted here (a shared CPU is too noisy for that); the bench reports them.
"""

import json
import subprocess
import sys

import pytest

from jobs.bench.corrections import family_answer, family_keys
from jobs.bench.main import main as run_bench
from jobs.bench.measure import interleaved, summarize
from jobs.bench.review import train_model
from jobs.bench.scoring import nightly_ledger, per_run_and_per_row


def test_scoring_dedup_and_coldstart_items_write_their_figures(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run_bench(["--smoke", "--model", tiny_artifact, "--items", "seed,pipeline,predictor,padding,dedup,coldstart",
                       "--ledger-nights", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    scoring = result["scoring"]
    assert set(scoring["rates"]) == {"seed", "pipeline", "predictor"}
    assert all(r["median"] > 0 and r["runs"] == 1 for r in scoring["rates"].values())
    # each ratio is the variant's median over the baseline's, both from this run
    assert scoring["baseline"] == "seed" and scoring["ratios"]["predictor"] == pytest.approx(
        scoring["rates"]["predictor"]["median"] / scoring["rates"]["seed"]["median"])
    assert 0 < scoring["padding_efficiency"]["predictor"] <= 1 and 0 < scoring["padding_efficiency"]["seed"] <= 1
    dedup = result["dedup"]
    assert dedup["distinct_texts"] < dedup["rows"] and set(dedup["ratios"]) == {"no_dedup", "dedup_cold", "dedup_warm"}
    assert result["coldstart"]["seconds"]["prequantized"]["median"] > 0 and result["coldstart"]["ratio"] > 0
    measured = {t["target"] for t in result["targets"]}
    assert any(t.startswith("(3) predictor vs (1)") for t in measured) and any(t.startswith("(7)") for t in measured)
    assert result["machine"]["cpus"] and result["command"].startswith("python -m jobs.bench")
    printed = capsys.readouterr().out
    assert "(1) seed's way" in printed and "(3) clf_core Predictor" in printed and "-- targets" in printed


def test_gpu_item_code_path_runs_on_cpu_without_ray(tmp_path):
    """The --device cuda code at a tiny size: the same function, and Ray is never imported. Dynamo
    is off (TORCHDYNAMO_DISABLE) so the compiled variants run their code path without a minute of
    CPU compiling; tests/test_scoring_forward.py compiles for real."""
    import os

    out = tmp_path / "gpu.json"
    code = ("import sys; from jobs.bench.main import main; "
            f"rc = main(['--items', 'gpu,realpath', '--gpu-size', 'tiny', '--compile', 'on', '--smoke', "
            f"'--workdir', {str(tmp_path / 'work')!r}, '--out', {str(out)!r}]); "
            "assert rc == 0; assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray imported'")
    printed = subprocess.run([sys.executable, "-c", code], check=True, timeout=300, capture_output=True, text=True,
                             env={**os.environ, "TORCHDYNAMO_DISABLE": "1"}).stdout
    gpu = json.loads(out.read_text())["gpu"]
    # ours as it was and as it scores now at both dtypes; the anchor (no LoRA, no project code) at bf16
    runs = [(r["variant"], r["dtype"], r["batch_size"]) for r in gpu["sweep"]]
    assert runs == [(v, d, bs) for d, variants in (("float16", ("ours before", "ours")),
                                                   ("bfloat16", ("plain eager", "plain compiled", "ours before", "ours")))
                    for v in variants for bs in (4, 8)]
    assert all(r["rows_per_s"] > 0 and r["first_pass_s"] > 0 for r in gpu["sweep"]) and gpu["flops_per_token"] > 0
    ratios = {(r["what"], r["dtype"], r["batch_size"]) for r in gpu["ratios"]}
    assert {("ours / plain compiled", "bfloat16", 8), ("ours float16 / ours bfloat16", "float16", 8)} <= ratios
    assert set(gpu["profiles"]) == {f"{v} {d}" for d, vs in (("float16", ("ours before", "ours")),
                                                              ("bfloat16", ("plain eager", "plain compiled", "ours before",
                                                                            "ours"))) for v in vs}
    assert all(0 < op["share"] <= 1 for ops in gpu["profiles"].values() for op in ops)
    # the real scoring path ran on the same (compiled, merged) model at bf16, its time split
    realpath = gpu["realpath"]
    assert realpath["rows"] == 300 and realpath["compiled"] and realpath["merged_lora"] == 6
    assert realpath["rows_per_s"] > 0 and realpath["ratio_to_forward_only"] > 0 and realpath["ratio_to_sweep"] > 0
    assert set(realpath["split_s"]) == {"tokenize", "forward", "rest"} and realpath["split_s"]["forward"] > 0
    assert "top ops, ours bfloat16:" in printed and "time split: tokenize" in printed


def test_realpath_item_splits_the_predictors_time_on_cpu(tiny_artifact, tmp_path):
    out = tmp_path / "bench.json"
    assert run_bench(["--smoke", "--model", tiny_artifact, "--items", "realpath", "--out", str(out)]) == 0
    realpath = json.loads(out.read_text())["realpath"]
    # the CPU default: LoRA merged, eager; 300 distinct lines in calls of 128
    assert (realpath["rows"], realpath["rows_per_call"], realpath["compiled"], realpath["merged_lora"]) == (300, 128, False, 6)
    split = realpath["split_s"]
    assert split["tokenize"] > 0 and split["forward"] > 0
    assert sum(split.values()) == pytest.approx(realpath["total_s"], rel=0.05)
    assert 0 < realpath["padding_efficiency"] <= 1 and realpath["mean_tokens"] > 5


def test_compile_item_compares_before_eager_and_compiled_on_cpu(tiny_artifact, tmp_path):
    import torch._dynamo

    out = tmp_path / "bench.json"
    # the code path, not a minute of compiling; torch's own patch (a monkeypatch's undo would delete
    # the setting from torch's config module, which later compile tests then miss)
    with torch._dynamo.config.patch(disable=True):
        assert run_bench(["--smoke", "--model", tiny_artifact, "--items", "compile", "--out", str(out)]) == 0
    c = json.loads(out.read_text())["compile"]
    assert set(c["rates"]) == {"before", "eager", "compiled"} and c["ratios"]["before"] == 1.0
    assert c["merged_lora"] == 6 and c["max_shapes"] == 24 and c["recompiles"] >= 1
    assert max(c["max_abs_diff"].values()) < 1e-4


def test_interleaved_rounds_rotate_the_order_and_time_every_variant():
    order = []

    def variant(name, rows):
        return lambda: order.append(name) or rows

    rates = interleaved({"a": variant("a", 10), "b": variant("b", 20), "c": variant("c", 30)}, rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]   # no variant always runs first
    assert {k: len(v) for k, v in rates.items()} == {"a": 3, "b": 3, "c": 3}
    assert summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "runs": 4}


def test_a_corrected_texts_family_is_its_parent_section_or_its_first_word():
    """The corrections item's families (issue 25: "same parent account, or the same first words")."""
    assert family_keys("Export Services", "Export Services") & family_keys("Export Sales", "Export Sales")
    assert not family_keys("Export Services", "Export Services") & family_keys("Fuel Tax Credits", "Fuel Tax Credits")
    assert family_keys("Travel Expenses Airfare", "Airfare") & family_keys("Travel Expenses Hotels", "Hotels")
    assert family_keys("Repairs - Plumbing", "Repairs - Plumbing") & family_keys("Repairs Roof", "Repairs Roof")
    # a catch-all first word names no family on its own
    assert not family_keys("Other Income", "Other Income") & family_keys("Other Expenses", "Other Expenses")


def test_a_family_rows_answer_is_the_one_its_families_were_given_most():
    corrected = {"Repairs - Plumbing": "Expense", "Repairs - Roof": "Expense", "Repairs Recharged": "Income",
                 "Travel Expenses Airfare": "Expense"}
    names = {"Travel Expenses Airfare": "Airfare", "Travel Expenses Hotels": "Hotels"}
    answer = family_answer(corrected, names)
    assert answer("Repairs Gutters") == "Expense"                  # 2 votes to 1
    assert answer("Travel Expenses Hotels") == "Expense"           # the parent section
    assert answer("Rent Income") is None                           # no corrected text in its families


def test_review_items_train_with_the_config_they_are_given(tmp_path):
    """--review-config: the recipe the review and corrections items train (e.g. the 7B one on a GPU)."""
    import pandas as pd

    from clf_core.model.artifact import open_artifact

    config = tmp_path / "recipe.yaml"
    config.write_text("lora:\n  r: 4\n  alpha: 8\ntrain:\n  epochs: 1\n  batch_size: 8\n")
    rows = pd.DataFrame({"full_path": [f"Rent Income {i}" for i in range(10)] + [f"Repairs {i}" for i in range(10)],
                         "label": ["Income"] * 10 + ["Expense"] * 10})
    made = open_artifact(train_model(rows, 1, tmp_path / "model", config=str(config))).config()
    assert (made.lora.r, made.train.epochs, made.data.text_column) == (4, 1, "full_path")


def test_a_review_config_that_cannot_be_read_stops_the_bench_before_any_work(tmp_path, capsys):
    assert run_bench(["--items", "corrections", "--review-config", str(tmp_path / "nope.yaml"),
                      "--workdir", str(tmp_path / "work")]) == 2
    assert f"--review-config {tmp_path / 'nope.yaml'}: " in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_unknown_item_names_the_flag_and_the_choices(capsys):
    assert run_bench(["--items", "warp"]) == 2       # a bad argument, as for every job (clf_core.cli)
    assert "--items warp: unknown; choose from seed" in capsys.readouterr().err


@pytest.mark.integration
def test_label_and_train_items_run_on_local_ray(tiny_artifact, ray_cluster, tmp_path):
    out = tmp_path / "bench.json"
    assert run_bench(["--smoke", "--model", tiny_artifact, "--items", "predictor,label,train,calibration",
                       "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    scoring = result["scoring"]
    assert scoring["rates"]["label"]["median"] > 0 and scoring["label_vs_predictor"] > 0
    # the second, larger ledger (smoke: twice the rows, every line distinct) beside the predictor on it
    assert scoring["large_rows"] == 2 * scoring["rows"]
    assert scoring["rates"]["label_large"]["median"] > 0 and scoring["label_large_vs_predictor_large"] > 0
    assert "label_per_row" in scoring
    # every run's partition commit was timed: one per round of each ledger size
    commits = scoring["label_commit_seconds_per_partition"]
    assert commits["runs"] == 2 * scoring["rates"]["label"]["runs"] and 0 < commits["median"] < 60
    assert result["train"]["epoch_seconds"]["ray_train"]["median"] > 0 and result["train"]["ratio"] > 0
    # calibration: the held-out figures of a model trained in place, and the targets judged on them
    run = result["calibration"]["runs"][0]
    assert run["temperature"] > 0 and run["test_rows"] == 15 and 0 <= run["errors_caught"] <= run["errors"]
    assert {t["target"] for t in result["targets"]} >= {"calibrated ECE on the held-out split, median of seeds",
                                                         "share of held-out errors the default review flags"}


def test_two_ledger_sizes_split_the_label_job_into_per_run_and_per_row_cost():
    # 100 rows in 10 s and 1,100 rows in 20 s: 1,000 extra rows in 10 extra s = 100 rows/s per
    # row, and 9 s of each run that no row explains.
    split = per_run_and_per_row(100, [10.0, 10.0], 1100, [55.0, 55.0], [200.0])
    assert split["per_row_rows_per_s"]["median"] == pytest.approx(100.0)
    assert split["per_run_seconds"]["median"] == pytest.approx(9.0)
    assert split["per_row_vs_predictor"] == pytest.approx(0.5)
    # a round where the large ledger was no slower separates nothing
    assert per_run_and_per_row(100, [10.0], 1100, [200.0], [200.0]) is None
    assert nightly_ledger(["Rent", "Gas"], 2) == ["Rent - Property 000", "Gas - Property 000",
                                                        "Rent - Property 001", "Gas - Property 001"]


@pytest.mark.integration
def test_scale_item_runs_the_label_job_as_its_own_process_and_measures_it(ray_cluster, tmp_path):
    out = tmp_path / "bench.json"
    assert run_bench(["--smoke", "--items", "scale", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    scale = json.loads(out.read_text())["scale"]
    cached = scale["cache"]["500"]   # smoke size runs only the cache item
    # 2,000 rows, 10% distinct (200 texts); a cache of 500 entries holding half of them serves 100
    assert (cached["scored"], cached["cache_hits"]) == (100, 100)
    assert cached["rows_per_s"] > 0 and cached["driver_peak_rss_mib"] > 100
    for kind in ("TextScorer", "ApplyLabels"):  # both actor kinds were seen, their memory and start timed
        assert cached[f"{kind}_peak_rss_mib"] > 50 and cached[f"{kind}_start_s"] is not None
