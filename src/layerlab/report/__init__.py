"""`layerlab report DIR`: one self-contained HTML page of everything in an output folder.

Collecting (:mod:`.collect`: the folder into plain frames) and rendering (:mod:`.page`: a pure function of them)
are separate; the words (:mod:`.text`), the per-table summaries (:mod:`.summaries`) and the interactive views
(:mod:`.views`) are registries a new analysis adds to. The page needs no network: plotly.js, CSS and JS are inline.
"""
from __future__ import annotations

from ..criticality.tables import criticality_accuracy
from .collect import AnalysisData, ReportData, collect
from .page import render, table_html, write_report
from .summaries import SUMMARIES, generic_summary, summary
from .text import INTROS, intro, title
from .views import VIEWS, view

__all__ = ["INTROS", "SUMMARIES", "VIEWS", "AnalysisData", "ReportData", "collect", "criticality_accuracy",
           "generic_summary", "intro", "render", "summary", "table_html", "title", "view", "write_report"]
