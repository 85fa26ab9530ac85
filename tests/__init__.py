"""Docket's tests by area: registry/, client/, torrent/, e2e/; shared helpers in support/."""
