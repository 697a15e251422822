"""Built-in recipes (YAML)."""
