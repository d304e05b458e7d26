"""Bridges to other libraries' pipelines (diffusers: `teacache_models.integrations.diffusers`)."""
