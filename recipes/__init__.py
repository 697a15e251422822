"""lpc.recipes: recipe schema and built-in recipes."""
