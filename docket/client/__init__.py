"""The ``docket`` client: push images to a Docket registry, pull them through BitTorrent, list them.

Modules: ``cli`` (click edge), ``api`` (registry HTTP), ``dockerops`` (local daemon), ``push`` (layer push),
``pull`` (the pull engine: plan and loop, no click), ``transfer`` (one blob's job: engine, HTTP fallback),
``records`` (the image record and its checks), ``cache`` (the --location cache), ``seeding`` (tracker probe and
seeding policy), ``http_fetch`` (resumable HTTP blob fetch), ``layers`` (docker save/load tar streams),
``digests``, ``peer`` (which loopback address our peer uses), ``progress`` (display chosen by context).
"""
