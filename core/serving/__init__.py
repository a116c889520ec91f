"""Serving: `mk serve`, the HTTP server over one runtime."""
