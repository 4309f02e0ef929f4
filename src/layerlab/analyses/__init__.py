"""The built-in analyses, one module each: its :class:`layerlab.analysis.Analysis` contract (name, tables, config,
job, and where its figures, report summary, demo step and CLI command live). A module here imports nothing heavy:
the job and the rest are imported when used. Adding an analysis is adding a module here (or, for your own, a
module named in ``$LAYERLAB_PLUGINS`` or a sweep's ``plugins:``)."""
