"""The OpenAI-compatible endpoint: its routes, the HTTP server that runs them and its key."""
