"""One vocabulary for corner-error statistics, one markdown-table writer, one stopwatch."""

import time

import numpy as np
import pytest
import torch

from stn_diffusers import metrics


class TestSummarizeErrors:
    def test_keys_and_values_on_a_known_set(self):
        errors = [0.5, 1.0, 1.5, 4.0, 10.0]
        summary = metrics.summarize_errors(errors)
        assert list(summary) == ["mean", "median", "p90", "under_1px", "under_2px", "under_5px"]
        assert summary["mean"] == pytest.approx(3.4)
        assert summary["median"] == pytest.approx(1.5)
        assert summary["p90"] == pytest.approx(np.percentile(errors, 90))

    def test_thresholds_are_strictly_below(self):
        # An error of exactly 1, 2 or 5 px does not count as under that threshold.
        summary = metrics.summarize_errors([1.0, 2.0, 5.0, 0.999])
        assert summary["under_1px"] == pytest.approx(1 / 4)
        assert summary["under_2px"] == pytest.approx(2 / 4)
        assert summary["under_5px"] == pytest.approx(3 / 4)

    def test_tensors_and_arrays_give_the_same_summary_as_lists(self):
        errors = [0.2, 3.0, 7.5, 1.25]
        expected = metrics.summarize_errors(errors)
        assert metrics.summarize_errors(torch.tensor(errors, dtype=torch.float32)) == pytest.approx(expected)
        assert metrics.summarize_errors(np.array(errors)) == pytest.approx(expected)

    def test_even_count_median_is_the_midpoint(self):
        # numpy's median (not torch's lower middle value): one definition in every report.
        assert metrics.summarize_errors(torch.tensor([1.0, 2.0, 3.0, 10.0]))["median"] == pytest.approx(2.5)

    def test_empty_input_is_a_value_error(self):
        with pytest.raises(ValueError, match="at least one corner error"):
            metrics.summarize_errors([])
        with pytest.raises(ValueError, match="at least one corner error"):
            metrics.summarize_errors(torch.empty(0))

    def test_summary_cells_follow_the_header(self):
        summary = metrics.summarize_errors([0.5, 1.5, 3.0, 8.0])
        cells = metrics.summary_cells(summary)
        assert len(cells) == len(metrics.SUMMARY_HEADER)
        assert metrics.SUMMARY_HEADER[:3] == ("mean", "median", "p90")
        assert cells[:2] == ["3.25", "2.25"]
        assert cells[3:] == ["25%", "50%", "75%"]  # under 1, 2 and 5 px


class TestMarkdownTable:
    def test_header_rule_and_rows(self):
        table = metrics.markdown_table(["method", "mean"], [["stn", 1.5], ["ecc", "0.25"]])
        assert table.splitlines() == ["| method | mean |", "|---|---|", "| stn | 1.5 |", "| ecc | 0.25 |"]

    def test_no_rows_gives_header_and_rule(self):
        assert metrics.markdown_table(["a", "b", "c"], []) == "| a | b | c |\n|---|---|---|"

    def test_row_length_mismatch_is_a_value_error_naming_the_row(self):
        with pytest.raises(ValueError, match="expected 2 cells in row 1 .* got 3"):
            metrics.markdown_table(["method", "mean"], [["stn", 1.0], ["ecc", 1.0, "extra"]])
        with pytest.raises(ValueError, match="expected 2 cells in row 0 .* got 1"):
            metrics.markdown_table(["method", "mean"], [["stn"]])


class TestTiming:
    def test_format_milliseconds(self):
        assert metrics.format_milliseconds(0.0123) == "12.3 ms"
        assert metrics.format_milliseconds(None) == "—"
        assert metrics.format_milliseconds(float("nan")) == "—"

    def test_seconds_since_counts_the_work_done(self):
        start = time.perf_counter()
        time.sleep(0.02)
        elapsed = metrics.seconds_since(start, torch.zeros(2))
        assert 0.02 <= elapsed < 5.0
