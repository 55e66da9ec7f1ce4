"""benchmarks/peers.sh --repeats: the count is checked before anything is installed, and
benchmarks/peers.py repeats gathers each repeat's pagedserve / best peer ratios and their medians."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_bad_repeat_count_is_refused_before_any_install(tmp_path):
    for bad in ("0", "-1", "two"):
        proc = subprocess.run(["bash", str(REPO / "benchmarks/peers.sh"), "--prefix", str(tmp_path / "p"), "--repeats", bad],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--repeats takes a positive count" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_repeats_prints_each_ratio_and_the_medians(tmp_path):
    tpots = {1: 0.86, 2: 1.07, 3: 0.97, 10: 0.88}  # repeat 10 after 3: numbered, not sorted as text
    for r, tpot in tpots.items():
        (tmp_path / f"repeat-{r}").mkdir()
        doc = {"pagedserve_over_best_peer": {"1": {"output_tok_s": 1 / tpot, "mean_tpot_ms": tpot}}}
        (tmp_path / f"repeat-{r}" / "peers.json").write_text(json.dumps(doc))
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/peers.py"), "repeats", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert "concurrency 1 mean_tpot_ms: 0.86 1.07 0.97 0.88  median 0.93" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["median"]["1"]["mean_tpot_ms"] == 0.925
    assert [Path(p).name for p in doc["repeats"]] == ["repeat-1", "repeat-2", "repeat-3", "repeat-10"]
    empty = subprocess.run([sys.executable, str(REPO / "benchmarks/peers.py"), "repeats", str(tmp_path / "repeat-1")],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode != 0 and "no repeat-N/peers.json" in empty.stderr
