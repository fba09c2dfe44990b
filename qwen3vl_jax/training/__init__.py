"""Training: loss normalisations, optimizer, the (sharded) train step, checkpointing and the train loop."""
