"""Running checks: calling a candidate safely, caching references, records."""
