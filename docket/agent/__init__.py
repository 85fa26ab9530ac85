"""``docket agent``: the swarm behind the Registry V2 API, one process per host (kraken's agent, Dragonfly's
dfdaemon). ``service.py`` puts it together (``Agent``, ``AgentConfig``, ``serve``); ``app.py`` is the /v2 edge,
``fetcher.py`` the shared blob downloads through the pull engine, ``store.py`` the cache, ``upstream.py`` the
registry."""
