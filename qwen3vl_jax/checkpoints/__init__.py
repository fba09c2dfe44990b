"""Checkpoints: Hugging Face directories in and out (`hf_mapping`: tensor names and layouts, `hf_io`: reading and
writing them, `hf_export`: model + processor), PEFT adapters (`peft`), orbax train-state checkpoints with the data
iterator and the workdir's run record (`train_state`), one run per workdir (`workdir_lock`)."""
