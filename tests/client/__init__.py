"""The `docket` client: CLI, registry client and pulls against fakes and hostile servers."""
