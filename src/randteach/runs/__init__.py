"""Run folders and what leaves them: `rundir` (the folder, its files, its lock), `checkpoint`,
`sweep` (many runs from one file), `export` (encoders and embeddings), `tracking` (TensorBoard, W&B)."""
