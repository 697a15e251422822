"""lpc.pipeline: one module per stage, artifacts and manifests, the resumable runner."""
