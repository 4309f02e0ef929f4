"""Figures from layerlab result tables (matplotlib, Agg; PNG and SVG)."""
