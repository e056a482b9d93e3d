"""Pipeline stages start from different weights: the seed is offset by the pipeline rank (as Megatron-LM does)."""

import json

import pytest

from helpers import ROOT, torchrun

SCRIPT = ROOT / "tests" / "dist" / "init_seeds.py"


@pytest.mark.parametrize(
    "nproc, overrides",
    [(4, ["parallel.pipeline=4"]), (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"])],
    ids=["pp4", "pp2-vpp2"],
)
def test_pipeline_stages_start_from_different_weights(tmp_path, nproc, overrides):
    out = tmp_path / "stages.json"
    torchrun(SCRIPT, "--out", str(out), *overrides, nproc=nproc)
    result = json.loads(out.read_text())
    assert result["stages"] == 4
    assert result["equal"] == [], f"stages {result['equal']} start from the same weights"
