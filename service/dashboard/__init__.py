"""The web dashboard: pages served by the API app, scripts and styles shipped in this package (no CDN)."""
