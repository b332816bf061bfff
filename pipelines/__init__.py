"""Pipeline assembly and the `microfed` command line."""
