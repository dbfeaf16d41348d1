"""SAEs: training and save/load through sae-lens (``training``), fidelity metrics and the SAE stage (``fidelity``),
feature cards (``features``)."""
