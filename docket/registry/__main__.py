"""``python -m docket.registry`` is ``docket-registry``."""

from docket.registry.cli import main

main(prog_name="docket-registry")
