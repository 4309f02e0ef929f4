"""Demo steps, one module per analysis: the demo's side of each analysis, kept out of the analysis itself."""
