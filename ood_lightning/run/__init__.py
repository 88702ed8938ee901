"""Turning a Hydra config into a run: building the parts (:mod:`.build`), runtime choices
(:mod:`.runtime`), the two entrypoints' bodies (:mod:`.runs`) and the CLI wrapper (:mod:`.cli`)."""
