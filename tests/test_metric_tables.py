"""The tables `dvc metrics show` prints: a row per file, and a stage's table within a screen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipelines.metric_tables import evaluate_rows, table_dir, unlearn_rows, write_table

DVC = str(Path(sys.executable).with_name("dvc"))


def test_evaluate_rows_put_sets_in_rows_and_models_in_columns():
    top1_err = {"m1": {"clean": 10.0, "aoa": 60.0}, "m2": {"clean": 20.0, "aoa": 70.0, "pgd": 80.0}}
    rows = evaluate_rows(top1_err)
    assert rows == {"clean": {"m1": 10.0, "m2": 20.0}, "aoa": {"m1": 60.0, "m2": 70.0}, "pgd": {"m2": 80.0}}
    for model, errors in top1_err.items():  # nothing lost or moved: the transpose read back
        assert errors == {s: r[model] for s, r in rows.items() if model in r}


def test_a_row_of_an_earlier_run_goes_and_the_full_record_stays(tmp_path):
    record = tmp_path / "metrics" / "evaluate.json"
    record.parent.mkdir()
    record.write_text("{}")
    write_table(record, {"clean": {"a": 1.0}, "pgd": {"a": 2.0}})
    write_table(record, {"clean": {"a": 1.5}})
    assert table_dir(record) == tmp_path / "metrics" / "tables" / "evaluate"
    assert sorted(p.name for p in table_dir(record).iterdir()) == ["clean.json"]
    assert json.loads((table_dir(record) / "clean.json").read_text()) == {"a": 1.5} and record.read_text() == "{}"
    write_table(record, {})  # a stage with nothing to tabulate (a zoo of untrained models): DVC's output exists
    assert table_dir(record).is_dir() and not any(table_dir(record).iterdir())


def test_each_stage_table_fits_a_screen_in_dvc_metrics_show(tmp_path):
    """Twelve models on seven sets, and two unlearning scenarios of nine methods: tables DVC prints within 200
    columns (the nested record printed 37,000 wide)."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=tmp_path, check=True)
    models = [f"model_{i:02d}" for i in range(12)]
    sets = ["clean", "aoa", "pgd", "mi-fgsm", "di-fgsm", "ti-fgsm", "si-fgsm"]
    write_table(tmp_path / "metrics/evaluate.json", evaluate_rows({m: {s: 12.34 for s in sets} for m in models}))
    unlearn = {sc: {m: {"UA": 1.0, "RA": 99.5, "TA": 94.25, "MIA": 50.0, "avg_gap": 3.5, "KL": 0.4}
                    for m in ["retrain", "original", "ft", "ga", "rl", "salun", "natmu", "sfr-on", "muso"]}
               for sc in ("random-10", "class-0")}
    write_table(tmp_path / "metrics/downstream/unlearn.json", unlearn_rows(unlearn))
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: 'true'\n    metrics:\n"
        "      - metrics/tables/evaluate:\n          cache: false\n      - metrics/downstream/tables/unlearn:\n"
        "          cache: false\n")
    for table, rows in (("metrics/tables/evaluate", len(sets)), ("metrics/downstream/tables/unlearn", 18)):
        shown = subprocess.run([DVC, "metrics", "show", table], cwd=tmp_path, capture_output=True, text=True,
                               check=True).stdout.splitlines()
        assert len(shown) == 1 + rows and max(map(len, shown)) <= 200, (table, max(map(len, shown)))
