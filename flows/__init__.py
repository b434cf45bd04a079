"""tidlq flows and the `tidlq` command line: they only wire the stages in `tasks/` together."""
