"""Built-in lm-evaluation-harness task configs over local data."""
