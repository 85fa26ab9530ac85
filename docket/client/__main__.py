"""``python -m docket.client`` = ``docket``."""

from docket.client.cli import main

main()
