"""User-facing commands: compile, generate, demo, make_checkpoint (developer tools are in tools/dev/)."""
