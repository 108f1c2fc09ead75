"""mammoseg.model_summary: the paper-variants table, as JSON and as text."""

import json

import pytest

from mammoseg import model_summary
from model import PAPER_VARIANTS


@pytest.fixture(scope="module")
def rows():
    return model_summary.summarize()


def test_json_lists_the_four_variants_with_their_costs(rows, capsys, monkeypatch):
    monkeypatch.setattr(model_summary, "summarize", lambda: rows)
    model_summary.run(None, as_json=True)
    parsed = json.loads(capsys.readouterr().out)
    assert [row["variant"] for row in parsed] == list(PAPER_VARIANTS)
    for row in parsed:
        assert row["paper_params"] == PAPER_VARIANTS[row["variant"]].paper_params
        assert row["ratio"] == pytest.approx(row["params"] / row["paper_params"])
        assert row["gflops"] > 0
        assert 0 < row["activation_gib_bf16"] < row["activation_gib_fp32"]


def test_table_names_every_variant_in_full(rows, capsys, monkeypatch):
    monkeypatch.setattr(model_summary, "summarize", lambda: rows)
    model_summary.run(None)
    out = capsys.readouterr().out
    for name in PAPER_VARIANTS:
        assert name in out
    assert "5,440,907" in out
