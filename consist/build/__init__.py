"""Multi-fidelity dataset builder: SMILES source -> levels of theory -> consist dataset (issue 3)."""
