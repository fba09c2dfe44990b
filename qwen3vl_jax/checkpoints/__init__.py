"""Checkpoints: Hugging Face directories in and out (`hf_io`), orbax train-state checkpoints with the data
iterator and the workdir's run record (`train_state`), local or gs:// storage and JSON files (`storage`)."""
