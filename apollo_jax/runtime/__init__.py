"""Runtime plumbing: mesh and sharding, the command-line wrapper, workdir files, multi-process start-up."""
