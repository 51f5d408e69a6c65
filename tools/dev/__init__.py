"""Developer tools: benchmarks and device checks. They run from a checkout (not installed) and use only the
public API (`gptoss.runtime`, `gptoss.tools.make_checkpoint`)."""
