"""The ground floor: what more than one command needs (data and prompts, the one vLLM engine
wrapper, reading shards, the distributions and fidelity metrics, files and config). It imports
no command and no script."""
