"""The registry: in-process apps (Flask test client) and docket-registry processes on their own."""
