"""Plots, the markdown report and its interactive HTML twin."""

from __future__ import annotations

from .html import write_report_html
from .markdown import comparison_sentence, with_ci, write_report
from .plots import plot_fronts

__all__ = ["comparison_sentence", "plot_fronts", "with_ci", "write_report", "write_report_html"]
