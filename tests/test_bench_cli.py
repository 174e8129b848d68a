"""``fastmeta bench`` as a program: reports, Ctrl-C and failing suites, without timing anything
real (tests assert behaviour; speed lives in benchmarks/)."""

from __future__ import annotations

import json

import pytest

from fastmeta.bench import harness, suites
from fastmeta.cli import main


def _timing(seconds: float) -> harness.Timing:
    return harness.Timing(seconds, seconds * 0.9, seconds * 1.1, blocks=10)


def _row(name: str) -> harness.Row:
    return harness.Row(name=name, ours=_timing(1e-3), baselines={"torch": _timing(3e-3)},
                       floor=_timing(5e-4))


def _fake_suite(name: str, rows, *, fail_after: BaseException | None = None) -> suites.Suite:
    def generate(*, quick, progress):
        for r in rows:
            progress(f"{name}: {r.name}")
            yield r
        if fail_after is not None:
            raise fail_after

    return suites.Suite(name, f"fake {name}", ["torch"], generate)


def test_unknown_suite_is_refused(capsys):
    assert main(["bench", "--only", "nope"]) == 2
    assert "unknown suite(s) nope" in capsys.readouterr().err


def test_table_json_and_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suites, "select", lambda only: [_fake_suite("a", [_row("x"), _row("y")])])
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "--json", str(out_json), "--plot", str(out_png)]) == 0
    table = capsys.readouterr().out
    assert "3.00x" in table and "50%" in table  # ratio 3 ms / 1 ms; floor 0.5 ms / 1 ms
    payload = json.loads(out_json.read_text())
    assert [r["name"] for r in payload["rows"]] == ["x", "y"]
    assert payload["rows"][0]["speedup"]["torch"] == pytest.approx(3.0)
    for key in ("cpu", "torch_threads", "isa", "torch", "triton", "git_sha"):
        assert key in payload["machine"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bench_with(tmp_path, monkeypatch, capsys, fake_suites):
    """Runs ``fastmeta bench`` over ``fake_suites``: ``(exit code, stdout, JSON payload)``."""
    monkeypatch.setattr(suites, "select", lambda only: fake_suites)
    out_json = tmp_path / "b.json"
    rc = main(["bench", "--json", str(out_json), "--plot", str(tmp_path / "b.png")])
    return rc, capsys.readouterr().out, json.loads(out_json.read_text())


def test_ctrl_c_reports_the_rows_finished_so_far(tmp_path, monkeypatch, capsys):
    rc, out, payload = _bench_with(tmp_path, monkeypatch, capsys, [
        _fake_suite("a", [_row("done")], fail_after=KeyboardInterrupt()),
        _fake_suite("b", [_row("never")]),
    ])
    assert rc == 130
    assert "interrupted: reporting the 1 row(s)" in out
    assert payload["interrupted"] is True
    assert [r["name"] for r in payload["rows"]] == ["done"]


def test_a_failing_suite_keeps_the_other_rows(tmp_path, monkeypatch, capsys):
    rc, out, payload = _bench_with(tmp_path, monkeypatch, capsys, [
        _fake_suite("a", [_row("kept")], fail_after=TypeError("no fused here")),
        _fake_suite("b", [_row("also kept")]),
    ])
    assert rc == 1
    assert "a: FAILED (TypeError: no fused here)" in out
    assert [r["name"] for r in payload["rows"]] == ["kept", "also kept"]
    assert payload["failures"] == {"a": "TypeError: no fused here"}


def test_every_registered_suite_is_selectable():
    assert {s.name for s in suites.select(None)} == set(suites.SUITES)
    assert [s.name for s in suites.select("adam, maml")] == ["adam", "maml"]
