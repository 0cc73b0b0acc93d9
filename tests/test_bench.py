"""jobs.bench at smoke size: every item runs and writes the figures the README table is made of.

Speed targets are not asserted here (a shared CPU is too noisy for that); the bench reports them.
"""

import json
import subprocess
import sys

import pytest

from jobs.bench.main import main as run_bench
from jobs.bench.measure import interleaved, summarize
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


def test_gpu_sweep_code_path_runs_on_cpu_without_ray(tmp_path):
    """The --device cuda code at a tiny size: the same function, and Ray is never imported."""
    out = tmp_path / "gpu.json"
    code = ("import sys; from jobs.bench.main import main; "
            f"rc = main(['--items', 'gpu', '--gpu-size', 'tiny', '--smoke', '--out', {str(out)!r}]); "
            "assert rc == 0; assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    gpu = json.loads(out.read_text())["gpu"]
    assert [r["batch_size"] for r in gpu["sweep"]] == [4, 8, 4, 8]
    assert {r["dtype"] for r in gpu["sweep"]} == {"float16", "bfloat16"}
    assert all(r["rows_per_s"] > 0 for r in gpu["sweep"]) and gpu["flops_per_token"] > 0


def test_interleaved_rounds_rotate_the_order_and_time_every_variant():
    order = []

    def variant(name, rows):
        return lambda: order.append(name) or rows

    rates = interleaved({"a": variant("a", 10), "b": variant("b", 20), "c": variant("c", 30)}, rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]   # no variant always runs first
    assert {k: len(v) for k, v in rates.items()} == {"a": 3, "b": 3, "c": 3}
    assert summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "runs": 4}


def test_unknown_item_names_the_flag_and_the_choices():
    with pytest.raises(SystemExit, match="--items warp: unknown; choose from seed"):
        run_bench(["--items", "warp"])


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
