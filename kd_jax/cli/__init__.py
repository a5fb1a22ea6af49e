"""The command-line layer: flags and YAML -> configs -> the public API; multi-host start-up."""
