"""Configuration: every section of a run and `PipelineConfig`, which composes them (pydantic only)."""
