"""End to end: real dockerd, docket-registry, ctorrent and opentracker together, network namespaces,
the benchmarks and scripts."""
