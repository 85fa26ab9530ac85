"""The ``docket`` client: push images to a Docket registry, pull them through BitTorrent, list them.

Layers: ``api`` (registry HTTP), ``dockerops`` (local daemon), ``pull`` (orchestration, no click),
``progress`` (display chosen by context), ``peer`` (which loopback address our ctorrent uses), ``cli`` (click edge).
"""
