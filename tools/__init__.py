"""Developer tools: guest image builder, demo. Importable as `tools.*` from the repo root."""
