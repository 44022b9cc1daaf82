"""The leaderboard's ranking over folds, its spread notes and its files, from known per-fold figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.evaluation.leaderboard import Entry, ranked, spread_note, table, write_leaderboard


def entry(name: str, dice: list[float], **extra: object) -> Entry:
    row = Entry(name, **extra)
    for value in dice:
        means = {"dice_mean": value, "dice_spleen": value, "hd95_spleen": 10 * (1 - value), "cases": 4.0}
        row.add_fold(means, {"seconds": 120.0, "peak_gib": 2.0}, {"seconds": 8.0, "peak_gib": 1.5})
    row.parameters, row.epochs = 1000, [10] * len(dice)
    return row


def test_rows_are_ranked_by_mean_dice_over_folds_and_failures_go_last() -> None:
    best, second, broken = entry("a", [0.9, 0.8]), entry("b", [0.7, 0.7]), Entry("c", failure="exit status 1")
    assert [e.name for e in ranked([second, broken, best])] == ["a", "b", "c"]
    assert best.mean("dice_mean") == pytest.approx(0.85)
    assert best.std("dice_mean") == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.9 and 0.8
    assert best.infer_seconds_per_case == [2.0, 2.0]  # 8 s over the 4 cases of each fold


def test_a_gap_inside_the_fold_spread_is_called_out() -> None:
    leader, close, far = entry("a", [0.9, 0.8]), entry("b", [0.82, 0.8]), entry("c", [0.6, 0.62])
    assert "within the fold spread of a" in spread_note(close, leader)
    assert spread_note(far, leader) == ""
    assert spread_note(leader, leader) == ""


def test_table_and_files(tmp_path: Path) -> None:
    header, rows = table([entry("b", [0.7]), entry("a", [0.9]), Entry("c", failure="exit status 2")])
    assert header[:4] == ["rank", "model", "mean Dice", "dice_spleen"] and "hd95_spleen" in header
    assert [row[1] for row in rows] == ["a", "b", "c"] and all(len(row) == len(header) for row in rows)
    assert rows[0][2] == "0.900" and rows[2][-1] == "exit status 2"
    markdown, html = write_leaderboard([entry("a", [0.9, 0.8])], tmp_path, "budget: 1 epochs")
    assert "| 1 | a | 0.850 ± 0.071 |" in markdown.read_text()
    assert "<td>a</td>" in html.read_text()
