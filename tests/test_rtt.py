"""``make bench-rtt`` in miniature: four servers, two sizes, the output's
shape (never its timings)."""

from __future__ import annotations

import json

import pytest

from pvemu.scripts import rtt


def test_rtt_json_reports_every_server_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert rtt.main(["--rounds", "4", "--warmup", "1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == 2
    assert (document["rounds"], document["warmup"]) == (4, 1)
    rows = document["results"]
    assert [(row["server"], row["records"]) for row in rows] == [
        (server, records) for records in rtt.SIZES for server in rtt.SERVERS
    ]
    for row in rows:
        assert row.keys() == {
            "name",
            "server",
            "records",
            "n",
            "median_us",
            "p99_us",
            "x_trio_echo",
        }
        assert row["n"] == 4
        assert 0 < row["median_us"] <= row["p99_us"]
        assert row["x_trio_echo"] > 0
    assert all(row["x_trio_echo"] == 1.0 for row in rows if row["server"] == "trio echo")


def test_rtt_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert rtt.main(["--rounds", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for server in rtt.SERVERS:
        assert server in out
    assert "x trio echo" in out
