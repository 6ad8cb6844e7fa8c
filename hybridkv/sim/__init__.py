"""Hit-rate simulator: traces, model layouts, replay (imports no vLLM)."""
