"""SMILES / SDF / XYZ in, predicted 3D structures with energies out (`python -m launch.predict`).

  molecules  input molecules (RDKit, explicit hydrogens) -> records, start structures, model checks
  writers    SDF (bond graph kept) and extended-XYZ output, written atomically
  run        the batched prediction driver with progress and a per-molecule failure summary
"""
